"""Plan + IR -> a scheduled executor (readable Python source)."""

from planner.codegen.emit import Executor, emit_executor, format_arg

__all__ = ["Executor", "emit_executor", "format_arg"]
