"""convmem: where a Conv1d model's GPU memory goes, and the cheapest exact way to make it fit."""
from . import zoo
from ._units import format_bytes, parse_bytes
from .profile import MemoryProfile, profile

__version__ = "0.1.0"

__all__ = ["profile", "MemoryProfile", "zoo", "parse_bytes", "format_bytes", "__version__"]
