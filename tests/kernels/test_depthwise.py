"""The fused depthwise conv kernels against their plain-PyTorch twin: forward and every gradient.

On the CPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1); the
tests marked `cuda` run the compiled kernels and are skipped without a GPU.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from convmem._metrics import relative_error
from convmem.kernels import depthwise as dw
from convmem.kernels import depthwise_conv1d, depthwise_conv1d_ref, kernels_usable

pytestmark = pytest.mark.skipif(not dw.triton_available(), reason="triton is not installed")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (channels, multiplier, kernel_size, stride, padding, dilation, activation, length, bias):
# a fixed sweep over kernel sizes 1..70 (70 runs two chunks of 64 taps), strides, dilations,
# every padding form, odd, prime and length-1 inputs, depth multipliers and all activations.
CASES = [
    (3, 1, 1, 1, 0, 1, None, 1, True),
    (3, 1, 1, 1, 0, 1, "relu", 13, False),
    (3, 1, 2, 1, "same", 1, "gelu", 17, True),
    (4, 1, 3, 1, 1, 1, None, 37, True),
    (4, 1, 3, 1, 1, 1, "silu", 37, False),
    (2, 1, 3, 2, 1, 1, "relu", 31, True),
    (3, 1, 3, 1, "same", 4, "gelu", 29, True),
    (3, 1, 4, 1, "same", 1, "silu", 23, True),
    (3, 1, 4, 1, "causal", 1, "silu", 23, True),
    (3, 1, 4, 3, (3, 0), 2, None, 41, True),
    (2, 1, 5, 1, "valid", 1, "relu", 5, True),
    (2, 1, 5, 2, 4, 3, "gelu", 19, True),
    (2, 1, 7, 4, 3, 1, "silu", 53, True),
    (3, 1, 9, 1, (0, 8), 1, "gelu", 11, False),
    (2, 1, 15, 1, 7, 1, None, 101, True),
    (2, 1, 31, 1, 15, 1, "silu", 97, True),
    (2, 1, 31, 2, 15, 1, "gelu", 97, True),
    (1, 1, 64, 1, "same", 1, "relu", 131, True),
    (2, 1, 64, 1, "causal", 2, "silu", 150, True),
    (1, 1, 70, 1, "same", 1, "gelu", 89, True),
    (2, 1, 70, 3, 0, 1, None, 160, True),
    (2, 2, 3, 1, 1, 1, "silu", 29, True),
    (1, 4, 5, 2, 2, 1, "gelu", 31, True),
    (3, 2, 4, 1, "same", 3, None, 17, False),
]
IDS = [f"C{c}m{m}k{k}s{s}p{p}d{d}{a or 'id'}L{n}{'b' if b else ''}" for c, m, k, s, p, d, a, n, b in CASES]


def _inputs(case, dtype, batch=2, seed=0):
    channels, multiplier, k, stride, padding, dilation, act, length, bias = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, length, generator=g, dtype=torch.float64)
    w = torch.randn(channels * multiplier, 1, k, generator=g, dtype=torch.float64) / k ** 0.5
    b = torch.randn(channels * multiplier, generator=g, dtype=torch.float64) if bias else None
    tensors = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    return tensors, dict(stride=stride, padding=padding, dilation=dilation, activation=act)


def _run(fn, tensors, kwargs, grad_out=None, seed=1):
    y = fn(*tensors, **kwargs)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.device)
    wrt = [t for t in tensors if t is not None]
    grads = torch.autograd.grad(y, wrt, grad_out.to(y.dtype))
    return [y.detach(), *grads], grad_out


def test_interpreter_is_on():
    assert kernels_usable("cpu"), "conftest.py should have set TRITON_INTERPRET=1 before the kernels were defined"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_matches_reference(case):
    tensors, kwargs = _inputs(case, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the reference
        actual, grad_out = _run(depthwise_conv1d, tensors, kwargs)
    expected, _ = _run(depthwise_conv1d_ref, tensors, kwargs, grad_out)
    for name, a, e in zip(["output", "grad x", "grad weight", "grad bias"], actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert relative_error(a, e, floor=1e-12) < 1e-12, f"{name}: {relative_error(a, e):.3g}"


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_float32_tight(case):
    tensors, kwargs = _inputs(case, torch.float32)
    actual, grad_out = _run(depthwise_conv1d, tensors, kwargs)
    reference = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    expected, _ = _run(depthwise_conv1d_ref, reference, kwargs, grad_out)
    for name, a, e in zip(["output", "grad x", "grad weight", "grad bias"], actual, expected):
        assert a.dtype == torch.float32
        assert relative_error(a, e, floor=1e-12) < 2e-6, f"{name}: {relative_error(a, e):.3g}"


LOW_CASES = [CASES[i] for i in (4, 6, 8, 12, 15, 18, 19, 22)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LOW_CASES, ids=[IDS[CASES.index(c)] for c in LOW_CASES])
def test_low_precision_error_within_twice_pytorch(case, dtype):
    """Error against float32 is at most 2x PyTorch's own conv(+activation) in the same dtype."""
    case = case[:7] + (max(case[7], 200),) + case[8:]  # long enough for a stable error estimate
    tensors32, kwargs = _inputs(case, torch.float32, batch=3)
    expected, grad_out = _run(depthwise_conv1d_ref, tensors32, kwargs)
    low = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors32]
    actual, _ = _run(depthwise_conv1d, low, kwargs, grad_out)
    low = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors32]
    pytorch, _ = _run(depthwise_conv1d_ref, low, kwargs, grad_out)
    for name, a, p, e in zip(["output", "grad x", "grad weight", "grad bias"], actual, pytorch, expected):
        assert a.dtype == dtype
        ours, theirs = relative_error(a, e, floor=1e-6), relative_error(p, e, floor=1e-6)
        assert ours <= 2 * theirs + 1e-6, f"{name}: {ours:.3g} vs PyTorch's {theirs:.3g}"


def test_non_contiguous_input_and_grad():
    base = torch.randn(2, 40, 6, dtype=torch.float64)
    x = base.transpose(1, 2)[:, :, ::2].requires_grad_()  # (2, 6, 20), strides (240, 1, 12)
    assert not x.is_contiguous()
    w = torch.randn(6, 1, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    kwargs = dict(padding="same", activation="silu")
    grad_out = torch.randn(2, 20, 6, dtype=torch.float64).transpose(1, 2)  # non-contiguous too
    actual, _ = _run(depthwise_conv1d, [x, w, b], kwargs, grad_out)
    expected, _ = _run(depthwise_conv1d_ref, [x, w, b], kwargs, grad_out)
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < 1e-12
    # an expanded (stride-0) gradient, as from y.sum().backward()
    y = depthwise_conv1d(x, w, b, **kwargs)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    depthwise_conv1d_ref(x, w, b, **kwargs).sum().backward()
    assert relative_error(gx, x.grad) < 1e-12


def test_gradcheck():
    x = torch.randn(1, 2, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for kwargs in (dict(padding=1, activation="gelu"), dict(stride=2, padding="causal", dilation=2, activation="silu")):
        assert torch.autograd.gradcheck(lambda *t: depthwise_conv1d(*t, **kwargs), (x, w, b), fast_mode=True)


def test_partial_gradients_and_no_bias():
    tensors, kwargs = _inputs(CASES[7], torch.float64)
    x, w, b = tensors
    x.requires_grad_(False)
    y = depthwise_conv1d(x, w, b, **kwargs)
    gw, gb = torch.autograd.grad(y.sum(), (w, b))
    rw, rb = torch.autograd.grad(depthwise_conv1d_ref(x, w, b, **kwargs).sum(), (w, b))
    assert relative_error(gw, rw) < 1e-12 and relative_error(gb, rb) < 1e-12
    (gx,) = torch.autograd.grad(depthwise_conv1d(x.requires_grad_(), w.detach(), None, **kwargs).sum(), (x,))
    (rx,) = torch.autograd.grad(depthwise_conv1d_ref(x, w.detach(), None, **kwargs).sum(), (x,))
    assert relative_error(gx, rx) < 1e-12


def _kept_bytes(fn, *args, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(storages.values())


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_keeps_only_input_and_weights(device):
    x = torch.randn(2, 8, 300, device=device, requires_grad=True)
    w = torch.randn(8, 1, 31, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    expected = sum(t.numel() * t.element_size() for t in (x, w, b))
    assert _kept_bytes(depthwise_conv1d, x, w, b, padding=15, activation="silu") == expected
    # PyTorch keeps the pre-activation too
    pytorch = _kept_bytes(depthwise_conv1d_ref, x, w, b, padding=15, activation="silu")
    assert pytorch >= 2 * x.numel() * x.element_size() + w.numel() * w.element_size()


def test_autocast_casts_like_conv1d():
    x = torch.randn(2, 4, 33)
    w = torch.randn(4, 1, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv1d(x, w, None, padding=1, activation="relu")
        r = depthwise_conv1d_ref(x, w, None, padding=1, activation="relu")
    assert y.dtype == r.dtype == torch.bfloat16
    assert relative_error(y, r) < 1e-2


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # PyTorch's note on its own copy
def test_padding_forms():
    assert dw.resolve_padding("same", 4, 1, 1) == (1, 2)  # PyTorch puts the odd one on the right
    assert dw.resolve_padding("same", 5, 2, 1) == (4, 4)
    assert dw.resolve_padding("causal", 4, 3, 2) == (9, 0)
    assert dw.resolve_padding((2,), 3, 1, 1) == (2, 2)
    assert dw.resolve_padding((1, 0), 3, 1, 1) == (1, 0)
    x, w = torch.randn(1, 2, 10, dtype=torch.float64), torch.randn(2, 1, 4, dtype=torch.float64)
    same = torch.nn.functional.conv1d(x, w, padding="same", groups=2)
    assert torch.allclose(depthwise_conv1d(x, w, padding="same"), same)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(activation="tanh"), ValueError),
        (dict(stride=2, padding="same"), ValueError),
        (dict(padding="full"), ValueError),
        (dict(padding=-1), ValueError),
        (dict(stride=0), ValueError),
        (dict(dilation=20), ValueError),  # span 41 > length 10
    ],
)
def test_rejects_bad_arguments(kwargs, error):
    x, w = torch.randn(1, 2, 10), torch.randn(2, 1, 3)
    with pytest.raises(error):
        depthwise_conv1d(x, w, **kwargs)


def test_rejects_mismatches():
    x = torch.randn(1, 2, 10)
    with pytest.raises(ValueError, match="whole number"):
        depthwise_conv1d(x, torch.randn(3, 1, 3))
    with pytest.raises(TypeError, match="dtype"):
        depthwise_conv1d(x, torch.randn(2, 1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias"):
        depthwise_conv1d(x, torch.randn(2, 1, 3), torch.randn(3))


def test_falls_back_with_one_warning_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dw, "_warned", set())
    x, w = torch.randn(1, 2, 10, dtype=torch.float64), torch.randn(2, 1, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="reference"):
        y = depthwise_conv1d(x, w, activation="gelu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        depthwise_conv1d(x, w, activation="gelu")  # once only
    assert torch.equal(y, depthwise_conv1d_ref(x, w, activation="gelu"))


def test_falls_back_without_triton(monkeypatch):
    monkeypatch.setattr(dw, "triton_available", lambda: False)
    monkeypatch.setattr(dw, "_warned", set())
    x, w = torch.randn(1, 2, 10), torch.randn(2, 1, 3)
    with pytest.warns(UserWarning, match="Triton is not installed"):
        depthwise_conv1d(x, w)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[i] for i in (4, 9, 15, 18, 19, 22)])
def test_cuda_matches_reference(case, dtype):
    tensors, kwargs = _inputs(case, torch.float32, batch=3)
    tensors = [t.detach().cuda().requires_grad_() if t is not None else None for t in tensors]
    expected, grad_out = _run(depthwise_conv1d_ref, tensors, kwargs)
    low = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]
    actual, _ = _run(depthwise_conv1d, low, kwargs, grad_out.cuda())
    pytorch, _ = _run(depthwise_conv1d_ref, low, kwargs, grad_out.cuda())
    for a, p, e in zip(actual, pytorch, expected):
        assert relative_error(a, e, floor=1e-6) <= 2 * relative_error(p, e, floor=1e-6) + 1e-6


@cuda
def test_cuda_int64_offsets():
    """One channel of 2**31 + 5 bf16 samples (4 GiB): offsets past int32 must still be right."""
    n = 2**31 + 5
    try:
        x = torch.empty(1, 1, n, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x[..., : n - 64].fill_(1.0)
    x[..., n - 64 :] = torch.arange(64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(1, 1, 3, device="cuda", dtype=torch.bfloat16)
    y = depthwise_conv1d(x, w, padding=1)
    tail = y[0, 0, -5:].float().cpu()
    assert torch.equal(tail, torch.tensor([177.0, 180.0, 183.0, 186.0, 125.0]))
    assert y[0, 0, 2**31 - 100].item() == 3.0


# ------------------------------------------------------------- under torch.compile
@pytest.mark.parametrize("kernels", ["interpreted", "reference"])
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 5, 9, 13, 22)], ids=[IDS[i] for i in (1, 5, 9, 13, 22)])
def test_compiled_matches_reference_in_one_graph(case, kernels, monkeypatch):
    # NOTE [Depthwise under torch.compile]: the forward and backward are custom ops, traced in one
    # graph (fullgraph: no break), their gradients the reference's; "reference": where the kernels
    # cannot run, the ops compute the reference and its own gradients
    if kernels == "reference":
        monkeypatch.setattr(dw, "kernels_usable", lambda device: False)
    torch._dynamo.reset()
    tensors, kwargs = _inputs(case, torch.float64)
    compiled = torch.compile(lambda x, w, b: depthwise_conv1d(x, w, b, **kwargs), backend="aot_eager",
                             fullgraph=True)
    actual, grad_out = _run(lambda x, w, b, **_: compiled(x, w, b), tensors, kwargs)
    expected, _ = _run(depthwise_conv1d_ref, tensors, kwargs, grad_out)
    for name, a, e in zip(["output", "grad x", "grad weight", "grad bias"], actual, expected):
        assert a.shape == e.shape, name
        assert relative_error(a, e, floor=1e-12) < 1e-12, f"{name}: {relative_error(a, e):.3g}"


@pytest.mark.parametrize("kernels", ["interpreted", "reference"])
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 13, 22)], ids=[IDS[i] for i in (1, 13, 22)])
def test_custom_ops_agree_with_their_fakes(case, kernels, monkeypatch):
    # Inductor asserts that an op's outputs have the sizes and strides of its fake's; the padded
    # reference's input gradient is a slice of a longer one, which aot_eager above lets through
    if kernels == "reference":
        monkeypatch.setattr(dw, "kernels_usable", lambda device: False)
    (x, weight, bias), kwargs = _inputs(case, torch.float64)
    stride, dilation = kwargs["stride"], kwargs["dilation"]
    left, right = dw.resolve_padding(kwargs["padding"], weight.shape[-1], dilation, stride)
    conf = (stride, left, right, dilation, kwargs["activation"] or "")
    out = dw._depthwise_op(x, weight, bias, *conf)
    grad_out = torch.randn_like(out)
    for op, args in [(dw._depthwise_op, (x, weight, bias, *conf)),
                     (dw._depthwise_backward_op, (grad_out, x, weight, bias, *conf, True, True, bias is not None))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiled_partial_gradients():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 21, dtype=torch.float64)
    w = torch.randn(3, 1, 5, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(lambda x, w: depthwise_conv1d(x, w, None, padding="same", activation="silu"),
                             backend="aot_eager", fullgraph=True)
    (grad_w,) = torch.autograd.grad(compiled(x, w).square().sum(), [w])
    (expected,) = torch.autograd.grad(depthwise_conv1d_ref(x, w, None, padding="same", activation="silu").square().sum(), [w])
    assert relative_error(grad_w, expected, floor=1e-12) < 1e-12


@cuda
@pytest.mark.parametrize("case", [CASES[i] for i in (4, 15, 22)])
def test_cuda_inductor_matches_reference(case):
    torch._dynamo.reset()
    tensors, kwargs = _inputs(case, torch.float64, batch=3)
    tensors = [t.detach().cuda().requires_grad_() if t is not None else None for t in tensors]
    compiled = torch.compile(lambda x, w, b: depthwise_conv1d(x, w, b, **kwargs), fullgraph=True)
    actual, grad_out = _run(lambda x, w, b, **_: compiled(x, w, b), tensors, kwargs)
    expected, _ = _run(depthwise_conv1d_ref, tensors, kwargs, grad_out)
    for a, e in zip(actual, expected):
        assert relative_error(a, e, floor=1e-12) < 1e-10


def test_the_choice_of_ops_is_a_constant_to_dynamo():
    # read inside the traced function on a GPU: it must not break the graph
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + int(dw._triton_ops_on_gpus()), backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.zeros(2)), torch.zeros(2) + int(dw._triton_ops_on_gpus()))


@cuda
@pytest.mark.skipif(not dw._TRITON_OPS, reason="torch.library.triton_op needs torch 2.6")
def test_cuda_inductor_launches_the_kernels_itself():
    # NOTE [Depthwise under torch.compile]: with triton ops, Inductor's generated code launches the
    # forward kernel (a user-defined Triton kernel), no Python custom op in between
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x = torch.randn(2, 8, 300, device="cuda")
    w = torch.randn(8, 1, 5, device="cuda")
    compiled = torch.compile(lambda x, w: depthwise_conv1d(x, w, None, padding=2), fullgraph=True)
    out, code = run_and_get_code(compiled, x, w)
    assert relative_error(out, depthwise_conv1d_ref(x, w, None, padding=2)) < 1e-6
    generated = "\n".join(code)
    assert "user_autotune" in generated and "def fwd(" in generated
    assert "convmem.depthwise_conv1d" not in generated
