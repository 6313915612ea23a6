"""1-D ResNet-18 for 12-lead ECG classification: the `resnet1d` workload.

ResNet-18 (He et al. 2016, "Deep Residual Learning for Image Recognition"; layout of torchvision's
``resnet18``) turned 1-D for ECG as in shared/WORKLOADS.md: a stem Conv1d(12, 64, 15, stride 2) ->
BatchNorm -> ReLU -> MaxPool(3, stride 2), four stages of two basic blocks with kernel 7 (BatchNorm,
ReLU; stride 2 and a 1x1 projection shortcut at the start of stages 2-4) and 64/128/256/512
channels, global average pooling and a linear head. The kernels are wider than the image
network's 7 and 3 because a 500 Hz ECG beat spans hundreds of samples.

``num_classes=9`` follows the CPSC 2018 12-lead ECG challenge (500 Hz, 9 rhythm classes).
Activations are not in-place (torchvision's are) so that module hooks see unmodified outputs.

Input (batch, 12, samples) at 500 Hz, output (batch, num_classes) logits; any samples >= 1
(total stride 32 before the global pool). BatchNorm makes the model length-local in eval mode only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from convmem.zoo._workload import Workload, cross_entropy_cyclic_target, normal

__all__ = ["BasicBlock1d", "ResNet1d", "WORKLOAD"]


class BasicBlock1d(nn.Module):
    """ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)); x: (batch, in_channels, length).

    The first conv carries the stride; the shortcut is a strided 1x1 conv + BN when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size, 1, padding, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm1d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet1d(nn.Module):
    """ecg: (batch, leads, samples) -> logits (batch, num_classes).

    ``blocks`` holds the eight basic blocks in order (stage s is blocks[2s], blocks[2s + 1]).

    Example::

        >>> ResNet1d()(torch.randn(2, 12, 5000)).shape
        torch.Size([2, 9])
    """

    def __init__(
        self,
        num_classes: int = 9,
        leads: int = 12,
        widths: Tuple[int, ...] = (64, 128, 256, 512),
        blocks_per_stage: int = 2,
        kernel_size: int = 7,
        stem_kernel_size: int = 15,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(leads, widths[0], stem_kernel_size, 2, stem_kernel_size // 2, bias=False),
            nn.BatchNorm1d(widths[0]),
            nn.ReLU(),
            nn.MaxPool1d(3, stride=2, padding=1),
        )
        blocks = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock1d(in_channels, width, kernel_size, stride))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(ecg))).flatten(1))


WORKLOAD = Workload(
    name="resnet1d",
    model_cls=ResNet1d,
    default_shape=(64, 12, 5000),
    small_shape=(2, 12, 1000),
    make_input=normal,
    loss_fn=cross_entropy_cyclic_target,
    blocks="blocks",
    description="1-D ResNet-18 for 12-lead ECG: k=15 stem, 8 basic blocks (k=7, BatchNorm), 64..512 channels",
    channels_kwarg="leads",
    sample_rate=500,
)
