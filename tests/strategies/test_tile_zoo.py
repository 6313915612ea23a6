"""Tiling every local zoo model: outputs, every gradient and buffers equal the untouched model (float64).

The architectures are the zoo's (receptive fields, strides, dilations, residual and skip structure,
upsampling); widths are cut so that inputs several receptive fields long, in several tiles, run
forward and backward on a CPU in seconds. BatchNorm models run in eval mode (local); train mode is
refused, naming the BatchNorm.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from _compare import assert_same_step, twin
from convmem import zoo
from convmem.analysis import receptive_field
from convmem.nn.tiled import Tiled
from convmem.strategies.tile import tile_

# name, model kwargs (narrow widths), input length, tile length (in the model's input samples)
CASES = [
    ("tcn", {"channels": 16}, 1300, 256),
    ("wavenet", {"residual_channels": 8, "gate_channels": 16, "skip_channels": 8, "classes": 16}, 4500, 1000),
    ("hifigan", {"upsample_initial_channel": 32}, 40, 6),
    ("w2v2_fe", {"norm": "layer", "channels": 16}, 4000, 960),
    ("conformer_conv", {"channels": 16}, 1200, 200),
    ("basenji", {"targets": 3, "stem_channels": 8, "tower_init": 8, "tower_mult": 1.2, "bottleneck": 8,
                 "num_residual": 4, "head_channels": 8}, 9000, 1024),
]


def _entry(name, kwargs, length):
    entry = zoo.get(name, batch=1, length=length, dtype=torch.float64, **kwargs)
    entry.model.eval()  # BatchNorm: local in eval mode only
    return entry


@pytest.mark.parametrize("name, kwargs, length, tile", CASES, ids=[c[0] for c in CASES])
def test_whole_zoo_model_tiled_equals_untiled(name, kwargs, length, tile):
    entry = _entry(name, kwargs, length)
    tiled = Tiled(twin(entry.model), tile, name=name)
    assert_same_step(entry.model, tiled, entry.inputs, entry.loss_fn)
    assert tiled.last_windows >= 3, "the test must exercise tiling"


def test_resnet1d_eval_tiles_its_local_part():
    """Global average pooling makes ResNet1d non-local as a whole: tile_ wraps the stem and the blocks."""
    entry = zoo.get("resnet1d", batch=2, length=3000, dtype=torch.float64, widths=(8, 16, 16, 16))
    entry.model.eval()
    optimized = tile_(twin(entry.model), 512, example_inputs=entry.inputs)
    tiled = {name: m for name, m in optimized.named_modules() if isinstance(m, Tiled)}
    assert sorted(tiled) == ["blocks", "stem"]
    assert_same_step(entry.model, optimized, entry.inputs, entry.loss_fn)
    assert tiled["stem"].last_windows >= 3


@pytest.mark.parametrize("name", ["resnet1d", "conformer_conv", "basenji"])
def test_train_mode_batch_norm_is_refused_by_name(name):
    entry = zoo.get(name, size="small", device="meta")
    entry.model.train()
    rf = receptive_field(entry.model, entry.inputs[0])
    assert not rf.local and rf.module_type == "BatchNorm1d" and "train mode" in rf.reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tile_(entry.model, 1024)
    assert any("nothing in" in str(w.message) and "BatchNorm" in str(w.message) for w in caught)
    assert not any(isinstance(m, Tiled) for m in entry.model.modules())


@pytest.mark.parametrize("name, kwargs", [("w2v2_fe", {"norm": "layer"}), ("wavenet", {})])
def test_full_width_small_entry_through_tile_(name, kwargs):
    """The zoo's own models (full width, small input) through tile_ with example inputs."""
    entry = zoo.get(name, dtype=torch.float64, **kwargs)
    optimized = tile_(twin(entry.model), 640, example_inputs=entry.inputs)
    assert any(isinstance(m, Tiled) for m in optimized.modules())
    assert_same_step(entry.model, optimized, entry.inputs, entry.loss_fn)
