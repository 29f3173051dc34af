"""agentloop tools: typed Python functions as validated, time-limited tools.

Owns nothing itself; re-exports the public API of tools/registry.py (the
registry and its results), tools/builtin.py (safe built-in tools) and
tools/files.py (confined local-file search). Never imports fastapi: tools
run in agents and chat clients, not in the gateway.
"""

from agentloop.tools.builtin import (
    builtin_registry, calculator, convert_time, convert_units, current_time, evaluate,
)
from agentloop.tools.files import FileSearch, PathOutsideRoots
from agentloop.tools.registry import Tool, ToolRegistry, ToolResult, normalize_call

__all__ = ["FileSearch", "PathOutsideRoots", "Tool", "ToolRegistry", "ToolResult", "builtin_registry",
           "calculator", "convert_time", "convert_units", "current_time", "evaluate", "normalize_call"]
