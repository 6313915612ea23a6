"""How an architecture file describes its workload to `convmem.zoo.get`.

Each architecture module defines one `Workload`: the model class, the input shapes of its sizes, how
realistic inputs are drawn, and the training loss. `convmem.zoo.get` turns it into a `ZooEntry`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

Shape = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Workload:
    """One zoo architecture.

    `default_shape` is the WORKLOADS.md input; `small_shape` is the CPU test input (same model,
    shorter input). `make_input(shape, generator)` draws a float32 CPU tensor. `blocks` is the
    qualified name of the container of the repeated blocks; the entry's `chain` is that name when
    the container is an `nn.Sequential`. `min_length` is the shortest input the model accepts.
    `channels_kwarg` names the model keyword, if any, that sets the input's channel count.
    """

    name: str
    model_cls: Type[nn.Module]
    default_shape: Shape
    small_shape: Shape
    make_input: Callable[[Shape, torch.Generator], torch.Tensor]
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    blocks: str
    description: str
    sample_rate: Optional[int] = None
    min_length: int = 1
    channels_kwarg: Optional[str] = None


# ---------------------------------------------------------------------------------------- inputs


def normal(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance noise: normalized audio (wav2vec 2.0 normalizes its input), ECG, features."""
    return torch.randn(shape, generator=generator)


def log_mel(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """Log-magnitude mel frames in the range HiFi-GAN sees: log(clamp(mel, 1e-5)) >= -11.5."""
    return (torch.randn(shape, generator=generator) * 2.0 - 5.0).clamp_min(math.log(1e-5))


def one_hot_dna(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """(batch, 4, length) one-hot bases (A, C, G, T), as float."""
    batch, channels, length = shape
    bases = torch.randint(channels, (batch, length), generator=generator)
    return F.one_hot(bases, channels).transpose(1, 2).float().contiguous()


# ---------------------------------------------------------------------------------------- losses


def mean_square(output: torch.Tensor) -> torch.Tensor:
    """Regression loss for outputs without a natural target."""
    return output.square().mean()


def cross_entropy_cyclic_target(output: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (batch, classes, ...) against the fixed target arange % classes.

    The target is built on `output.device` from the output's shape alone, so the loss is
    deterministic and moves with the entry (meta included).
    """
    classes = output.shape[1]
    target_shape = (output.shape[0],) + tuple(output.shape[2:])
    target = torch.arange(math.prod(target_shape), device=output.device) % classes
    return F.cross_entropy(output, target.reshape(target_shape))
