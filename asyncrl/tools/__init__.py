"""Built-in tools for multi-turn episodes: a jailed Python interpreter and a calculator,
run through ToolPool (see docs/tools.md)."""

from asyncrl.tools.pool import TOOLS, ToolPool

__all__ = ["TOOLS", "ToolPool"]
