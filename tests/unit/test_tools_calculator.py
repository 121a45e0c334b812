"""The calculator tool: exact values, and refusals (names, calls, huge results) as
observations."""

import pytest

from asyncrl.tools.calculator import CalcError, calculate, evaluate


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 // 2", -4), ("7 % 3", 1),
    ("-3 ** 2", -9), ("(-3) ** 2", 9), ("2 ** -2", 0.25), ("2 ** 100", 2**100), ("--5", 5), ("1.5e3 + 1", 1501.0),
    ("12345678901234567890 * 98765432109876543210", 12345678901234567890 * 98765432109876543210),
])
def test_values(expr, value):
    got = evaluate(expr)
    assert got == value and type(got) is type(value)
    assert calculate(expr) == (repr(value) if isinstance(value, float) else str(value))


@pytest.mark.parametrize("expr, reason", [
    ("x + 1", "Name"), ("__import__('os').system('true')", "Call"), ("(1).real", "Attribute"),
    ("[1, 2]", "List"), ("lambda: 1", "Lambda"), ("'a' * 3", "Constant"), ("1 < 2", "Compare"),
    ("9 ** 9 ** 9", "exponent"), ("2 ** 5000", "too large"), ("10 ** 3000", "too large"),
    ("1 / 0", "division by zero"), ("5 % 0", "division by zero"), ("1e308 * 10", "not finite"),
    ("10.0 ** 400", "too large"), ("(-8) ** 0.5", "complex"), ("1 +", "syntax error"), ("1" * 2000, "too long"),
])
def test_refusals_become_observations(expr, reason):
    with pytest.raises(CalcError):
        evaluate(expr)
    obs = calculate(expr)
    assert obs.startswith("error: ") and reason in obs


def test_huge_power_is_refused_before_it_is_computed():
    # 7 ** 9999 has ~28,000 bits: over the cap, so refused from the operand sizes alone.
    assert "too large" in calculate("7 ** 9999")
    assert calculate("1 ** 9999") == "1" and calculate("(-1) ** 9999") == "-1"
