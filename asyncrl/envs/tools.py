"""``env.type: tools``: the model calls tools by writing ``START input END``.

Each configured tool has a pair of delimiters (``<calc>`` and ``</calc>``, or with the
built-in character tokenizer single characters such as ``(`` and ``)``). The closing
delimiters are the environment's stop strings, so a model turn ends right after one;
the text between the last opening delimiter of that tool and the closing one is the
tool's input, run in the tool pool, and its output comes back as an observation
rendered with ``output_template`` (``{output}`` replaced by the pool's text, e.g.
``<output>{output}</output>``). A turn that ends otherwise (EOS or its token limit),
or a closing delimiter without its opening one, finishes the episode: the verifier
scores the final turn (the model's answer after its tool calls; observations are
never scored).
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncrl.envs.base import Finish, Observation, ToolCall, Turn
from asyncrl.wire.schema import PromptGroup


@dataclass(frozen=True)
class ToolSyntax:
    name: str  # the tool pool's name for it
    start: str
    end: str


def parse_call(text: str, tools: tuple[ToolSyntax, ...]) -> ToolCall | None:
    """The call a turn ends with: the tool whose closing delimiter occurs last in
    ``text`` (that is the stop string that ended the turn; a multi-token one may leave
    a little text after it), among those the one whose opening delimiter comes latest
    before it; None if no closing delimiter has its opening one."""
    best: tuple[int, int, ToolCall] | None = None
    for t in tools:
        close = text.rfind(t.end)
        opened = text.rfind(t.start, 0, close) if close >= 0 else -1
        if opened < 0:
            continue
        key = (close + len(t.end), opened)
        if best is None or key > best[:2]:
            best = (*key, ToolCall(t.name, text[opened + len(t.start) : close]))
    return None if best is None else best[2]


class _ToolSession:
    def __init__(self, env: ToolEnv) -> None:
        self.env = env

    def step(self, turn: Turn) -> ToolCall | Finish:
        call = parse_call(turn.text, self.env.tools) if turn.end == "stop" else None
        return call if call is not None else Finish(answer=turn.text)

    def tool_output(self, output: str) -> Observation:
        return Observation(self.env.output_template.replace("{output}", output))


class ToolEnv:
    def __init__(self, tools: tuple[ToolSyntax, ...], output_template: str = "{output}") -> None:
        if not tools:
            raise ValueError("a tool environment needs at least one tool")
        if "{output}" not in output_template:
            raise ValueError(f"output_template {output_template!r} has no {{output}}")
        self.tools, self.output_template = tuple(tools), output_template
        self.stop = tuple(dict.fromkeys(t.end for t in tools))

    def start(self, problem: PromptGroup) -> _ToolSession:
        return _ToolSession(self)
