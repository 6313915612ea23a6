"""Kernel tests run Triton's interpreter on the CPU (NOTE [Interpreter and fallback]).

Set at import, before any test runs: pytest imports every conftest while collecting, and
convmem defines its Triton kernels only on their first call, so the variable is seen even when
other test files imported convmem earlier.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
