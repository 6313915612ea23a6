"""wav2vec 2.0 feature encoder (Baevski et al. 2020): the `w2v2_fe` workload.

The convolutional waveform encoder of wav2vec 2.0 as in fairseq (``ConvFeatureExtractionModel``,
``conv_feature_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"``, ``conv_bias=False``) and
transformers (``Wav2Vec2FeatureEncoder``): seven 512-channel convolutions without bias, kernels
(10, 3, 3, 3, 3, 2, 2), strides (5, 2, 2, 2, 2, 2, 2), each followed by GELU. Total stride 320
(20 ms at 16 kHz), receptive field 400 samples (25 ms).

``norm`` selects the two published variants (transformers' ``feat_extract_norm``):

* ``"group"`` (wav2vec2-base): GroupNorm(512 groups, 512 channels) after the first convolution
  only. One channel per group normalizes each channel over the whole time axis: not length-local.
* ``"layer"`` (wav2vec2-large-lv60, XLS-R): LayerNorm over channels after every convolution,
  per time step: length-local.

Submodule names follow transformers (``conv_layers.{i}.conv``, ``conv_layers.{i}.layer_norm``), so a
pretrained ``feature_extractor`` state dict loads unchanged.

Input (batch, samples) raw 16 kHz audio (the model adds the channel axis), output
(batch, 512, frames) with frames = floor((samples - 400) / 320) + 1; samples >= 400.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from convmem.zoo._workload import Workload, mean_square, normal

__all__ = ["Wav2Vec2ConvLayer", "Wav2Vec2FeatureEncoder", "WORKLOAD"]

_KERNELS = (10, 3, 3, 3, 3, 2, 2)
_STRIDES = (5, 2, 2, 2, 2, 2, 2)
_NORMS = ("group", "layer")


class Wav2Vec2ConvLayer(nn.Module):
    """Conv1d (no bias) -> optional norm -> GELU; x: (batch, in_channels, length).

    norm: None, "group" (GroupNorm with one group per channel) or "layer" (LayerNorm over channels).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: Optional[str]
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, bias=False)
        self.norm = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(out_channels, out_channels, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_channels, elementwise_affine=True)
        elif norm is not None:
            raise ValueError(f"norm must be one of {_NORMS} or None, got {norm!r}")
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm == "group":
            x = self.layer_norm(x)
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(-2, -1)).transpose(-2, -1)
        return self.activation(x)


class Wav2Vec2FeatureEncoder(nn.Module):
    """audio: (batch, samples) -> features (batch, 512, frames); samples >= 400.

    Example::

        >>> Wav2Vec2FeatureEncoder()(torch.randn(2, 16000)).shape
        torch.Size([2, 512, 49])
    """

    def __init__(self, norm: str = "group", channels: int = 512) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        layers = []
        in_channels = 1
        for i, (kernel_size, stride) in enumerate(zip(_KERNELS, _STRIDES)):
            layer_norm = norm if norm == "layer" or i == 0 else None
            layers.append(Wav2Vec2ConvLayer(in_channels, channels, kernel_size, stride, layer_norm))
            in_channels = channels
        self.conv_layers = nn.Sequential(*layers)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.conv_layers(audio.unsqueeze(1))


WORKLOAD = Workload(
    name="w2v2_fe",
    model_cls=Wav2Vec2FeatureEncoder,
    default_shape=(8, 320000),
    small_shape=(2, 3200),
    make_input=normal,
    loss_fn=mean_square,
    blocks="conv_layers",
    description="wav2vec 2.0 feature encoder: 7 bias-free 512-channel convs, stride 320, GELU",
    sample_rate=16000,
    min_length=400,
)
