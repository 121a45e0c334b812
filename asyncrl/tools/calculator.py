"""The ``calculator`` tool: exact arithmetic on one expression, parsed with ``ast`` and
evaluated by walking the tree, so nothing but numbers and operators is ever run.

Allowed: int/float literals, ``+ - * / // % **``, unary ``+``/``-``, parentheses. Bounds
keep every call cheap (it runs in the pool's thread, under the GIL): an exponent over
``MAX_EXPONENT``, an integer over ``MAX_INT_BITS`` bits or an input over
``MAX_INPUT_CHARS`` is refused with an observation, never computed.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_INPUT_CHARS = 1000
MAX_EXPONENT = 10_000
MAX_INT_BITS = 4096  # ~1233 decimal digits
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalcError(ValueError):
    """An expression the calculator refuses; the message is the observation."""


def _check_size(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalcError(f"result too large (over {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("result is not finite")
    return value


def _power(base: int | float, exp: int | float) -> int | float:
    if abs(exp) > MAX_EXPONENT:
        raise CalcError(f"exponent {exp} too large (limit {MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and base not in (0, 1, -1):
        # The result has about exp * bits(base) bits: refuse before computing it.
        if exp * (abs(base).bit_length() - 1) > MAX_INT_BITS:
            raise CalcError(f"result too large (over {MAX_INT_BITS} bits)")
    result = base ** exp
    if isinstance(result, complex):
        raise CalcError("complex result")
    return result


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        try:
            return _check_size(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        except OverflowError:
            raise CalcError("result too large") from None
    raise CalcError(f"unsupported element {type(node).__name__} (only numbers and + - * / // % ** ( ))")


def evaluate(text: str) -> int | float:
    """The value of ``text``; raises CalcError (its message is the observation)."""
    if len(text) > MAX_INPUT_CHARS:
        raise CalcError(f"expression too long (over {MAX_INPUT_CHARS} characters)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalcError(f"syntax error: {e.msg if isinstance(e, SyntaxError) else e}") from None
    try:
        return _eval(tree)
    except RecursionError:
        raise CalcError("expression nested too deeply") from None
    except OverflowError:
        raise CalcError("result too large") from None


def calculate(text: str) -> str:
    """The calculator tool: the value as text, or ``error: ...``."""
    try:
        value = evaluate(text)
    except CalcError as e:
        return f"error: {e}"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return repr(value)  # keep "4.0": the model should see a division gave a float
    return str(value)
