"""One file per strategy: a frozen Config dataclass and an apply function."""
