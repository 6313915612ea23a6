"""Shared test helpers for the wrappers that compute an ``nn.Conv1d`` another way (Conv1dAs2d,
Conv1dByPhases, Conv1dAsMatmul): what each must show against the Conv1d it wraps, in float64."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch
from torch import nn

from _compare import assert_same_step, seeded_randn, twin


def shorter_than_reach(conv: nn.Conv1d, length: int) -> bool:
    """Whether `length` samples, padded as `conv` pads them, are fewer than its kernel spans."""
    if conv.padding == "same":
        return False
    padding = 0 if conv.padding == "valid" else conv.padding[0]
    return length + 2 * padding < conv.dilation[0] * (conv.kernel_size[0] - 1) + 1


def assert_computes_the_conv(run: Callable[[torch.Tensor], torch.Tensor], conv: nn.Conv1d, x: torch.Tensor,
                             tol: float = 1e-12) -> None:
    """`run(x)` (the wrapper, compiled or not) gives `conv`'s output and the gradients of x and of
    every parameter of `conv`."""
    x = x.requires_grad_()
    reference = conv(x)
    grads = torch.autograd.grad(reference.square().sum(), (x, *conv.parameters()))
    out = run(x)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=tol, atol=tol)
    for got, want in zip(torch.autograd.grad(out.square().sum(), (x, *conv.parameters())), grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def assert_takes_any_layout(wrapper: type, conv: nn.Conv1d) -> None:
    """A non-contiguous batch and an unbatched input give `conv`'s outputs (`conv` reads 3 channels)."""
    wide = seeded_randn(2, 40, 3).transpose(1, 2)  # (2, 3, 40), not contiguous
    torch.testing.assert_close(wrapper(conv)(wide), conv(wide), rtol=1e-12, atol=1e-12)
    x = seeded_randn(3, 20)
    torch.testing.assert_close(wrapper(conv)(x), conv(x), rtol=1e-12, atol=1e-12)


def assert_compiles_whole(wrapper: type, conv: nn.Conv1d, x: torch.Tensor) -> None:
    """The wrapper compiles in one graph (``fullgraph=True``) and gives `conv`'s output."""
    torch._dynamo.reset()
    compiled = torch.compile(wrapper(conv), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), conv(x), rtol=1e-12, atol=1e-12)


def assert_compiled_on_cuda_computes_the_conv(wrapper: type, conv: nn.Conv1d) -> None:
    """Compiled by Inductor on the GPU, the wrapper gives a float64 CUDA `conv`'s output and
    gradients (cuDNN picks its own algorithms for each: compared in float64)."""
    torch._dynamo.reset()
    x = seeded_randn(2, conv.in_channels, 257).cuda()
    assert_computes_the_conv(torch.compile(wrapper(conv)), conv, x, tol=1e-10)


def assert_refuses(wrapper: type, reason_of: Callable[[nn.Module], Optional[str]],
                   cases: Sequence[Tuple[nn.Module, str]], refusal: str) -> None:
    """For each (module, why): `reason_of` names why, and the wrapper refuses it saying `refusal`."""
    for module, why in cases:
        assert why in reason_of(module)
        with pytest.raises(ValueError, match=refusal):
            wrapper(module)


def assert_conv_swaps_exact(entry, find: Callable[[nn.Module], Dict[str, nn.Module]], kind: type,
                            count: Optional[int] = None) -> None:
    """Swap in what `find(model)` offers for a zoo `entry` (float64): every swap a `kind`, the
    state_dict keys unchanged, nothing offered twice, the step exact, and `restore_` takes them out."""
    from convmem import restore_
    from convmem.strategies._common import swap_modules

    reference = twin(entry.model)
    keys = list(entry.model.state_dict())
    swaps = find(entry.model)
    assert swaps and all(type(m) is kind for m in swaps.values())
    assert count is None or len(swaps) == count
    swap_modules(entry.model, swaps)
    assert list(entry.model.state_dict()) == keys
    assert find(entry.model) == {}  # each is swapped once
    assert_same_step(reference, entry.model, entry.inputs, entry.loss_fn, steps=2)
    restore_(entry.model)
    assert not any(isinstance(m, kind) for m in entry.model.modules())
