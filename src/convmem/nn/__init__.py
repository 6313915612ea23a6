"""Drop-in modules: the wrappers strategies put in, and lossy replacements for Conv1d."""
from ._wrapper import ModuleWrapper, restore_, unwrap

__all__ = ["ModuleWrapper", "restore_", "unwrap"]
