"""Probe (GPU machine): can selective recompute cost under 10% in eager mode on a launch-bound model?

``python benchmarks/fused_recompute_probe.py`` -- resnet1d at its default input: eager, convmem's
selective checkpoint_, and a hand-fused BatchNorm -> ReLU -> Conv1d autograd Function inside each
basic block that keeps only the BatchNorm's input (the first conv's output) and rebuilds the second
conv's input in its backward from the saved batch statistics (InPlace-ABN's idea, Rota Bulo et al.
2018, without its invertible activation): what selective keeps, with none of torch.utils.checkpoint's
machinery and two extra elementwise kernels per block. Not a convmem strategy: a measurement for
issue 3's "selective under 10% in eager" (docs/BENCHMARKS.md). Off a GPU (``--check``) it checks the
fused block against the untouched one in float64. Since then a strategy: ``convmem.fuse_`` finds
such chains in any block (`convmem.nn.FusedNormActConv`, NOTE [Norm-activation-conv chains]).
"""
from __future__ import annotations

import copy
import os
import sys
import types

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

_aten = torch.ops.aten


class _BatchNormReLUConv(torch.autograd.Function):
    """conv(relu(batch_norm(x))) keeping x and the batch statistics only."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, conv_weight, conv):
        z, mean, invstd = _aten.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
        y = torch.relu(z)
        del z
        out = _aten.convolution(y, conv_weight, None, conv.stride, conv.padding, conv.dilation, False, [0], conv.groups)
        ctx.save_for_backward(x, bn_weight, bn_bias, mean, invstd, conv_weight)
        ctx.conv = (conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bn_weight, bn_bias, mean, invstd, conv_weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        scale = invstd * bn_weight
        y = torch.addcmul((bn_bias - mean * scale)[:, None], x, scale[:, None]).relu_()  # the conv's input again
        grad_y, grad_conv_weight, _ = _aten.convolution_backward(
            grad, y, conv_weight, None, stride, padding, dilation, False, [0], groups, [True, True, False])
        grad_z = _aten.threshold_backward(grad_y, y, 0)
        del y, grad_y
        grad_x, grad_bn_weight, grad_bn_bias = _aten.native_batch_norm_backward(
            grad_z, x, bn_weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        return grad_x, grad_bn_weight, grad_bn_bias, None, None, None, None, grad_conv_weight, None


def _fused_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    bn = self.bn1
    if not (self.training and torch.is_grad_enabled()):
        out = self.relu(bn(self.conv1(x)))
        out = self.conv2(out)
    else:
        bn.num_batches_tracked.add_(1)  # nn.BatchNorm1d's bookkeeping (momentum 0.1: no cumulative average)
        out = _BatchNormReLUConv.apply(self.conv1(x), bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                       bn.momentum, bn.eps, self.conv2.weight, self.conv2)
    return self.relu(self.bn2(out) + identity)


def fuse(model: nn.Module) -> nn.Module:
    from convmem.zoo.resnet1d import BasicBlock1d

    for block in model.modules():
        if isinstance(block, BasicBlock1d):
            assert block.bn1.momentum is not None and block.conv2.bias is None
            block.forward = types.MethodType(_fused_forward, block)
    return model


def check() -> None:
    from convmem import zoo

    entry = zoo.get("resnet1d", "small", dtype=torch.float64)
    twin = fuse(copy.deepcopy(entry.model))
    for step in range(3):
        for m in (entry.model, twin):
            m.zero_grad(set_to_none=True)
            entry.loss_fn(m(*entry.inputs)).backward()
    worst = 0.0
    for (name, a), b in zip(entry.model.state_dict().items(), twin.state_dict().values()):
        if a.is_floating_point():
            worst = max(worst, float((a - b).norm() / a.norm().clamp_min(1e-300)))
    for (name, p), q in zip(entry.model.named_parameters(), twin.parameters()):
        worst = max(worst, float((p.grad - q.grad).norm() / p.grad.norm().clamp_min(1e-300)))
    print(f"float64, 3 steps: worst relative difference of gradients, parameters and BatchNorm statistics {worst:.2e}")
    assert worst < 1e-10


def main() -> int:
    if "--check" in sys.argv or not torch.cuda.is_available():
        check()
        return 0
    import harness
    import strategies

    def fused(entry):
        fuse(entry.model)
        return strategies.Prepared(entry.model, entry.inputs, entry.loss_fn, note="BatchNorm->ReLU->conv fused per block")

    rows = {"eager_fp32": strategies.eager, "convmem_checkpoint_selective": strategies.CONVMEM["convmem_checkpoint_selective"],
            "fused_bn_relu_conv": fused}
    for _ in range(2):
        harness.run("fused_recompute", ["resnet1d"], rows, os.path.join(os.environ.get("OUT", "/tmp"), "fused_recompute.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
