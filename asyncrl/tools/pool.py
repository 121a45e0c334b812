"""ToolPool: the episode runner's one entry point to the tools. Runs a batch of tool
calls concurrently, off the decode loop, and returns one observation per call, in order.

A thread per concurrent call is enough: the ``python`` tool's work happens in its own
jailed process (the thread only waits on a pipe) and the calculator is bounded to
microseconds. Every call is bounded by the tool's wall clock plus a margin, and a
tool's failure of any kind comes back as observation text, never as an exception.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Callable, Sequence

from asyncrl.tools.calculator import calculate
from asyncrl.tools.sandbox import SandboxLimits, run_python

log = logging.getLogger(__name__)

MARGIN_S = 10.0  # on top of timeout_s: the jail's start-up, its own kill and the cleanup


def _python_tool(limits: SandboxLimits) -> Callable[[str], str]:
    return lambda code: run_python(code, limits).observation()


# name -> factory(limits) -> tool(input text) -> observation text. To add a tool, add
# an entry (see docs/tools.md).
TOOLS: dict[str, Callable[[SandboxLimits], Callable[[str], str]]] = {
    "python": _python_tool,
    "calculator": lambda limits: calculate,
}


class ToolPool:
    def __init__(self, processes: int, timeout_s: float, max_output_chars: int, memory_mb: int = 1024,
                 max_processes: int = 32, max_file_mb: int = 16, tools: Sequence[str] = ("python", "calculator"),
                 work_root: str | None = None):
        """``processes``: calls run at once (0 = one at a time in the caller's thread);
        the other arguments are the python tool's limits (see SandboxLimits)."""
        if processes < 0:
            raise ValueError(f"ToolPool processes must be >= 0, got {processes}")
        unknown = [t for t in tools if t not in TOOLS]
        if unknown:
            raise ValueError(f"unknown tool(s) {unknown}; available: {sorted(TOOLS)}")
        self.limits = SandboxLimits(timeout_s=timeout_s, max_output_chars=max_output_chars, memory_mb=memory_mb,
                                    max_processes=max_processes, max_file_mb=max_file_mb, work_root=work_root)
        self.tools = {name: TOOLS[name](self.limits) for name in tools}
        self.processes = processes
        self._executor = cf.ThreadPoolExecutor(processes, thread_name_prefix="tool") if processes else None

    def _call(self, name: str, text: str) -> str:
        try:
            return self.tools[name](text)
        except Exception as e:  # a bug in a tool must not end the episode
            log.exception("tool %r failed", name)
            return f"tool error: {type(e).__name__}: {e}"

    def run(self, calls: Sequence[tuple[str, str]]) -> list[str]:
        """One observation per (tool name, input text), in order. Unknown tool names raise
        ValueError before anything runs."""
        unknown = sorted({name for name, _ in calls if name not in self.tools})
        if unknown:
            raise ValueError(f"unknown tool(s) {unknown}; this pool has {sorted(self.tools)}")
        if self._executor is None:
            return [self._call(name, text) for name, text in calls]
        futures = [self._executor.submit(self._call, name, text) for name, text in calls]
        bound = self.limits.timeout_s + MARGIN_S
        out = []
        for (name, _), fut in zip(calls, futures):
            try:
                out.append(fut.result(timeout=bound))
            except cf.TimeoutError:  # the tool's own clock failed; do not wait on it
                log.error("tool %r gave no answer within %.1f s", name, bound)
                out.append(f"timed out after {self.limits.timeout_s:.1f} s")
        return out

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> ToolPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
