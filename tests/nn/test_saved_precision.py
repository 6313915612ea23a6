"""LowPrecisionSaved: outputs and buffers exact, gradients within bfloat16 rounding, kept bytes halved."""
import copy

import pytest
import torch
from torch import nn

import convmem
from convmem._metrics import gradient_error
from convmem.nn.saved_precision import LowPrecisionSaved
from convmem.profile.estimate import estimate_step


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 16, 5, padding=2), nn.BatchNorm1d(16), nn.GELU(), nn.Conv1d(16, 4, 3, padding=1))


def _step(model: nn.Module, x: torch.Tensor):
    x = x.detach().requires_grad_()
    out = model(x)
    out.pow(2).mean().backward()
    grads = {k.replace("wrapped.", ""): p.grad for k, p in model.named_parameters()}
    grads["input"] = x.grad
    return out.detach(), grads


def test_outputs_and_buffers_exact_gradients_within_bf16_rounding():
    block = _block()
    wrapped = LowPrecisionSaved(copy.deepcopy(block), min_bytes=0)
    x = torch.randn(3, 4, 257, generator=torch.Generator().manual_seed(1))
    out_ref, grads_ref = _step(block, x)
    out, grads = _step(wrapped, x)
    assert torch.equal(out, out_ref)  # forward is untouched
    for (k, a), (_, b) in zip(block.state_dict().items(), wrapped.state_dict().items()):
        assert torch.equal(a, b), k  # BatchNorm statistics updated exactly as without the wrapper
    error = gradient_error(grads_ref, grads)
    assert 0 < error < 2e-2  # bfloat16 has 8 bits of mantissa: rounding, not garbage


def test_float16_is_offered_and_other_dtypes_refused():
    LowPrecisionSaved(_block(), dtype=torch.float16)
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        LowPrecisionSaved(_block(), dtype=torch.float32)
    with pytest.raises(ValueError, match="min_bytes"):
        LowPrecisionSaved(_block(), min_bytes=-1)


def test_small_tensors_parameters_and_no_grad_stay_as_they_are():
    block = _block()
    wrapped = LowPrecisionSaved(copy.deepcopy(block))  # default min_bytes: 64 KiB, above these tensors
    x = torch.randn(2, 4, 31)
    _, grads_ref = _step(block, x)
    _, grads = _step(wrapped, x)
    assert gradient_error(grads_ref, grads) == 0.0
    with torch.no_grad():
        assert torch.equal(wrapped(x), block(x))


def test_estimate_keeps_about_half_on_the_zoo():
    entry = convmem.zoo.get("tcn", "default", device="meta")
    plain = estimate_step(entry.model, entry.inputs, entry.loss_fn)
    lowp = estimate_step(LowPrecisionSaved(entry.model), entry.inputs, entry.loss_fn)
    assert 0.4 * plain.peak_bytes < lowp.peak_bytes < 0.7 * plain.peak_bytes


def test_state_dict_keys_and_restore():
    model = nn.Sequential(_block(), _block())
    keys = list(model.state_dict())
    model[0] = LowPrecisionSaved(model[0])
    assert list(model.state_dict()) == keys
    model = convmem.restore_(model)
    assert not any(isinstance(m, LowPrecisionSaved) for m in model.modules())
