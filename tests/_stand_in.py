"""A stand-in GPU for `optimize_` on the CPU: its compiled step measured by a function of the plan."""
from __future__ import annotations


def compiled_measured_by(monkeypatch, fake) -> None:
    """optimize_ on a stand-in GPU whose compiled step `fake(plan)` measures (no eager measurement)."""
    from convmem.strategies import optimize as module

    def measure_compiled(model, inputs, loss_fn, autocast, plan, say, mode=None):
        fake(plan)
        plan.measured_compiled, plan.measured_compile_mode = True, mode

    def no_eager(*args):
        raise AssertionError("a compiled plan must not be judged by the eager step")

    monkeypatch.setattr(module, "_on_cuda", lambda model, inputs: True)
    monkeypatch.setattr(module, "_measure_compiled", measure_compiled)
    monkeypatch.setattr(module, "_measure", no_eager)
