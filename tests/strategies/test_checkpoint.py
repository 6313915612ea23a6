"""convmem.checkpoint_: exact on every zoo model and on models in other styles, segments balanced by
kept bytes, state_dict and restore_, autocast and torch.compile, and bad input."""
from __future__ import annotations

import copy
import itertools
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from _compare import assert_same_step
from convmem import zoo
from convmem.nn._wrapper import restore_, unwrap, wrapper_state
from convmem.nn.checkpointed import Checkpointed, selective_available
from convmem.nn.tiled import Tiled
from convmem.profile import estimate_step
from convmem.strategies._blocks import find_blocks
from convmem.strategies.checkpoint import CheckpointConfig, checkpoint_, plan_segments
from convmem.strategies.tile import tile_

needs_selective = pytest.mark.skipif(not selective_available(), reason="selective checkpointing needs PyTorch >= 2.5")
POLICIES = ["full", pytest.param("selective", marks=needs_selective)]

# Short inputs: every zoo model's float64 step in well under a second on one core.
ZOO_LENGTHS = {"tcn": 128, "wavenet": 128, "w2v2_fe": 800, "convtasnet": 160, "hifigan": 2,
               "resnet1d": 256, "conformer_conv": 32, "basenji": 256}
ZOO_CHAINS = ["tcn", "w2v2_fe", "resnet1d", "conformer_conv", "basenji"]  # blocks in an nn.Sequential


def _zoo(name: str) -> zoo.ZooEntry:
    return zoo.get(name, dtype=torch.float64, length=ZOO_LENGTHS[name])


def _steps(model: nn.Module) -> int:
    # Three steps where running statistics accumulate, so that a second update per step shows.
    return 3 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1


def test_zoo_lengths_cover_the_zoo():
    assert set(ZOO_LENGTHS) == set(zoo.names())


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(ZOO_LENGTHS))
def test_zoo_models_are_exact(name, policy):
    entry = _zoo(name)
    optimized = checkpoint_(copy.deepcopy(entry.model), policy=policy)
    assert sorted(wrapper_state(optimized)) == sorted(entry.blocks)  # the blocks the zoo names
    assert_same_step(entry.model, optimized, entry.inputs, entry.loss_fn, steps=_steps(entry.model))


@pytest.mark.parametrize("name", ZOO_CHAINS)
def test_zoo_chains_segmented_by_kept_bytes_are_exact(name):
    entry = _zoo(name)
    optimized = checkpoint_(copy.deepcopy(entry.model), example_inputs=entry.inputs)
    state = wrapper_state(optimized)
    # Either the chain as segments, or (where grouping would not lower the peak) every block.
    assert state == {entry.chain: "Checkpointed"} or sorted(state) == sorted(entry.blocks), state
    assert_same_step(entry.model, optimized, entry.inputs, entry.loss_fn, steps=_steps(entry.model))


def test_segments_only_where_they_lower_the_peak():
    # tcn's 16 equal blocks: pairs keep 8 inputs instead of 16 at the same recompute size.
    entry = zoo.get("tcn", size="default", device="meta")
    checkpoint_(entry.model, example_inputs=entry.inputs)
    assert entry.model.blocks.segments == (2,) * 8
    # wav2vec 2.0's encoder and Basenji's trunk: the first, longest block sets the backward peak
    # whatever the later ones do, so each block stays its own segment (Basenji's grouped split
    # measured 0.94 MiB above that on an H200).
    for name, chain in (("w2v2_fe", "conv_layers"), ("basenji", "trunk")):
        entry = zoo.get(name, size="default", device="meta")
        checkpoint_(entry.model, example_inputs=entry.inputs)
        assert type(entry.model.get_submodule(chain)).__name__ != "Checkpointed"


def test_segment_cost_is_the_backward_peak_of_the_chain():
    from convmem.strategies.checkpoint import _segment_cost

    kept, inputs = [3] * 8, [1] * 8
    assert _segment_cost(kept, inputs, (1,) * 8) == 10  # the last block recomputes with 7 inputs kept
    assert _segment_cost(kept, inputs, (2,) * 4) == 9  # the last pair with 3
    kept, inputs = [800, 100, 100, 100], [0, 50, 50, 50]
    assert _segment_cost(kept, inputs, (1, 1, 1, 1)) == _segment_cost(kept, inputs, (1, 3)) == 800  # block 0 sets it


@needs_selective
@pytest.mark.parametrize("name", ["tcn", "wavenet", "convtasnet", "conformer_conv"])
def test_selective_peak_lies_between_untouched_and_full(name):
    # Estimated on the meta device at the default size. Keeping every conv output would keep more
    # than the untouched model for tcn and wavenet (NOTE [Selective recompute]).
    entry = zoo.get(name, size="default", device="meta")
    peaks = {}
    for policy in (None, "selective", "full"):
        model = copy.deepcopy(entry.model)
        if policy is not None:
            checkpoint_(model, policy=policy)
        peaks[policy] = estimate_step(model, entry.inputs, entry.loss_fn).peak_bytes
    assert peaks[None] > peaks["selective"] > peaks["full"], peaks


# ----------------------------------------------------------------------------- other styles


class Snake(nn.Module):
    """A custom activation with a parameter: x + sin(alpha x)^2 / alpha (BigVGAN)."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(1, channels, 1))

    def forward(self, x):
        return x + torch.sin(self.alpha * x).pow(2) / self.alpha


class Swish(nn.Module):
    """A parameter-free custom activation."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class FunctionalBlock(nn.Module):
    """Its own parameters, used through functional calls: causal F.pad, F.conv1d, F.gelu."""

    def __init__(self, channels, dilation):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3) / (3 * channels) ** 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)
        self.dilation = dilation

    def forward(self, x):
        y = F.conv1d(F.pad(x, (2 * self.dilation, 0)), self.weight, self.bias, dilation=self.dilation)
        return x + F.gelu(y)


class FunctionalNet(nn.Module):
    """Blocks held as attributes, not in a container."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 1)
        self.block1, self.block2, self.block3 = (FunctionalBlock(8, d) for d in (1, 2, 4))
        self.head = nn.Conv1d(8, 1, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in (self.block1, self.block2, self.block3):
            x = block(x)
        return self.head(x)


class WeightNormBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = weight_norm(nn.Conv1d(channels, channels, 5, padding=2))
        self.act = Snake(channels)
        self.conv2 = weight_norm(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class WeightNormNet(nn.Module):
    """weight_norm parametrizations and a custom activation, blocks in an nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.stem = weight_norm(nn.Conv1d(2, 8, 3, padding=1))
        self.blocks = nn.Sequential(*(WeightNormBlock(8) for _ in range(3)))
        self.head = nn.Conv1d(8, 1, 1)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class ConvBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x):
        return x + F.relu(self.norm(self.conv(x)))


class SharedNet(nn.Module):
    """One block called twice and registered under two names, after a ModuleList of blocks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 1)
        self.blocks = nn.ModuleList(ConvBlock(8) for _ in range(2))
        self.shared = ConvBlock(8)
        self.again = self.shared

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.again(self.shared(x))


class PoolBlock(nn.Module):
    """Parameter-free modules inside a block: a custom activation, max pooling, an identity."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, 3, padding=1)
        self.act = Swish()
        self.pool = nn.MaxPool1d(2)
        self.skip = nn.Identity()

    def forward(self, x):
        return self.skip(self.pool(self.act(self.conv(x))))


class Center(nn.Module):
    """A parameter-free custom module between blocks."""

    def forward(self, x):
        return x - x.mean(-1, keepdim=True)


class ParamFreeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(PoolBlock(2, 8), Center(), PoolBlock(8, 8), Center(), PoolBlock(8, 8))

    def forward(self, x):
        return self.layers(x)


class MultiBranch(nn.Module):
    """Nested container inside a block: a ModuleList of branches mixed by a 1x1 conv."""

    def __init__(self, channels):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv1d(channels, channels, k, padding=k // 2) for k in (3, 5))
        self.mix = nn.Conv1d(2 * channels, channels, 1)

    def forward(self, x):
        return x + self.mix(torch.cat([F.gelu(branch(x)) for branch in self.branches], dim=1))


class NestedNet(nn.Module):
    """A ModuleDict of Sequentials of blocks that hold ModuleLists."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 1)
        self.stages = nn.ModuleDict(
            {"low": nn.Sequential(*(MultiBranch(8) for _ in range(2))),
             "high": nn.Sequential(*(MultiBranch(8) for _ in range(3)))}
        )

    def forward(self, x):
        x = self.stages["low"](self.stem(x))
        return self.stages["high"](F.avg_pool1d(x, 2))


class PlainChain(nn.Module):
    """No blocks: a strided Sequential of plain layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 16, 9, stride=4), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 16, 3, stride=2), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 16, 3), nn.BatchNorm1d(16), nn.ReLU(),
        )
        self.head = nn.Conv1d(16, 1, 1)

    def forward(self, x):
        return self.head(self.features(x))


class DropoutBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm1d(channels)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x):
        return x + F.dropout(self.dropout(F.gelu(self.norm(self.conv(x)))), 0.2, self.training)


class DropoutNet(nn.Module):
    """Dropout (a module and a functional call) and BatchNorm in every block; seeds its forward so
    that two copies draw the same masks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 1)
        self.blocks = nn.Sequential(*(DropoutBlock(8) for _ in range(3)))

    def forward(self, x):
        torch.manual_seed(1234)
        return self.blocks(self.stem(x))


def _is(cls):
    return lambda module, name: isinstance(module, cls)


# (model class, filter_fn, example inputs?, the wrappers expected)
STYLES = {
    "functional": (FunctionalNet, None, False, {"block1", "block2", "block3"}),
    "weight_norm": (WeightNormNet, None, False, {"blocks.0", "blocks.1", "blocks.2"}),
    "weight_norm_segments": (WeightNormNet, None, True, {"blocks"}),
    "used_twice": (SharedNet, _is(ConvBlock), False, {"blocks.0", "blocks.1", "shared"}),
    "parameter_free": (ParamFreeNet, None, False, {"layers.0", "layers.2", "layers.4"}),
    "parameter_free_segments": (ParamFreeNet, None, True, {"layers"}),
    "parameter_free_selected": (ParamFreeNet, _is(Center), False, {"layers.1", "layers.3"}),
    "nested": (NestedNet, None, False, {f"stages.low.{i}" for i in range(2)} | {f"stages.high.{i}" for i in range(3)}),
    "nested_segments": (NestedNet, None, True, {"stages.low", "stages.high"}),
    "plain_chain_segments": (PlainChain, None, True, {"features"}),
    "dropout": (DropoutNet, None, False, {"blocks.0", "blocks.1", "blocks.2"}),
}


def _model(cls) -> nn.Module:
    torch.manual_seed(0)
    return cls().double()


def _input(length=48) -> torch.Tensor:
    return torch.randn(3, 2, length, dtype=torch.float64, generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("style", list(STYLES))
def test_other_styles_are_exact(style, policy):
    cls, filter_fn, with_inputs, expected = STYLES[style]
    model, x = _model(cls), _input()
    inputs = (x,) if with_inputs else None
    optimized = checkpoint_(copy.deepcopy(model), filter_fn, policy=policy, example_inputs=inputs)
    if policy == "selective" and with_inputs and cls is not PlainChain:
        # Blocks are their own segments under "selective" (NOTE [Segments balanced by kept bytes]).
        expected = {f"{chain}.{i}" for chain in expected for i, item in enumerate(optimized.get_submodule(chain))
                    if next(item.parameters(), None) is not None}
    per_block = {f"{chain}.{i}" for chain in expected if isinstance(optimized.get_submodule(chain), nn.Sequential)
                 for i, item in enumerate(optimized.get_submodule(chain)) if next(item.parameters(), None) is not None}
    # A chain is split into segments only where that lowers its peak (`_SEGMENTS_PAY`); these
    # three-block chains may stay one block per segment.
    assert set(wrapper_state(optimized)) in (expected, per_block or expected)
    assert_same_step(model, optimized, [x], steps=3)


def test_a_module_used_twice_is_wrapped_under_both_names():
    model = checkpoint_(_model(SharedNet), _is(ConvBlock))
    assert isinstance(model.shared, Checkpointed) and model.again is model.shared
    assert "again.conv.weight" in model.state_dict()


class CausalConv1d(nn.Conv1d):
    """A subclass of a PyTorch layer: a layer, not a block."""

    def forward(self, x):
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class ConvNormAct(nn.Sequential):
    """A subclass of a container that groups layers: a block."""

    def __init__(self, channels):
        super().__init__(nn.Conv1d(channels, channels, 3, padding=1), nn.BatchNorm1d(channels), nn.ReLU())


class Stages(nn.Module):
    """torchvision-style stages: each a Sequential of blocks, of different lengths."""

    def __init__(self):
        super().__init__()
        self.stem = ConvNormAct(4)
        self.layer1 = nn.Sequential(ConvBlock(4), ConvBlock(4))
        self.layer2 = nn.Sequential(ConvBlock(4), ConvBlock(4), ConvBlock(4))
        self.head = nn.Sequential(CausalConv1d(4, 4, 3), CausalConv1d(4, 4, 3))


def test_find_blocks_rules():
    # Stages with the same kind of block are one group; the stem's block stays out.
    assert find_blocks(Stages()) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer2.2"]
    # Subclasses of PyTorch layers are layers; of containers, blocks.
    assert find_blocks(nn.Sequential(CausalConv1d(4, 4, 3), CausalConv1d(4, 4, 3))) == []
    assert find_blocks(nn.ModuleDict({"a": nn.Sequential(ConvNormAct(4), ConvNormAct(4))})) == ["a.0", "a.1"]
    # Wrapped blocks are still found (so that a second checkpoint_ can say they are wrapped).
    assert find_blocks(checkpoint_(Stages())) == find_blocks(Stages())


def test_without_example_inputs_a_plain_chain_is_left_alone():
    model = _model(PlainChain)
    with pytest.warns(UserWarning, match="no repeated blocks in PlainChain.*example_inputs"):
        checkpoint_(model)
    assert wrapper_state(model) == {}


# ------------------------------------------------------------------ state_dict, restore_, calls


def test_state_dict_round_trips_between_original_and_optimized():
    original = _model(WeightNormNet)
    optimized = checkpoint_(copy.deepcopy(original), example_inputs=_input())
    assert list(optimized.state_dict()) == list(original.state_dict())
    with torch.no_grad():
        for p in optimized.parameters():
            p.add_(0.5)
    fresh = _model(WeightNormNet)
    fresh.load_state_dict(optimized.state_dict())
    for key, value in optimized.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    optimized.load_state_dict(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(optimized.state_dict()[key], value), key


def test_restore_gives_back_the_original_modules():
    model = _model(SharedNet)
    before = dict(model.named_modules(remove_duplicate=False))
    checkpoint_(model, _is(ConvBlock))
    assert restore_(model) is model
    after = dict(model.named_modules(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[name] is module for name, module in before.items())


def test_checkpointing_twice_wraps_once():
    model = checkpoint_(_model(WeightNormNet))
    with pytest.warns(UserWarning, match="already checkpointed"):
        checkpoint_(model)
    assert set(wrapper_state(model)) == {"blocks.0", "blocks.1", "blocks.2"}


@pytest.mark.parametrize("policy", POLICIES)
def test_composes_with_tiling(policy):
    model = _model(WeightNormNet)
    optimized = tile_(copy.deepcopy(model), 16, _is(WeightNormBlock))
    with pytest.warns(UserWarning, match="inside a convmem Tiled; checkpoint the wrapper instead"):
        checkpoint_(optimized, _is(WeightNormBlock), policy=policy)  # the blocks inside the Tiled wrappers
    assert set(wrapper_state(optimized).values()) == {"Tiled"}
    checkpoint_(optimized, lambda module, name: isinstance(unwrap(module), WeightNormBlock), policy=policy)
    assert all(isinstance(optimized.blocks[i], Checkpointed) and isinstance(optimized.blocks[i].wrapped, Tiled)
               for i in range(3))
    assert_same_step(model, optimized, [_input()], steps=2)
    restore_(optimized)
    assert wrapper_state(optimized) == {} and all(isinstance(block, WeightNormBlock) for block in optimized.blocks)


# --------------------------------------------------------------------------------- bad input


def _unchanged(model: nn.Module, reference: nn.Module) -> bool:
    state, expected = model.state_dict(), reference.state_dict()
    return wrapper_state(model) == {} and state.keys() == expected.keys() and all(
        torch.equal(state[k], expected[k]) for k in state
    )


def test_filter_selecting_nothing_warns_naming_the_model():
    model = _model(WeightNormNet)
    with pytest.warns(UserWarning, match="filter_fn selected no module of WeightNormNet"):
        assert checkpoint_(model, lambda module, name: False) is model
    assert _unchanged(model, _model(WeightNormNet))


def test_bad_policy_is_a_clear_error_and_leaves_the_model_alone():
    model = _model(WeightNormNet)
    with pytest.raises(ValueError, match=r"policy must be one of \('full', 'selective'\), got 'fast'"):
        checkpoint_(model, policy="fast")
    assert _unchanged(model, _model(WeightNormNet))


@pytest.mark.parametrize(
    "kwargs, error",
    [({"filter_fn": "blocks"}, TypeError), ({"example_inputs": "x"}, TypeError), ({"example_inputs": ()}, TypeError)],
)
def test_bad_arguments_raise_before_anything_changes(kwargs, error):
    model = _model(WeightNormNet)
    with pytest.raises(error):
        checkpoint_(model, **kwargs)
    assert _unchanged(model, _model(WeightNormNet))


def test_the_root_cannot_be_wrapped_in_place():
    model = _model(WeightNormNet)
    with pytest.warns(UserWarning, match="root WeightNormNet cannot be replaced in place"):
        checkpoint_(model, lambda module, name: name == "")
    assert wrapper_state(model) == {}


def test_config_validates_and_round_trips():
    config = CheckpointConfig(policy="selective")
    assert CheckpointConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="policy must be one of"):
        CheckpointConfig(policy="sometimes")
    with pytest.raises(ValueError, match="unknown keys"):
        CheckpointConfig.from_dict({"policy": "full", "segments": 3})


# ------------------------------------------------------------------------- the segment planner


def _cost(sizes, kept, inputs):
    starts = list(itertools.accumulate((0,) + tuple(sizes[:-1])))
    return sum(inputs[s] for s in starts) + max(sum(kept[s : s + n]) for s, n in zip(starts, sizes))


def test_plan_segments_small_examples():
    assert plan_segments([800, 100, 100, 100], [0, 50, 50, 50]) == (1, 3)
    assert plan_segments([100] * 4, [0, 1000, 1000, 1000]) == (4,)  # inputs too dear to keep
    assert plan_segments([100] * 4, [0, 1, 1, 1]) == (1, 1, 1, 1)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000)), min_size=1, max_size=8))
def test_plan_segments_is_optimal(items):
    kept = [k for k, _ in items]
    inputs = [0] + [i for _, i in items[1:]]
    sizes = plan_segments(kept, inputs)
    assert sum(sizes) == len(kept) and all(s >= 1 for s in sizes)
    compositions = [
        tuple(b - a for a, b in zip((0,) + cuts, cuts + (len(kept),)))
        for r in range(len(kept))
        for cuts in itertools.combinations(range(1, len(kept)), r)
    ]
    best = min((_cost(c, kept, inputs), len(c)) for c in compositions)
    assert (_cost(sizes, kept, inputs), len(sizes)) == best


# --------------------------------------------------------------------------- autocast, compile


class Autocast(nn.Module):
    """Runs the model under CPU bfloat16 autocast, as a training script would."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


@pytest.mark.parametrize("policy", POLICIES)
def test_autocast_gives_what_the_untouched_model_gives_under_autocast(policy):
    torch.manual_seed(0)
    model = WeightNormNet()  # float32 weights, as under real autocast
    optimized = checkpoint_(copy.deepcopy(model), policy=policy)
    x = torch.randn(3, 2, 48, generator=torch.Generator().manual_seed(0))
    # The recompute runs the same bfloat16 kernels on the same values: equal up to float32 rounding.
    assert_same_step(Autocast(model), Autocast(optimized), [x], steps=2, tol=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_autocast_with_a_module_called_twice(policy):
    torch.manual_seed(0)
    model = SharedNet()
    optimized = checkpoint_(copy.deepcopy(model), _is(ConvBlock), policy=policy)
    x = torch.randn(3, 2, 48, generator=torch.Generator().manual_seed(0))
    # "selective" sums the shared weight's two gradient contributions in float32, autocast's
    # shared cast in bfloat16: NOTE [Selective recompute under autocast].
    assert_same_step(Autocast(model), Autocast(optimized), [x], steps=2, tol=1e-6 if policy == "full" else 1e-2)


def _has_c_compiler() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


class BiasFreeBlock(nn.Module):
    """conv (no bias: BatchNorm would zero its gradient, leaving only rounding noise to compare)
    -> BatchNorm -> GELU -> 1x1 conv, residual."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm1d(channels)
        self.project = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        return x + self.project(F.gelu(self.norm(self.conv(x))))


class CompileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 1)
        self.blocks = nn.Sequential(BiasFreeBlock(8), BiasFreeBlock(8))

    def forward(self, x):
        return self.blocks(self.stem(x))


class StridedLayer(nn.Module):
    """wav2vec 2.0's feature-encoder layer: strided conv (no bias) -> [GroupNorm] -> GELU."""

    def __init__(self, in_channels, kernel_size, stride, norm):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, 8, kernel_size, stride=stride, bias=False)
        self.norm = nn.GroupNorm(8, 8) if norm else nn.Identity()
        self.activation = nn.GELU()

    def forward(self, x):
        return self.activation(self.norm(self.conv(x)))


@pytest.mark.skipif(not _has_c_compiler(), reason="torch.compile's inductor backend needs a C compiler")
@needs_selective
def test_compiled_selective_keeps_the_block_outputs_the_next_convolution_needs():
    # NOTE [Block outputs under torch.compile]: eager mode keeps a block's output for the next
    # block's convolution; compiled, the partitioner recomputed it unless it is marked (on torch
    # 2.13 the first layer's output is then saved once, as the conv output only).
    torch._dynamo.reset()
    model = nn.Sequential(StridedLayer(1, 10, 5, True), StridedLayer(8, 3, 2, False), StridedLayer(8, 3, 2, False))
    compiled = torch.compile(checkpoint_(copy.deepcopy(model), policy="selective"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes on context_fn
        out = compiled(torch.randn(2, 1, 400, generator=torch.Generator().manual_seed(0)))
    saved = [tuple(t.shape) for t in out.grad_fn.saved_tensors]  # the compiled graph's, one autograd node
    # Each layer's convolution output (GroupNorm's and GELU's input) and its output (the next
    # convolution's input): two tensors of each of the first two layers' output shapes.
    assert saved.count((2, 8, 79)) == 2 and saved.count((2, 8, 39)) == 2, saved


@pytest.mark.skipif(not _has_c_compiler(), reason="torch.compile's inductor backend needs a C compiler")
@pytest.mark.parametrize("policy", POLICIES)
def test_compiled_checkpointed_model_is_exact(policy):
    torch._dynamo.reset()
    model = _model(CompileNet)
    optimized = checkpoint_(copy.deepcopy(model), policy=policy)
    optimized.compile(fullgraph=True)  # in place (state_dict keys unchanged); no graph breaks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes on context_fn and in-place ops
        # Three steps: BatchNorm statistics advance once per step in the compiled graph too.
        assert_same_step(model, optimized, [_input()], steps=3)
