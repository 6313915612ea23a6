"""convmem.zoo: every architecture builds, trains a step, and matches its published shapes and sizes."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from convmem import zoo
from convmem.zoo.basenji import Basenji2, DilatedResidualBlock
from convmem.zoo.conformer_conv import ConformerConvStack
from convmem.zoo.convtasnet import ConvTasNet
from convmem.zoo.hifigan import HiFiGANGenerator
from convmem.zoo.resnet1d import ResNet1d
from convmem.zoo.tcn import TCN
from convmem.zoo.w2v2_fe import Wav2Vec2FeatureEncoder
from convmem.zoo.wavenet import WaveNet

NAMES = ("tcn", "wavenet", "w2v2_fe", "convtasnet", "hifigan", "resnet1d", "conformer_conv", "basenji")

# The input column of shared/WORKLOADS.md.
DEFAULT_INPUTS = {
    "tcn": (4, 1, 65536),
    "wavenet": (8, 1, 16384),
    "w2v2_fe": (8, 320000),
    "convtasnet": (4, 1, 32000),
    "hifigan": (16, 80, 32),
    "resnet1d": (64, 12, 5000),
    "conformer_conv": (8, 256, 4096),
    "basenji": (2, 4, 131072),
}

# Output shapes at the default input, from the papers and reference implementations.
DEFAULT_OUTPUTS = {
    "tcn": (4, 1, 65536),
    "wavenet": (8, 256, 16384),  # 256 mu-law classes per sample
    "w2v2_fe": (8, 512, 999),  # 20 ms frames, 25 ms receptive field: (320000 - 400) // 320 + 1
    "convtasnet": (4, 2, 32000),  # two sources of the mixture's length
    "hifigan": (16, 1, 8192),  # hop 256: 32 frames -> 8192 samples
    "resnet1d": (64, 9),
    "conformer_conv": (8, 256, 4096),
    "basenji": (2, 5313, 1024),  # 128 bp bins, 5313 human tracks (no cropping by default)
}

PARAMETER_COUNTS = {
    # stem 512 + 16 x (Conv1d(256,256,3) 196,864 + Conv1d(256,256,1) 65,792) + head 257.
    "tcn": 4_203_265,
    # causal conv 384 + 24 x (dilated 65,792 + skip 16,512) + 23 residual x 16,512 + output 49,536.
    "wavenet": 2_404_992,
    # fairseq/transformers wav2vec2-base feature encoder: 5,120 + GroupNorm 1,024 + 4 x 786,432
    # + 2 x 524,288 = 4,200,448 (the "~4.2M" of the base model's CNN).
    "w2v2_fe": 4_200_448,
    # Luo & Mesgarani 2019, Table II: 5.1M. The reference counts 5,050,545; the last block's unused
    # residual 1x1 (65,664) is left out here.
    "convtasnet": 5_050_545 - 65_664,
    # Kong et al. 2020, Table 1: V1 generator 13.92M (jik876/hifi-gan after remove_weight_norm).
    "hifigan": 13_926_017,
    # stem 11,648 + stage blocks 115,200 / 410,880 / 1,640,960 / 6,558,720 + fc 4,617.
    "resnet1d": 8_742_025,
    # 16 x (LayerNorm 512 + pointwise 131,584 + depthwise 8,192 + BatchNorm 512 + pointwise 65,792).
    "conformer_conv": 3_305_472,
    # stem 17,856 + tower 7,720,099 + 11 x 1,181,952 residual + head 9,348,801.
    "basenji": 30_088_228,
}


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_and_public_surface():
    assert zoo.names() == NAMES
    assert set(zoo.__all__) == {"ZooEntry", "get", "names"}


@pytest.mark.parametrize("name", NAMES)
def test_small_trains_a_step_in_float64(name):
    entry = zoo.get(name, dtype=torch.float64)
    assert isinstance(entry, zoo.ZooEntry) and entry.name == name
    assert entry.description and entry.length_axis == -1
    x = entry.inputs[0]
    assert x.dtype == torch.float64 and x.device.type == "cpu"
    assert x.shape[1:-1] == DEFAULT_INPUTS[name][1:-1]  # same channels as the default input

    out = entry.model(*entry.inputs)
    assert out.shape[0] == x.shape[0] and out.dtype == torch.float64
    loss = entry.loss_fn(out)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for param_name, param in entry.model.named_parameters():
        # Every parameter takes part (no unused ones for DDP to reject) and gets a finite gradient.
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_default_on_meta_has_the_workload_shapes(name):
    start = time.perf_counter()
    entry = zoo.get(name, size="default", device="meta")
    assert time.perf_counter() - start < 2.0
    (x,) = entry.inputs
    assert x.is_meta and tuple(x.shape) == DEFAULT_INPUTS[name]
    assert all(p.is_meta for p in entry.model.parameters())
    assert all(b.is_meta for b in entry.model.buffers())
    out = entry.model(x)
    assert tuple(out.shape) == DEFAULT_OUTPUTS[name]
    loss = entry.loss_fn(out)
    assert loss.is_meta and loss.dim() == 0
    loss.backward()


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    assert _parameter_count(zoo.get(name, device="meta").model) == PARAMETER_COUNTS[name]


def test_w2v2_norm_variants():
    group = zoo.get("w2v2_fe", device="meta").model
    norms = [type(layer.layer_norm) for layer in group.conv_layers if hasattr(layer, "layer_norm")]
    assert norms == [nn.GroupNorm]  # after the first conv only
    assert group.conv_layers[0].layer_norm.num_groups == 512

    layer = zoo.get("w2v2_fe", device="meta", norm="layer").model
    assert [type(m.layer_norm) for m in layer.conv_layers] == [nn.LayerNorm] * 7
    # wav2vec2-large-lv60 / XLS-R feature encoder: 4,200,448 - GroupNorm + 7 LayerNorms of 1,024.
    assert _parameter_count(layer) == 4_200_448 - 1_024 + 7 * 1_024
    assert not any(m.bias is not None for m in layer.modules() if isinstance(m, nn.Conv1d))  # conv_bias=False

    entry = zoo.get("w2v2_fe", dtype=torch.float64, norm="layer")
    entry.loss_fn(entry.model(*entry.inputs)).backward()

    with pytest.raises(ValueError, match="group"):
        zoo.get("w2v2_fe", norm="batch")


def test_w2v2_minimum_length_is_the_receptive_field():
    entry = zoo.get("w2v2_fe", length=400, device="meta")
    assert entry.model(*entry.inputs).shape[-1] == 1
    with pytest.raises(ValueError, match="400"):
        zoo.get("w2v2_fe", length=399)


def test_basenji_tower_follows_the_published_schedule():
    model = zoo.get("basenji", device="meta").model
    assert [b.conv.out_channels for b in model.trunk[:7]] == [288, 339, 399, 470, 554, 652, 768]
    residual = [b for b in model.trunk if isinstance(b, DilatedResidualBlock)]
    assert [b.dilated.conv.dilation[0] for b in residual] == [1, 2, 3, 4, 6, 9, 14, 21, 32, 48, 72]
    assert sum(isinstance(m, nn.MaxPool1d) for m in model.modules()) == 7  # stride 128
    cropped = Basenji2(crop=64).to("meta")
    assert cropped(torch.empty(1, 4, 131072, device="meta")).shape == (1, 5313, 896)


def test_wavenet_is_causal():
    entry = zoo.get("wavenet", batch=1, length=64, dtype=torch.float64)
    x = entry.inputs[0].clone().requires_grad_(True)
    t = 40
    entry.model(x)[0, :, t].sum().backward()
    assert x.grad[..., t + 1 :].abs().max() == 0
    assert x.grad[..., t].abs().max() > 0
    dilations = [layer.dilated.conv.dilation[0] for layer in entry.model.layers]
    assert dilations == [2**i for i in range(10)] * 2 + [1, 2, 4, 8]


@pytest.mark.parametrize("samples", [1, 17, 801])
def test_convtasnet_keeps_awkward_lengths(samples):
    entry = zoo.get("convtasnet", batch=1, length=samples, device="meta")
    assert entry.model(*entry.inputs).shape == (1, 2, samples)


@pytest.mark.parametrize("frames", [1, 3])
def test_hifigan_upsamples_by_256(frames):
    entry = zoo.get("hifigan", batch=1, length=frames, device="meta")
    assert entry.model(*entry.inputs).shape == (1, 1, 256 * frames)


@pytest.mark.parametrize("name", NAMES)
def test_blocks_and_chain_name_real_modules(name):
    entry = zoo.get(name, device="meta")
    modules = dict(entry.model.named_modules())
    assert entry.blocks and all(block in modules for block in entry.blocks)
    parents = {block.rsplit(".", 1)[0] for block in entry.blocks}
    assert len(parents) == 1
    (parent,) = parents
    if entry.chain is None:
        assert isinstance(modules[parent], nn.ModuleList)
    else:
        assert entry.chain == parent and isinstance(modules[parent], nn.Sequential)
        assert len(modules[parent]) == len(entry.blocks)


def test_block_structure():
    chains = {name: zoo.get(name, device="meta").chain for name in NAMES}
    assert chains == {
        "tcn": "blocks",
        "wavenet": None,
        "w2v2_fe": "conv_layers",
        "convtasnet": None,
        "hifigan": None,
        "resnet1d": "blocks",
        "conformer_conv": "layers",
        "basenji": "trunk",
    }
    counts = {name: len(zoo.get(name, device="meta").blocks) for name in NAMES}
    assert counts == {
        "tcn": 16,
        "wavenet": 24,
        "w2v2_fe": 7,
        "convtasnet": 24,
        "hifigan": 4,
        "resnet1d": 8,
        "conformer_conv": 16,
        "basenji": 18,  # stem + 6 tower conv blocks + 11 dilated residual blocks
    }


def test_model_classes_are_importable():
    expected = {
        "tcn": TCN,
        "wavenet": WaveNet,
        "w2v2_fe": Wav2Vec2FeatureEncoder,
        "convtasnet": ConvTasNet,
        "hifigan": HiFiGANGenerator,
        "resnet1d": ResNet1d,
        "conformer_conv": ConformerConvStack,
        "basenji": Basenji2,
    }
    for name, cls in expected.items():
        assert type(zoo.get(name, device="meta").model) is cls


def test_sample_rates():
    rates = {name: zoo.get(name, device="meta").sample_rate for name in NAMES}
    assert rates == {
        "tcn": 16000,
        "wavenet": 16000,
        "w2v2_fe": 16000,
        "convtasnet": 8000,
        "hifigan": 22050,
        "resnet1d": 500,
        "conformer_conv": None,
        "basenji": None,
    }


def test_unknown_name_lists_every_name():
    with pytest.raises((KeyError, ValueError)) as info:
        zoo.get("resnet50")
    message = str(info.value)
    assert "resnet50" in message
    assert all(name in message for name in NAMES)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="small"):
        zoo.get("tcn", size="large")
    with pytest.raises(TypeError, match="channel"):
        zoo.get("tcn", channel=128)
    with pytest.raises(ValueError, match="batch"):
        zoo.get("tcn", batch=0)
    with pytest.raises(ValueError, match="128"):
        zoo.get("basenji", length=100)
    with pytest.raises(TypeError, match="floating"):
        zoo.get("tcn", dtype=torch.int64)


def test_model_kwargs_reach_the_model():
    model = zoo.get("tcn", device="meta", channels=64, num_blocks=4).model
    assert len(model.blocks) == 4 and model.stem.out_channels == 64
    # Keywords that set the model's input channels set the input's too (Conformer-S is d=144).
    for name, kwargs, channels in [
        ("conformer_conv", {"channels": 144}, 144),
        ("resnet1d", {"leads": 1}, 1),
        ("hifigan", {"mels": 128}, 128),
    ]:
        entry = zoo.get(name, device="meta", **kwargs)
        assert entry.inputs[0].shape[1] == channels
        entry.model(*entry.inputs)


def test_seed_makes_weights_and_inputs_deterministic():
    rng_state = torch.random.get_rng_state()
    a, b = zoo.get("basenji", seed=3), zoo.get("basenji", seed=3)
    c = zoo.get("basenji", seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global RNG is left alone
    assert torch.equal(a.inputs[0], b.inputs[0]) and not torch.equal(a.inputs[0], c.inputs[0])
    for (key, pa), pb, pc in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), c.model.state_dict().values()
    ):
        assert torch.equal(pa, pb), key
    assert not torch.equal(a.model.trunk[0].conv.weight, c.model.trunk[0].conv.weight)
    # One-hot DNA: one base per position.
    x = a.inputs[0]
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x.sum(1), torch.ones(x.shape[0], x.shape[-1]))


def test_same_input_in_every_dtype():
    x32 = zoo.get("hifigan", seed=1).inputs[0]
    x64 = zoo.get("hifigan", seed=1, dtype=torch.float64).inputs[0]
    assert x32.dtype == torch.float32 and torch.equal(x64, x32.double())


@pytest.mark.parametrize("name", NAMES)
def test_batch_and_length_overrides(name):
    entry = zoo.get(name, size="default", batch=3, length=1024, device="meta")
    assert tuple(entry.inputs[0].shape) == (3,) + DEFAULT_INPUTS[name][1:-1] + (1024,)


def test_loss_targets_follow_the_output_device():
    for name in ("wavenet", "resnet1d"):
        entry = zoo.get(name, device="meta")
        assert entry.loss_fn(entry.model(*entry.inputs)).is_meta
    logits = torch.zeros(2, 4, 3, dtype=torch.float64)
    # Uniform logits: cross-entropy is log(classes) whatever the target.
    loss = zoo.get("wavenet", device="meta").loss_fn(logits)
    assert torch.allclose(loss, torch.tensor(4.0, dtype=torch.float64).log())
