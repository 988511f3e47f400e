"""kohya's network options (#28): LoRA+, block learning-rate weights, block ranks and alphas, kohya's three dropouts
and scale_weight_norms, each against sd-scripts networks/lora.py's formulas restated here."""

from __future__ import annotations

import json
import math
import re
import shlex

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sdlora.cli import build_parser
from sdlora.config import config_from_args
from sdlora.core import targets
from sdlora.core.families import SD1, SD3, SDXL
from sdlora.core.files import read_lora, write_diffusers, write_kohya
from sdlora.errors import UserError
from sdlora.models.tiny import build_tiny_pipeline
from sdlora.training import blocks, network, recipe
from sdlora.training.base_model import load_base_model
from sdlora.training.config import NetworkConfig, TrainConfig
from sdlora.training.kohya_config import command_line, kohya_options

# ---------------------------------------------------------------- kohya's block index, restated


def _kohya_sd_block(path: str) -> int:
    """sd-scripts networks/lora.py get_block_index for SD1/SD2 (its names are the diffusers path underscored)."""
    name = "lora_unet_" + path.replace(".", "_")
    match = re.search(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", name)
    if match:
        direction, i, kind, j = match.groups()
        idx = 3 * int(i) + (2 if kind in ("upsamplers", "downsamplers") else int(j))
        return 1 + idx if direction == "down" else 12 + 1 + idx  # NUM_OF_BLOCKS = 12
    assert "mid_block_" in name
    return 12


# SDXL: kohya names the UNet in LDM terms; input_blocks_n -> 1 + n, middle_block_n -> 10 + n, output_blocks_n -> 13 + n.
# The tiny SDXL UNet's blocks by diffusers prefix, with their LDM block (SDXL's layout: 2 layers a level, 3 levels here 2)
SDXL_BLOCKS = {
    "down_blocks.0.resnets.0.": 1 + 1,  # input_blocks_1
    "down_blocks.0.resnets.1.": 1 + 2,
    "down_blocks.0.downsamplers.0.": 1 + 3,
    "down_blocks.1.resnets.0.": 1 + 4,
    "down_blocks.1.attentions.0.": 1 + 4,  # input_blocks_4_1
    "down_blocks.1.attentions.1.": 1 + 5,
    "mid_block.resnets.0.": 10 + 0,
    "mid_block.attentions.0.": 10 + 1,
    "mid_block.resnets.1.": 10 + 2,
    "up_blocks.0.attentions.2.": 13 + 2,
    "up_blocks.0.upsamplers.0.": 13 + 2,  # output_blocks_2_2 (after the attention output_blocks_2_1)
    "up_blocks.1.resnets.0.": 13 + 3,
    "up_blocks.1.resnets.2.": 13 + 5,
}


def test_block_index_is_kohyas_on_sd1_and_sdxl(tiny_pipe, tiny_sdxl_pipe):
    names = targets.unet_target_modules(tiny_pipe.unet, "all")
    assert {blocks.block_index(name, SD1) for name in names} == {1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 18}
    for name in names:
        assert blocks.block_index(name, SD1) == _kohya_sd_block(name), name
    xl_names = targets.unet_target_modules(tiny_sdxl_pipe.unet, "all")
    checked = 0
    for prefix, expected in SDXL_BLOCKS.items():
        for name in (n for n in xl_names if n.startswith(prefix)):
            assert blocks.block_index(name, SDXL) == expected, name
            checked += 1
    assert checked > 20
    assert (blocks.block_count(SD1), blocks.block_count(SDXL)) == (25, 23)


def test_lr_weight_presets_are_kohyas_curves():
    # get_block_lr_weight's get_list: sine = sin(pi/2 * i/(n-1)), cosine reversed, linear i/(n-1), "+x" adds x
    sine = blocks.lr_weight_preset("sine", 12)
    assert sine[0] == 0.0 and sine[-1] == 1.0 and sine[6] == pytest.approx(math.sin(math.pi / 2 * 6 / 11))
    assert blocks.lr_weight_preset("cosine+0.5", 9) == pytest.approx([math.sin(math.pi / 2 * i / 8) + 0.5 for i in reversed(range(9))])
    assert blocks.lr_weight_preset("reverse_linear", 12) == pytest.approx([i / 11 for i in reversed(range(12))])
    assert blocks.lr_weight_preset("zeros+0.25", 9) == [0.25] * 9
    # get_block_lr_weight: the threshold zeroes the given lists' values at or below it, never the defaults of 1.0
    options = NetworkConfig(mid_lr_weight=[1.5], block_lr_zero_threshold=2.0)
    assert blocks.lr_weights(options, SD1) == [1.0] * 12 + [0.0] + [1.0] * 12
    assert blocks.lr_weights(NetworkConfig(up_lr_weight=[0.5] * 9), SDXL) == [1.0] * 13 + [0.5] * 9 + [1.0]
    with pytest.raises(UserError, match="use numbers or one of"):
        blocks.lr_weight_preset("wave", 12)


# ---------------------------------------------------------------- per-block ranks and alphas

DIMS = [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # 25, one per SD1 block
ALPHAS = [0.5 + i for i in range(25)]
CONV_DIMS = [1 + i % 3 for i in range(25)]
CONV_ALPHAS = [3.0] * 25


def test_block_dims_give_kohyas_ranks_and_both_files_keep_them(tiny_pipe, tmp_path):
    # kohya indexes down + mid + up by block, so down_lr_weight[3] is block 3 (the downsampler): at 0, no LoRA there
    down_weights = [1.0, 1.0, 1.0, 0.0] + [1.0] * 8
    options = NetworkConfig(
        preset="all", rank=4, alpha=2.0, block_dims=DIMS, block_alphas=ALPHAS, conv_block_dims=CONV_DIMS,
        conv_block_alphas=CONV_ALPHAS, down_lr_weight=down_weights,
    )  # fmt: skip
    names = targets.unet_target_modules(tiny_pipe.unet, "all")
    plan = blocks.block_plan(tiny_pipe.unet, names, options, SD1)
    layers = dict(tiny_pipe.unet.named_modules())
    expected = {}  # networks/lora.py create_modules: Linear and 1x1 convs block_dims, 3x3 convs conv_block_dims
    for name in names:
        block = _kohya_sd_block(name)
        conv3x3 = isinstance(layers[name], nn.Conv2d) and layers[name].kernel_size == (3, 3)
        rank, alpha = (CONV_DIMS[block], CONV_ALPHAS[block]) if conv3x3 else (DIMS[block], ALPHAS[block])
        if rank and (down_weights + [1.0] * 13)[block] != 0:  # remove_block_dims_and_alphas: weight 0 is rank 0
            expected[name] = (rank, alpha)
    assert plan.ranks == expected
    assert not any(name.startswith("down_blocks.0.downsamplers") for name in plan.ranks)
    assert len({rank for rank, _ in plan.ranks.values()}) >= 5  # really per block

    network.add_lora(tiny_pipe.unet, list(plan.ranks), 4, 2.0, module_ranks=plan.ranks)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.lora_parameters(tiny_pipe.unet):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    state = network.extract_lora_state({"unet": tiny_pipe.unet})
    assert {path.removeprefix("unet."): (m.rank, m.alpha) for path, m in state.modules.items()} == expected
    diffusers_file, kohya_file = tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "kohya.safetensors"
    write_diffusers(state, diffusers_file, family=SD1)
    write_kohya(state, kohya_file, family=SD1)
    for path in (diffusers_file, kohya_file):
        read = read_lora(path)
        assert {p.removeprefix("unet."): (m.rank, m.alpha) for p, m in read.modules.items()} == expected, path
        for name, module in read.modules.items():
            torch.testing.assert_close(module.delta(), state.modules[name].delta())
    fresh = build_tiny_pipeline()  # diffusers' own loader builds each layer at its rank and alpha from the header
    fresh.load_lora_weights(str(diffusers_file))
    loaded = network._lora_layers(fresh.unet, None)
    assert {name: layer.r["default_0"] for name, layer in loaded.items()} == {name: rank for name, (rank, _) in expected.items()}
    for name, layer in loaded.items():
        assert layer.scaling["default_0"] == pytest.approx(expected[name][1] / expected[name][0]), name


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"block_dims": [4] * 24}, "--block-dims has 24 values; SD1's UNet has 25 blocks"),
        ({"down_lr_weight": [1.0] * 9}, "--down-lr-weight has 9 values; SD1's UNet has 12"),
        ({"block_dims": [0] * 25}, "leave no UNet layer with a LoRA"),
    ],
)
def test_block_lists_of_the_wrong_length_are_one_line(tiny_pipe, options, says):
    names = targets.unet_target_modules(tiny_pipe.unet, "attn")
    with pytest.raises(UserError, match=re.escape(says).replace("SD1", ".*")):
        blocks.block_plan(tiny_pipe.unet, names, NetworkConfig(**options), SD1)
    with pytest.raises(UserError, match="kohya's block ranks and learning-rate weights are for UNets"):
        blocks.block_count(SD3)  # SD3's transformer has no kohya blocks


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"block_dims": [4, -1]}, "--block-dims [4, -1] is invalid: it must be a list of numbers, zero or more"),
        ({"up_lr_weight": [1.0, float("nan")]}, "--up-lr-weight"),
        (
            {"block_dims": [4] * 25, "block_alphas": [1.0, 0.0]},
            "--block-alphas [1.0, 0.0] is invalid: it must be a list of positive numbers",
        ),
        ({"block_alphas": [1.0] * 25}, "--block-alphas takes effect with --block-dims"),
        ({"block_dims": [4] * 25, "conv_block_dims": [4] * 25}, "only --preset all adapts"),
        ({"kind": "loha", "rank_dropout": 0.1}, "--rank-dropout acts on LoRA's down projection, which loha has not"),
        ({"kind": "lokr", "block_dims": [4] * 25}, "not lokr"),
        ({"kind": "dora", "network_dropout": 0.1}, "--network-dropout with --kind dora"),
        ({"module_dropout": 1.0}, "--module-dropout 1.0 is invalid: it must be in [0, 1)"),
        ({"block_lr_zero_threshold": -0.5}, "--block-lr-zero-threshold"),
    ],
)
def test_hostile_network_values_are_one_line(options, says):
    with pytest.raises(UserError, match=re.escape(says)):
        NetworkConfig(**options)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"loraplus_lr_ratio": 0.0}, "--loraplus-lr-ratio 0.0 is invalid: it must be a positive finite number"),
        ({"loraplus_unet_lr_ratio": -2.0}, "--loraplus-unet-lr-ratio -2.0 is invalid"),
        ({"scale_weight_norms": 0.0}, "--scale-weight-norms 0.0 is invalid"),
        ({"loraplus_lr_ratio": 4.0, "kind": "loha"}, "which loha has not"),
        ({"loraplus_lr_ratio": 4.0, "optimizer": "prodigy", "lr": 1.0}, "--optimizer prodigy takes one learning rate"),
        ({"scale_weight_norms": 1.0, "kind": "dora"}, "--kind dora has another form"),
        ({"scale_weight_norms": 1.0, "full_fp16": True, "mixed_precision": "fp16"}, "--full-fp16"),
    ],
)
def test_hostile_optimizer_values_are_one_line(options, says):
    with pytest.raises(UserError, match=re.escape(says)):
        TrainConfig.from_options(data_dir="d", output_dir="o", **options)


# ---------------------------------------------------------------- LoRA+ and block weights in the optimizer's groups


def _rates(groups: list[dict], model: nn.Module, component: str) -> dict[str, float]:
    """{parameter name: its group's lr} for `component`'s parameters in `groups`."""
    names = {id(param): name for name, param in model.named_parameters()}
    return {f"{component}.{names[id(p)]}": group["lr"] for group in groups for p in group["params"] if id(p) in names}


def _layer_of(name: str) -> str:
    return name.split(".lora_")[0].removeprefix("unet.").removesuffix(".base_layer")


def test_optimizer_groups_hold_kohyas_rates_sd1(tmp_path):
    down = [0.5, 1.0, 2.0, 0.25, 1.5] + [1.0] * 7
    up = [0.2, 0.9, 0.05, 1.1, 1.2, 1.3] + [1.0] * 6  # up block 13+2 at 0.05, under the threshold: not trained
    config = TrainConfig.from_options(
        data_dir=str(tmp_path / "d"), output_dir=str(tmp_path / "o"), model="tiny", rank=4, alpha=2.0, preset="all",
        train_text_encoder=True, lr=1e-3, text_encoder_lr=3e-4, loraplus_lr_ratio=4.0, loraplus_unet_lr_ratio=16.0,
        down_lr_weight=down, mid_lr_weight=[0.75], up_lr_weight=up, block_lr_zero_threshold=0.1,
    )  # fmt: skip
    model = load_base_model(config.base, torch.device("cpu"))
    groups = recipe._setup_network(config.network, config.optimization, config.base, model)
    weights = down + [0.75] + up  # kohya: down + mid + up; a weight at or below the threshold becomes 0
    weights = [w if w > 0.1 else 0.0 for w in weights]
    unet = _rates(groups, model.unet, "unet")
    assert unet, "no UNet parameters"
    for name, rate in unet.items():
        # prepare_optimizer_params: unet_lr * block weight, lora_up at that x loraplus_unet_lr_ratio
        expected = 1e-3 * weights[_kohya_sd_block(_layer_of(name))] * (16.0 if ".lora_B." in name else 1.0)
        assert rate == pytest.approx(expected, rel=1e-12), name
    assert not any(_kohya_sd_block(_layer_of(name)) == 15 for name in unet)  # the zeroed block has no LoRA at all
    assert {_kohya_sd_block(_layer_of(name)) for name in unet} == {1, 2, 3, 4, 5, 12, 13, 14, 16, 17, 18}
    text = _rates(groups, model.text_encoders["text_encoder"], "text_encoder")
    assert text and {rate for name, rate in text.items() if ".lora_A." in name} == {3e-4}
    assert sorted({rate for name, rate in text.items() if ".lora_B." in name}) == pytest.approx([3e-4 * 4.0])  # the shared ratio
    trainable = {id(p) for part in model.trained for p in recipe._component(model, part).parameters() if p.requires_grad}
    assert sum(len(group["params"]) for group in groups) == len(trainable)  # each trained parameter in one group


def test_optimizer_groups_hold_kohyas_rates_sdxl(tmp_path):
    down, mid, up = [1.0, 0.5, 2.0, 0.3, 0.7, 1.0, 1.0, 1.0, 1.0], [0.4, 0.6, 0.8], [1.25] * 9
    config = TrainConfig.from_options(
        data_dir=str(tmp_path / "d"), output_dir=str(tmp_path / "o"), model="tiny-sdxl", rank=4, alpha=2.0, train_text_encoder=True,
        lr=2e-3, text_encoder_lr=1e-4, text_encoder_2_lr=5e-5, loraplus_text_encoder_lr_ratio=8.0,
        down_lr_weight=down, mid_lr_weight=mid, up_lr_weight=up,
    )  # fmt: skip
    model = load_base_model(config.base, torch.device("cpu"))
    groups = recipe._setup_network(config.network, config.optimization, config.base, model)
    weights = [1.0] + down + mid + up + [1.0]  # SDXL: 1.0 for the time embedding and the output around them
    unet = _rates(groups, model.unet, "unet")
    for name, rate in unet.items():
        block = next(index for prefix, index in _sdxl_prefixes() if _layer_of(name).startswith(prefix))
        assert rate == pytest.approx(2e-3 * weights[block], rel=1e-12), name  # no UNet ratio: B at the same rate
    assert len(set(unet.values())) >= 4
    for component, lr in (("text_encoder", 1e-4), ("text_encoder_2", 5e-5)):
        rates = _rates(groups, model.text_encoders[component], component)
        assert {r for n, r in rates.items() if ".lora_A." in n} == {lr}
        assert sorted({r for n, r in rates.items() if ".lora_B." in n}) == pytest.approx([lr * 8.0])


def _sdxl_prefixes() -> list[tuple[str, int]]:
    """The tiny SDXL UNet's attention blocks (the attn preset's layers) and their kohya block."""
    return [("down_blocks.1.attentions.0.", 5), ("down_blocks.1.attentions.1.", 6), ("mid_block.attentions.0.", 11),
            ("up_blocks.0.attentions.0.", 13), ("up_blocks.0.attentions.1.", 14), ("up_blocks.0.attentions.2.", 15)]  # fmt: skip


# ---------------------------------------------------------------- kohya's dropouts


def _lora_linear(rank_dropout=0.0, network_dropout=0.0, module_dropout=0.0, conv=False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1) if conv else nn.Linear(5, 6))
    network.add_lora(model, ["0"], 3, 6.0)
    with torch.no_grad():
        for param in network.lora_parameters(model):
            param.copy_(torch.randn(param.shape))
    assert network.add_kohya_dropout(model, network_dropout, rank_dropout, module_dropout) == 1
    return model


@pytest.mark.parametrize("kind", ["rank_dropout", "network_dropout", "module_dropout"])
def test_dropouts_act_in_training_only(kind):
    model = _lora_linear(**{kind: 0.3})
    x = torch.randn(64, 4, 5)
    network.set_adapter_training(model, False)
    plain = model(x)
    assert torch.equal(model(x), plain)  # evaluation: no dropout
    network.set_adapter_training(model, True)
    dropped = [model(x) for _ in range(20)]
    assert any(not torch.allclose(out, plain) for out in dropped)
    network.set_adapter_training(model, False)
    assert torch.equal(model(x), plain)


def test_rank_dropout_keeps_the_expected_update_and_masks_whole_ranks():
    p = 0.4
    model = _lora_linear(rank_dropout=p)
    layer = model[0]
    x = torch.randn(1, 3, 5).expand(40000, 3, 5)  # one input, a fresh mask [batch, rank] per row
    base = layer.base_layer(x[:1])
    network.set_adapter_training(model, False)
    update = model(x[:1]) - base
    network.set_adapter_training(model, True)
    torch.manual_seed(1)
    samples = model(x) - base
    mean, spread = samples.mean(0), samples.std(0)
    # kohya scales the kept ranks by 1/(1-p): the expectation is the undropped update (4 standard errors)
    assert (mean - update[0]).abs().max() <= (4 * spread / math.sqrt(len(x))).max()
    # the mask is per sample and rank, the same at every token: each row is the update of a subset of the ranks
    A, B, scale = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    lx = x[0] @ A.T
    row = samples[0]
    subsets = [torch.tensor([(s >> r) & 1 for r in range(3)], dtype=torch.float32) for s in range(8)]
    assert any(torch.allclose(row, (lx * m) @ B.T * scale / (1 - p), atol=1e-5) for m in subsets)


def test_module_dropout_skips_whole_modules_at_its_rate_and_conv_rank_dropout_works():
    p = 0.25
    model = _lora_linear(module_dropout=p)
    x = torch.randn(2, 5)
    base = model[0].base_layer(x)
    network.set_adapter_training(model, True)
    torch.manual_seed(2)
    skipped = sum(torch.equal(model(x), base) for _ in range(4000))
    assert abs(skipped / 4000 - p) < 4 * math.sqrt(p * (1 - p) / 4000)  # kohya: no rescale of the kept calls
    conv = _lora_linear(rank_dropout=0.5, conv=True)
    network.set_adapter_training(conv, True)
    out = conv(torch.randn(3, 5, 4, 4))
    assert out.shape == (3, 6, 4, 4) and torch.isfinite(out).all()


# ---------------------------------------------------------------- scale_weight_norms


def test_scale_weight_norms_clamps_each_update_norm_and_counts(tiny_pipe):
    names = ["down_blocks.1.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "up_blocks.0.resnets.0.conv_shortcut"]  # fmt: skip
    network.add_lora(tiny_pipe.unet, names, 3, 5.0)
    layers = network._lora_layers(tiny_pipe.unet, "default")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for index, name in enumerate(names):  # two layers far above the bound, two below it
            for param in (layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight):
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if index % 2 else 0.01))

    @torch.no_grad()
    def merged(name):  # kohya's apply_max_norm_regularization: up @ down, a 3x3 conv as conv2d(down^T, up)^T, x alpha/r
        down, up = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
        if down.dim() == 2:
            weight = up @ down
        elif down.shape[2:] == (3, 3):
            weight = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            weight = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2))[:, :, None, None]
        return weight * 5.0 / 3

    before = {name: float(merged(name).norm()) for name in names}
    bound = 1.0
    assert sum(norm > bound for norm in before.values()) == 2
    scaled, average, largest = network.apply_max_norm({"unet": tiny_pipe.unet}, bound)
    after = {name: float(merged(name).norm()) for name in names}
    assert scaled == 2
    for name in names:
        assert after[name] == pytest.approx(min(before[name], bound), rel=1e-5), name
    assert largest == pytest.approx(max(after.values()), rel=1e-5)
    assert average == pytest.approx(sum(after.values()) / len(after), rel=1e-5)


# ---------------------------------------------------------------- kohya's config and a run


def test_kohya_network_args_become_the_options():
    config = {
        "network_module": "networks.lora", "network_dropout": 0.1, "scale_weight_norms": 1.5, "loraplus_lr_ratio": 8,
        "network_args": [
            "down_lr_weight=sine+0.5", "mid_lr_weight=2", "up_lr_weight=1,,0.5", "block_lr_zero_threshold=0.1",
            "block_dims=" + ",".join(map(str, DIMS)), "block_alphas=" + ",".join(map(str, ALPHAS)),
            "conv_block_dims=" + ",".join(map(str, CONV_DIMS)), "rank_dropout=0.2", "module_dropout=0.05",
            "loraplus_text_encoder_lr_ratio=2",
        ],
    }  # fmt: skip
    options, _ = kohya_options(config)
    assert options["down_lr_weight"] == pytest.approx([math.sin(math.pi / 2 * i / 11) + 0.5 for i in range(12)])
    assert (options["mid_lr_weight"], options["up_lr_weight"]) == ([2.0], [1.0, 0.0, 0.5])  # kohya: an empty entry is 0
    assert (options["block_dims"], options["block_alphas"], options["conv_block_dims"]) == (DIMS, ALPHAS, CONV_DIMS)
    assert (options["preset"], options["conv_alpha"]) == ("all", 1.0)  # conv_block_dims: 3x3 convs at kohya's conv_alpha 1
    assert (options["network_dropout"], options["rank_dropout"], options["module_dropout"]) == (0.1, 0.2, 0.05)
    assert (options["scale_weight_norms"], options["loraplus_lr_ratio"], options["loraplus_text_encoder_lr_ratio"]) == (1.5, 8.0, 2.0)
    assert kohya_options({"network_args": ["down_lr_weight=linear"], "sdxl": True})[0]["down_lr_weight"] == pytest.approx(
        [i / 8 for i in range(9)]
    )  # an SDXL config's curves over its 9 blocks
    assert "scale_weight_norms" not in kohya_options({"scale_weight_norms": 0.0})[0]  # kohya: 0 is off
    # the equivalent command line says the same run
    options |= {"data_dir": "img", "output_dir": "out"}
    args = build_parser().parse_args(shlex.split(command_line(options))[1:])
    assert config_from_args(args) == TrainConfig.from_options(**options)


@pytest.mark.slow  # three short training runs: about 30 s on two free cores
def test_a_run_with_every_kohya_network_option_resumes_bit_for_bit(make_dataset, tmp_path, tiny_config):
    dataset = make_dataset(tmp_path / "data", count=2)
    dims = [4] * 25
    dims[4] = 2  # down_blocks.1.attentions.0 (block 4) at rank 2
    options = dict(
        steps=2, checkpoint_every=1, samples=False, batch_size=1, loraplus_lr_ratio=4.0, network_dropout=0.1, rank_dropout=0.2,
        module_dropout=0.1, block_dims=dims, block_alphas=[3.0] * 25, mid_lr_weight=[0.5], scale_weight_norms=0.05, lr=1e-2,
        down_lr_weight=[1.0] * 4 + [0.5] + [1.0] * 7,  # block 4, the optimizer's first group, at half the rate
    )  # fmt: skip
    out = recipe.train(tiny_config(dataset, tmp_path / "out", **options))
    state = read_lora(out)
    ranks = {path: (m.rank, m.alpha) for path, m in state.modules.items()}
    assert {r for p, r in ranks.items() if ".down_blocks.1.attentions.0." in p} == {(2, 3.0)}
    assert {r for p, r in ranks.items() if ".down_blocks.1.attentions.1." in p} == {(4, 3.0)}
    kohya = read_lora(out.parent / "lora.safetensors")
    assert {(m.rank, m.alpha) for m in kohya.modules.values()} == {(2, 3.0), (4, 3.0)}
    header = safe_open(str(out.parent / "lora.safetensors"), "pt").metadata()
    assert (header["ss_network_dropout"], header["ss_scale_weight_norms"]) == ("0.1", "0.05")  # kohya's keys, its meanings
    args = json.loads(header["ss_network_args"])  # kohya records its network_args as given
    assert (args["block_dims"], args["mid_lr_weight"], args["rank_dropout"], args["loraplus_lr_ratio"]) == (
        ",".join(map(str, dims)),
        "0.5",
        "0.2",
        "4",
    )
    lines = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert len(steps) == 2 and all({"keys_scaled", "average_key_norm", "max_key_norm"} <= line.keys() for line in steps)
    assert steps[-1]["max_key_norm"] <= 0.05 * (1 + 1e-5) and steps[-1]["keys_scaled"] > 0  # lr 1e-2 pushes norms past 0.05
    assert all(line["lr"] == pytest.approx(1e-2) for line in steps)  # the UNet's base rate, not a block's
    for module in state.modules.values():
        assert float((module.delta()).norm()) <= 0.05 * (1 + 1e-4)
    # the dropouts draw from each step's seed: a resumed run is the same run
    recipe.train(tiny_config(dataset, tmp_path / "resumed", **(options | {"steps": 1})))
    resumed = recipe.train(tiny_config(dataset, tmp_path / "resumed", **options, resume="latest"))
    expected, actual = load_file(out), load_file(resumed)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[key], actual[key]) for key in expected)


def test_sd3_takes_loraplus_on_its_transformer_and_refuses_block_options(tmp_path):
    options = dict(data_dir=str(tmp_path / "d"), output_dir=str(tmp_path / "o"), model="tiny-sd3", rank=4, alpha=2.0)
    config = TrainConfig.from_options(
        **options, train_text_encoder=True, lr=1e-3, text_encoder_lr=2e-4, loraplus_unet_lr_ratio=16.0, loraplus_text_encoder_lr_ratio=2.0
    )
    model = load_base_model(config.base, torch.device("cpu"))
    groups = recipe._setup_network(config.network, config.optimization, config.base, model)
    denoiser = _rates(groups, model.unet, "transformer")
    assert sorted({rate for name, rate in denoiser.items() if ".lora_A." in name}) == pytest.approx([1e-3])
    assert sorted({rate for name, rate in denoiser.items() if ".lora_B." in name}) == pytest.approx([1e-3 * 16.0])
    clip = _rates(groups, model.text_encoders["text_encoder"], "text_encoder")
    assert sorted(set(clip.values())) == pytest.approx([2e-4, 2e-4 * 2.0])
    assert not _rates(groups, model.text_encoders["text_encoder_3"], "text_encoder_3")  # T5 stays frozen
    blocked = TrainConfig.from_options(**options, mid_lr_weight=[0.5])
    with pytest.raises(UserError, match="kohya's block ranks and learning-rate weights are for UNets"):
        recipe._setup_network(blocked.network, blocked.optimization, blocked.base, load_base_model(blocked.base, torch.device("cpu")))


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_parameter_groups_hold_each_trained_parameter_once(kind):
    model = nn.Sequential(nn.Linear(8, 6), nn.Conv2d(6, 4, 3, padding=1))
    trained = network.add_lora(model, ["0", "1"], 2, 3.0, kind=kind)
    groups = network.parameter_groups(model, 1e-3, 4.0 if kind in ("lora", "dora") else None)
    listed = [id(param) for group in groups for param in group["params"]]
    assert len(listed) == len(set(listed)) and set(listed) == {id(param) for param in trained}  # peft lists DoRA's twice
