"""convmem.strategies.tile: TileConfig, and tile_ choosing, wrapping and refusing modules."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from _compare import assert_same_step, twin
from convmem.nn._wrapper import restore_
from convmem.nn.tiled import Tiled
from convmem.strategies.tile import TileConfig, tile_


def _block(channels=4):
    return nn.Sequential(nn.Conv1d(channels, channels, 5, padding=2), nn.GELU(), nn.Conv1d(channels, channels, 3, padding=1))


class _Net(nn.Module):
    """stem -> local body -> GroupNorm (not local) -> local tail -> global pooling head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 4, 1)
        self.body = nn.Sequential(_block(), _block())
        self.norm = nn.GroupNorm(1, 4)
        self.tail = _block()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.tail(self.norm(self.body(self.stem(x))))
        return self.head(y.mean(-1))


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------ config


def test_config_round_trips_and_validates():
    config = TileConfig(4096, length_axis=1, verify=False)
    assert TileConfig.from_dict(config.to_dict()) == config
    assert config.to_dict() == {"tile_length": 4096, "length_axis": 1, "verify": False,
                                "forward_tile_length": None, "batch_chunk": None, "cuda_graphs": False}
    config = TileConfig(4096, forward_tile_length=32768, batch_chunk=1, cuda_graphs=True)
    assert TileConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="tile_: cuda_graphs must be True or False"):
        TileConfig(4096, cuda_graphs=1)
    with pytest.raises(ValueError, match="tile_: forward_tile_length 2048 is shorter than tile_length 4096"):
        TileConfig(4096, forward_tile_length=2048)
    with pytest.raises(ValueError, match="tile_: batch_chunk must be None or a positive integer"):
        TileConfig(4096, batch_chunk=0)
    for bad in (0, -1, 1.5, "4096", True):
        with pytest.raises(ValueError, match="tile_length must be a positive integer"):
            TileConfig(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        TileConfig.from_dict({"tile_length": 8, "halo": 3})
    with pytest.raises(ValueError, match="length_axis"):
        TileConfig(8, length_axis="time")
    with pytest.raises(AttributeError):
        config.tile_length = 8  # frozen


# ---------------------------------------------------------------------------------------------- choosing


@pytest.mark.parametrize("with_inputs", [False, True])
def test_wraps_the_largest_local_submodules(with_inputs):
    model = _Net().double()
    x = torch.randn(2, 2, 300, dtype=torch.float64)
    optimized, messages = _caught(lambda: tile_(twin(model), 64, example_inputs=(x,) if with_inputs else None))
    assert not messages
    assert sorted(n for n, m in optimized.named_modules() if isinstance(m, Tiled)) == ["body", "tail"]
    assert list(optimized.state_dict()) == list(model.state_dict())
    assert_same_step(model, optimized, (x,))
    assert optimized.body.last_windows == 5
    assert not any(isinstance(m, Tiled) for m in restore_(optimized).modules())


def test_returns_the_same_model_object_and_skips_tiled_modules():
    model = _Net()
    assert tile_(model, 64) is model
    first = model.body
    tile_(model, 32)
    assert model.body is first and model.body.tile_length == 64  # not tiled twice


def test_filter_fn_picks_and_non_local_picks_warn_by_name():
    model = _Net()
    picked = {"body.0", "norm", "head"}
    _, messages = _caught(lambda: tile_(model, 64, filter_fn=lambda m, name: name in picked,
                                        example_inputs=torch.randn(1, 2, 100)))
    assert isinstance(model.body[0], Tiled) and not isinstance(model.norm, Tiled)
    assert any("'norm'" in m and "GroupNorm" in m for m in messages)
    assert any("'head'" in m and "not length-local" in m for m in messages)


def test_the_root_is_not_replaced_in_place():
    model = _block()
    _, messages = _caught(lambda: tile_(model, 64, filter_fn=lambda m, name: name == ""))
    assert not isinstance(model, Tiled)
    assert any("root" in m and "convmem.nn.Tiled(model, tile_length)" in m for m in messages)


def test_nothing_to_tile_warns_naming_the_model():
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.GroupNorm(1, 2), nn.Conv1d(2, 2, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, messages = _caught(lambda: tile_(model, 64))
    assert any("nothing in Sequential can be tiled" in m and "GroupNorm" in m for m in messages)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bad_arguments_raise_before_anything_changes():
    model = _Net()
    with pytest.raises(ValueError, match="tile_length"):
        tile_(model, 0)
    with pytest.raises(TypeError, match="filter_fn"):
        tile_(model, 8, filter_fn="body")
    with pytest.raises(TypeError, match="nn.Module"):
        tile_(lambda x: x, 8)
    assert not any(isinstance(m, Tiled) for m in model.modules())


class _HiddenMean(nn.Module):
    """Local by its layer types, not by its forward: only the analysis (or the first call) can tell."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(2, 2, 3, padding=1), nn.Conv1d(2, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y - y.mean(-1, keepdim=True))


def test_functional_non_locality_is_found_with_inputs_or_at_the_first_call():
    x = torch.randn(1, 2, 100)
    model = nn.Sequential(_HiddenMean(), nn.Conv1d(2, 2, 1))
    _, messages = _caught(lambda: tile_(model, 16, example_inputs=x))
    assert not isinstance(model[0], Tiled) and any("nothing in Sequential" in m for m in messages)

    model = nn.Sequential(_HiddenMean(), nn.Conv1d(2, 2, 1))
    tile_(model, 16)  # no inputs: the layer types look local
    assert isinstance(model[0], Tiled)
    with pytest.warns(UserWarning, match="cannot tile 0: .*reduction over the time axis.*runs untiled"):
        y = model(x)
    assert torch.equal(y, restore_(model)(x))


@pytest.mark.parametrize("order", ["checkpoint_ then tile_", "tile_ then checkpoint_"])
def test_composes_with_checkpoint_(order):
    from convmem import zoo
    from convmem.strategies.checkpoint import checkpoint_

    entry = zoo.get("tcn", batch=1, length=1300, dtype=torch.float64, channels=8)
    optimized = twin(entry.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # checkpoint_ names the blocks inside Tiled it leaves alone
        if order.startswith("checkpoint_"):
            tile_(checkpoint_(optimized), 256)
        else:
            checkpoint_(tile_(optimized, 256))
    assert isinstance(optimized.blocks, Tiled)
    assert_same_step(entry.model, optimized, entry.inputs, entry.loss_fn)
    assert optimized.blocks.last_windows == 6


def test_forward_windows_and_batch_chunks_reach_every_tiled_module():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 1),
        nn.Sequential(nn.Conv1d(4, 4, 5, padding=2), nn.GELU(), nn.Conv1d(4, 4, 3, padding=1)),
        nn.AdaptiveAvgPool1d(1),
    ).double()
    reference = twin(model)
    tile_(model, TileConfig(16, forward_tile_length=64, batch_chunk=1, cuda_graphs=True))
    tiled = [m for m in model.modules() if isinstance(m, Tiled)]
    assert tiled and all(m.forward_tile_length == 64 and m.batch_chunk == 1 and m.graphs is not None for m in tiled)
    assert_same_step(reference, model, (torch.randn(3, 2, 150, dtype=torch.float64),), tol=1e-10)
    assert tiled[0].last_windows == 10 and tiled[0].last_forward_windows == 3
