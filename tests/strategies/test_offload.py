"""convmem.offload_: exact on zoo models, one shared group, what it wraps and skips, OffloadConfig, restore_."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import convmem
from _compare import assert_same_step
from convmem import zoo
from convmem.nn import Checkpointed, Offloaded
from convmem.nn._wrapper import restore_, wrapper_state
from convmem.strategies.offload import OffloadConfig, offload_

ZOO_LENGTHS = {"tcn": 128, "wavenet": 128, "resnet1d": 256, "conformer_conv": 32, "w2v2_fe": 800}


def _on_cpu(model: nn.Module, record_events: bool = True) -> nn.Module:
    """Make the wrappers copy CPU tensors too: NOTE [Offloading CPU tensors in tests]."""
    for module in model.modules():
        if isinstance(module, Offloaded):
            module._offload_cpu_tensors = True
            module.group.record_events = record_events
    return model


def _group(model: nn.Module):
    groups = {id(m.group): m.group for m in model.modules() if isinstance(m, Offloaded)}
    assert len(groups) == 1
    return next(iter(groups.values()))


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", list(ZOO_LENGTHS))
def test_zoo_models_are_exact(name):
    entry = zoo.get(name, dtype=torch.float64, length=ZOO_LENGTHS[name])
    optimized = _on_cpu(offload_(copy.deepcopy(entry.model), min_bytes=0))
    assert sorted(wrapper_state(optimized)) == sorted(entry.blocks)
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in entry.model.modules())
    assert_same_step(entry.model, optimized, entry.inputs, entry.loss_fn, steps=3 if batchnorm else 1)
    group = _group(optimized)
    assert group.bytes_offloaded > 0 and group.bytes_restored >= group.bytes_offloaded
    assert not [e for e in group.events if e[0] == "fetch"], group.events  # all prefetched


def test_state_dict_keys_unchanged_and_restore():
    entry = zoo.get("tcn", dtype=torch.float64, length=64)
    keys = list(entry.model.state_dict())
    blocks = [entry.model.get_submodule(n) for n in entry.blocks]
    offload_(entry.model)
    assert list(entry.model.state_dict()) == keys
    entry.model.load_state_dict(copy.deepcopy(entry.model.state_dict()))
    assert restore_(entry.model) is entry.model
    assert [entry.model.get_submodule(n) for n in entry.blocks] == blocks
    assert not wrapper_state(entry.model)


def test_filter_fn_and_a_second_call_join_one_group():
    entry = zoo.get("tcn", dtype=torch.float64, length=64)
    first, second = entry.blocks[0], entry.blocks[1]
    offload_(entry.model, filter_fn=lambda m, fqn: fqn == first)
    offload_(entry.model, filter_fn=lambda m, fqn: fqn == second, min_bytes=0)
    assert sorted(wrapper_state(entry.model)) == sorted([first, second])
    assert entry.model.get_submodule(second).min_bytes == 0
    _group(entry.model)


def test_checkpointed_blocks_are_offloaded_and_exact():
    entry = zoo.get("resnet1d", dtype=torch.float64, length=256)
    optimized = convmem.checkpoint_(copy.deepcopy(entry.model))
    _on_cpu(offload_(optimized, min_bytes=0))
    state = wrapper_state(optimized)
    assert {n for n, kind in state.items() if kind == "Offloaded"} == set(entry.blocks)
    assert all(isinstance(optimized.get_submodule(n).wrapped, Checkpointed) for n in entry.blocks)
    assert_same_step(entry.model, optimized, entry.inputs, entry.loss_fn, steps=2)
    assert _group(optimized).bytes_offloaded > 0


def test_skips_what_it_cannot_wrap():
    entry = zoo.get("tcn", dtype=torch.float64, length=64)
    offload_(entry.model)
    _, messages = _caught(lambda: offload_(entry.model))
    assert any("already offloaded" in m for m in messages)
    model = nn.Sequential(Checkpointed(nn.Sequential(nn.Conv1d(2, 2, 1))))
    _, messages = _caught(lambda: offload_(model, filter_fn=lambda m, fqn: fqn in ("", "0.wrapped.0")))
    assert any("<root>" in m for m in messages)
    _, messages = _caught(lambda: offload_(model, filter_fn=lambda m, fqn: fqn == "0.wrapped.0"))
    assert any("inside a convmem Checkpointed" in m for m in messages)
    assert not any(isinstance(m, Offloaded) for m in model.modules())


def test_nothing_selected_warns_and_changes_nothing():
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.ReLU(), nn.Conv1d(2, 2, 3))
    _, messages = _caught(lambda: offload_(model))
    assert any("found no repeated blocks" in m for m in messages)
    _, messages = _caught(lambda: offload_(model, filter_fn=lambda m, fqn: False))
    assert any("selected no module" in m for m in messages)
    assert not wrapper_state(model)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"min_bytes": -1}, ValueError, "min_bytes"),
    ({"min_bytes": 1.5}, ValueError, "min_bytes"),
    ({"prefetch": -1}, ValueError, "prefetch"),
    ({"filter_fn": "blocks"}, TypeError, "filter_fn"),
])
def test_bad_arguments_raise_before_any_change(kwargs, error, match):
    entry = zoo.get("tcn", dtype=torch.float64, length=64)
    with pytest.raises(error, match=match):
        offload_(entry.model, **kwargs)
    assert not wrapper_state(entry.model)
    with pytest.raises(TypeError, match="nn.Module"):
        offload_("model")


def test_config_round_trips_and_validates():
    config = OffloadConfig(min_bytes=0, prefetch=2)
    assert OffloadConfig.from_dict(config.to_dict()) == config
    assert OffloadConfig().to_dict() == {"min_bytes": 2**20, "prefetch": 1}
    with pytest.raises(ValueError, match="unknown keys"):
        OffloadConfig.from_dict({"min_bytes": 0, "depth": 1})
    with pytest.raises(ValueError, match="min_bytes"):
        OffloadConfig(min_bytes=True)
    assert convmem.offload_ is offload_ and convmem.OffloadConfig is OffloadConfig
    assert {"offload_", "OffloadConfig"} <= set(convmem.__all__)
