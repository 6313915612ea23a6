"""Shared test helper: a strategy must change no number of a training step (DESIGN.md invariant 1)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from convmem._metrics import relative_error
from convmem.profile.step import default_loss


def seeded_randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A normal tensor from its own generator (float64 by default): the same numbers in every test."""
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def step_results(model: nn.Module, inputs: Sequence[Any], loss_fn: Optional[Callable] = None, steps: int = 1):
    """Outputs of the last step, input grads, parameter grads (by name) and buffers after `steps`."""
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.grad is not None:
                x.grad = None
        output = model(*inputs)
        loss = (loss_fn or default_loss)(output)
        loss.backward()
    outputs = [t.detach().clone() for t in torch.utils._pytree.tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    return {
        "outputs": outputs,
        "input_grads": [x.grad for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()],
        "param_grads": {n: p.grad for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.state_dict().items()},
    }


def assert_same_step(
    reference: nn.Module,
    optimized: nn.Module,
    inputs: Sequence[Any],
    loss_fn: Optional[Callable] = None,
    tol: float = 1e-10,
    steps: int = 1,
) -> None:
    """Outputs, input and parameter gradients and state_dict (buffers) agree within `tol`.

    Parameter gradients are matched through state_dict keys, which exact strategies keep.
    """
    expected = step_results(reference, inputs, loss_fn, steps)
    actual = step_results(optimized, inputs, loss_fn, steps)
    for i, (a, e) in enumerate(zip(actual["outputs"], expected["outputs"])):
        assert relative_error(a, e) < tol, f"output {i}: relative error {relative_error(a, e):.3g}"
    for i, (a, e) in enumerate(zip(actual["input_grads"], expected["input_grads"])):
        assert (a is None) == (e is None), f"input {i}: gradient presence differs"
        if e is not None:
            assert relative_error(a, e) < tol, f"input {i} grad: relative error {relative_error(a, e):.3g}"
    ref_grads = _grads_by_state_key(reference, expected["param_grads"])
    opt_grads = _grads_by_state_key(optimized, actual["param_grads"])
    assert ref_grads.keys() == opt_grads.keys(), "parameters differ"
    for name, e in ref_grads.items():
        a = opt_grads[name]
        assert (a is None) == (e is None), f"{name}: gradient presence differs"
        if e is not None:
            assert relative_error(a, e, floor=1e-12) < tol, f"{name} grad: relative error {relative_error(a, e):.3g}"
    assert expected["buffers"].keys() == actual["buffers"].keys(), "state_dict keys differ"
    for name, e in expected["buffers"].items():
        a = actual["buffers"][name]
        if e.is_floating_point():
            assert relative_error(a, e, floor=1e-12) < tol, f"{name}: relative error {relative_error(a, e):.3g}"
        else:
            assert torch.equal(a, e), f"{name} differs"


def _grads_by_state_key(model: nn.Module, grads: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    # Map parameter objects to their state_dict key (wrappers rename parameters, not keys).
    by_id = {id(p): g for (n, p), g in zip(model.named_parameters(), grads.values())}
    state = model.state_dict(keep_vars=True)
    return {k: by_id[id(v)] for k, v in state.items() if id(v) in by_id}


def twin(model: nn.Module) -> nn.Module:
    """An independent copy with the same parameters and buffers."""
    return copy.deepcopy(model)
