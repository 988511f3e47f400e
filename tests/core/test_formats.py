"""formats.py: each row of DESIGN.md's format table, built by hand from its documented key layout, reads into the
same LoraState (checked against diffusers and peft loading the same file); kohya names parse back for every
module of SD1.5, SDXL and CLIP; a key that maps to nothing is an error naming it."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdlora.core import formats, matching
from sdlora.core.families import SD1, SDXL
from sdlora.core.files import read_lora
from sdlora.core.formats import ldm
from sdlora.core.formats.names import split_kohya_name
from sdlora.core.state import LoraModule, LoraState
from sdlora.models.tiny import build_tiny_pipeline

RANK, ALPHA = 4, 8.0  # alpha != rank, so a reader that ignores alpha fails

# Modules of the tiny pipeline the hand-built files adapt: 3x3 convs (resnet conv1, upsampler), a 1x1 conv
# (proj_in), linears in every block kind, to_out.0 (`to_out_lora` for attention processors), the text encoder.
UNET_PATHS = (
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.attentions.0.proj_in",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "mid_block.resnets.1.time_emb_proj",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
    "up_blocks.0.upsamplers.0.conv",
)
TE_PATHS = (
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.2.mlp.fc1",
)
ATTENTION_PATHS = tuple(p for p in UNET_PATHS if re.search(r"attn\d\.to_", p))

# The documented kohya layouts, written out by hand (not derived with the code under test).
KOHYA_NAMES = {
    "unet.down_blocks.0.resnets.0.conv1": "lora_unet_down_blocks_0_resnets_0_conv1",
    "unet.down_blocks.1.attentions.0.proj_in": "lora_unet_down_blocks_1_attentions_0_proj_in",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "unet.mid_block.resnets.1.time_emb_proj": "lora_unet_mid_block_resnets_1_time_emb_proj",
    "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v": "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v",
    "unet.up_blocks.0.upsamplers.0.conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "text_encoder.text_model.encoder.layers.1.self_attn.out_proj": "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
    "text_encoder.text_model.encoder.layers.2.mlp.fc1": "lora_te_text_model_encoder_layers_2_mlp_fc1",
}
# The tiny UNet in LDM terms: level 0 input blocks 1-2 (resnets only), downsampler 3, level 1 blocks 4-5 with
# attention; output blocks 0-2 = up level 0 (with attention, so its upsampler is the block's third layer).
KOHYA_LDM_NAMES = {
    **{path: name for path, name in KOHYA_NAMES.items() if path.startswith("text_encoder.")},
    "unet.down_blocks.0.resnets.0.conv1": "lora_unet_input_blocks_1_0_in_layers_2",
    "unet.down_blocks.1.attentions.0.proj_in": "lora_unet_input_blocks_4_1_proj_in",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
    "unet.mid_block.resnets.1.time_emb_proj": "lora_unet_middle_block_2_emb_layers_1",
    "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v": "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_v",
    "unet.up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
}
# attention processors name the LoRA after the projection: to_q_lora ... to_out_lora (= to_out.0 / out_proj)
ATTN_PROC_NAMES = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora",
    "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v": "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_v_lora",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora",
    "text_encoder.text_model.encoder.layers.1.self_attn.out_proj": "text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora",
}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pipe():
    """The tiny pipeline, read-only here (shapes, and the base weights references start from)."""
    return build_tiny_pipeline()


def _make_state(pipe, paths: tuple[str, ...], alpha: float | None = ALPHA, seed: int = 0) -> LoraState:
    """Random non-zero LoRA on `paths` (component-first) shaped for the tiny pipeline."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for path in paths:
        component, _, name = path.partition(".")
        model = getattr(pipe, component)
        layers = dict(model.named_modules())
        layer = layers[matching.resolve_module_path(name, set(layers))]
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(RANK, layer.in_channels, *layer.kernel_size, generator=generator) * 0.2
            up = torch.randn(layer.out_channels, RANK, 1, 1, generator=generator) * 0.2
        else:
            down = torch.randn(RANK, layer.in_features, generator=generator) * 0.2
            up = torch.randn(layer.out_features, RANK, generator=generator) * 0.2
        modules[path] = LoraModule(down, up, alpha)
    return LoraState(modules)


def _all_paths() -> tuple[str, ...]:
    return tuple("unet." + p for p in UNET_PATHS) + tuple("text_encoder." + p for p in TE_PATHS)


def assert_same_state(actual: LoraState, expected: LoraState) -> None:
    """Same module paths, identical tensors, the same alpha/rank scale."""
    assert sorted(actual.modules) == sorted(expected.modules)
    for path, want in expected.modules.items():
        got = actual.modules[path]
        assert torch.equal(got.down, want.down) and torch.equal(got.up, want.up), path
        assert got.scale == pytest.approx(want.scale, rel=1e-6), path


def _kohya_tensors(state: LoraState, names: dict[str, str]) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, module in state.modules.items():
        tensors[f"{names[path]}.lora_down.weight"] = module.down
        tensors[f"{names[path]}.lora_up.weight"] = module.up
        tensors[f"{names[path]}.alpha"] = torch.tensor(module.effective_alpha)
    return tensors


def _outputs(pipe) -> torch.Tensor:
    """UNet noise prediction on fixed latents, conditioned on the text encoder's output (both adapted)."""
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(latents, 10, pipe.text_encoder(ids)[0]).sample


def _merged_outputs(state: LoraState) -> torch.Tensor:
    """Outputs with W + (alpha/r) * up @ down written into the weights: what `state` means, computed by hand."""
    merged = build_tiny_pipeline()
    for path, module in state.modules.items():
        component, _, name = path.partition(".")
        layers = dict(getattr(merged, component).named_modules())
        layer = layers[matching.resolve_module_path(name, set(layers))]
        layer.weight.data += module.delta()
    return _outputs(merged)


def _diffusers_outputs(path, **kwargs) -> tuple[torch.Tensor, int]:
    """Outputs after diffusers' own `load_lora_weights` read the file, and how many LoRA layers it created."""
    from peft.tuners.lora import LoraLayer

    reference = build_tiny_pipeline()
    reference.load_lora_weights(str(path), adapter_name="reference", **kwargs)
    layers = sum(isinstance(m, LoraLayer) for model in (reference.unet, reference.text_encoder) for m in model.modules())
    return _outputs(reference), layers


def _check_against_diffusers(path, state: LoraState, base: torch.Tensor, **kwargs) -> None:
    reference, layers = _diffusers_outputs(path, **kwargs)
    assert layers == len(state)  # diffusers drops keys it cannot map silently: count them
    ours = _merged_outputs(state)
    assert (ours - base).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def base_outputs():
    return _outputs(build_tiny_pipeline())


# ---------------------------------------------------------------- one test per row of the format table


def test_diffusers_peft_format_with_alpha_metadata(tmp_path, pipe, base_outputs):
    expected = _make_state(pipe, _all_paths())
    special_unet, special_te = "unet." + ATTENTION_PATHS[0], "text_encoder." + TE_PATHS[0]
    expected.modules[special_unet].alpha = 2.0
    expected.modules[special_te].alpha = 5.0
    tensors = {}
    for path, module in expected.modules.items():
        tensors[f"{path}.lora_A.weight"] = module.down
        tensors[f"{path}.lora_B.weight"] = module.up
    header = {
        "unet.r": RANK, "unet.lora_alpha": ALPHA, "unet.alpha_pattern": {ATTENTION_PATHS[0]: 2.0},
        "unet.target_modules": list(UNET_PATHS), "text_encoder.r": RANK, "text_encoder.lora_alpha": ALPHA,
        "text_encoder.alpha_pattern": {TE_PATHS[0].removeprefix("text_model."): 5.0},
        "text_encoder.target_modules": [p.removeprefix("text_model.") for p in TE_PATHS],
    }  # fmt: skip
    file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(file), metadata={"format": "pt", formats.METADATA_KEY: json.dumps(header)})

    state = read_lora(file)
    assert state.metadata["sdlora_format"] == formats.DIFFUSERS
    assert_same_state(state, expected)
    assert state.modules[special_unet].scale == 0.5 and state.modules[special_te].scale == 1.25
    _check_against_diffusers(file, expected, base_outputs)


def test_diffusers_file_without_alpha_metadata_has_scale_one(tmp_path, pipe):
    expected = _make_state(pipe, _all_paths(), alpha=None)
    tensors = {f"{p}.lora_{ab}.weight": (m.down if ab == "A" else m.up) for p, m in expected.modules.items() for ab in "AB"}
    save_file(tensors, str(tmp_path / "old.safetensors"))
    state = read_lora(tmp_path / "old.safetensors")
    assert_same_state(state, expected)
    assert {m.scale for m in state.modules.values()} == {1.0}


def test_kohya_format_with_diffusers_names(tmp_path, pipe, base_outputs):
    expected = _make_state(pipe, _all_paths())
    save_file(_kohya_tensors(expected, KOHYA_NAMES), str(tmp_path / "kohya.safetensors"))
    state = read_lora(tmp_path / "kohya.safetensors")
    assert state.metadata["sdlora_format"] == formats.KOHYA
    assert_same_state(state, expected)
    _check_against_diffusers(tmp_path / "kohya.safetensors", expected, base_outputs)


def test_kohya_format_keeps_a_different_alpha_per_module(tmp_path, pipe):
    expected = _make_state(pipe, _all_paths())
    for alpha, module in zip((1.0, 2.0, 3.0, 16.0, 0.5), expected.modules.values()):
        module.alpha = alpha
    save_file(_kohya_tensors(expected, KOHYA_NAMES), str(tmp_path / "kohya.safetensors"))
    assert_same_state(read_lora(tmp_path / "kohya.safetensors"), expected)


def test_kohya_format_without_alpha_has_scale_one(tmp_path, pipe):
    expected = _make_state(pipe, _all_paths(), alpha=None)
    tensors = {k: v for k, v in _kohya_tensors(expected, KOHYA_NAMES).items() if not k.endswith(".alpha")}
    save_file(tensors, str(tmp_path / "kohya.safetensors"))
    assert_same_state(read_lora(tmp_path / "kohya.safetensors"), expected)


def test_kohya_format_with_ldm_names(tmp_path, pipe, base_outputs):
    expected = _make_state(pipe, _all_paths())
    save_file(_kohya_tensors(expected, KOHYA_LDM_NAMES), str(tmp_path / "ldm.safetensors"))
    state = read_lora(tmp_path / "ldm.safetensors")
    assert state.metadata["sdlora_format"] == formats.KOHYA_LDM
    assert_same_state(state, expected)
    # diffusers maps LDM block names only when told the UNet's layout
    _check_against_diffusers(tmp_path / "ldm.safetensors", expected, base_outputs, unet_config=pipe.unet.config)


def test_diffusers_non_peft_format(tmp_path, pipe, base_outputs):
    expected = _make_state(pipe, _all_paths(), alpha=None)
    tensors = {}
    for path, module in expected.modules.items():
        # UNet: <path>.lora.down.weight; text encoder: <path>.lora_linear_layer.down.weight
        layer = "lora" if path.startswith("unet.") else "lora_linear_layer"
        tensors[f"{path}.{layer}.down.weight"] = module.down
        tensors[f"{path}.{layer}.up.weight"] = module.up
    save_file(tensors, str(tmp_path / "old.safetensors"))
    state = read_lora(tmp_path / "old.safetensors")
    assert state.metadata["sdlora_format"] == formats.DIFFUSERS_OLD
    assert_same_state(state, expected)
    assert {m.scale for m in state.modules.values()} == {1.0}
    _check_against_diffusers(tmp_path / "old.safetensors", expected, base_outputs)


def test_diffusers_attention_processor_format(tmp_path, pipe, base_outputs):
    expected = _make_state(pipe, tuple(ATTN_PROC_NAMES), alpha=None)
    tensors = {}
    for path, module in expected.modules.items():
        tensors[f"{ATTN_PROC_NAMES[path]}.down.weight"] = module.down
        tensors[f"{ATTN_PROC_NAMES[path]}.up.weight"] = module.up
    save_file(tensors, str(tmp_path / "procs.safetensors"))
    state = read_lora(tmp_path / "procs.safetensors")
    assert state.metadata["sdlora_format"] == formats.ATTN_PROCS
    assert_same_state(state, expected)
    _check_against_diffusers(tmp_path / "procs.safetensors", expected, base_outputs)


def test_attention_processor_keys_without_component_prefix(tmp_path, pipe):
    """`save_attn_procs` wrote UNet keys without `unet.`."""
    unet_paths = tuple(p for p in ATTN_PROC_NAMES if p.startswith("unet."))
    expected = _make_state(pipe, unet_paths, alpha=None)
    tensors = {}
    for path, module in expected.modules.items():
        name = ATTN_PROC_NAMES[path].removeprefix("unet.")
        tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"] = module.down, module.up
    save_file(tensors, str(tmp_path / "procs.safetensors"))
    assert_same_state(read_lora(tmp_path / "procs.safetensors"), expected)


def _peft_folder(folder, component_model, state: LoraState, component: str, config: dict):
    """peft's native adapter folder: base_model.model.<module>.lora_A.weight + adapter_config.json."""
    folder.mkdir()
    names = {n for n, _ in component_model.named_modules()}
    tensors = {}
    for path, module in state.for_component(component).items():
        name = matching.resolve_module_path(path, names)  # peft saves names as the installed model spells them
        tensors[f"base_model.model.{name}.lora_A.weight"] = module.down
        tensors[f"base_model.model.{name}.lora_B.weight"] = module.up
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": None, "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, **config}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder / "adapter_model.safetensors"


def _peft_scalings(model, folder) -> dict[str, float]:
    """peft's own scaling of every LoRA layer after loading the adapter folder."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    wrapped = PeftModel.from_pretrained(model, str(folder), adapter_name="reference")
    return {
        name.removeprefix("base_model.model."): m.scaling["reference"] for name, m in wrapped.named_modules() if isinstance(m, LoraLayer)
    }


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_native_unet_adapter(tmp_path, pipe, rslora):
    expected = _make_state(pipe, tuple("unet." + p for p in UNET_PATHS))
    pattern_path = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    expected.modules[pattern_path].alpha = 2.0
    config = {
        "r": RANK,
        "lora_alpha": ALPHA,
        "use_rslora": rslora,
        "alpha_pattern": {"attn2.to_k": 2.0},
        "target_modules": list(UNET_PATHS),
    }
    file = _peft_folder(tmp_path / "unet_adapter", pipe.unet, expected, "unet", config)
    if rslora:  # scale alpha / sqrt(r), i.e. an alpha of alpha * sqrt(r) in LoraState's alpha / r
        for module in expected.modules.values():
            module.alpha = module.alpha * math.sqrt(RANK)
    state = read_lora(file)
    assert state.metadata["sdlora_format"] == formats.PEFT
    assert_same_state(state, expected)
    # reference: peft itself loading the folder
    scalings = _peft_scalings(build_tiny_pipeline().unet, file.parent)
    assert scalings == pytest.approx({p.removeprefix("unet."): m.scale for p, m in expected.modules.items()}, rel=1e-6)


def test_peft_native_text_encoder_adapter(tmp_path, pipe):
    expected = _make_state(pipe, tuple("text_encoder." + p for p in TE_PATHS))
    expected.modules["text_encoder." + TE_PATHS[1]].alpha = 3.0
    targets = [p.removeprefix("text_model.") for p in TE_PATHS]  # matches both CLIP trees (peft matches name ends)
    config = {"r": RANK, "lora_alpha": ALPHA, "alpha_pattern": {"self_attn.out_proj": 3.0}, "target_modules": targets}
    file = _peft_folder(tmp_path / "te_adapter", pipe.text_encoder, expected, "text_encoder", config)
    assert_same_state(read_lora(file), expected)
    scalings = _peft_scalings(build_tiny_pipeline().text_encoder, file.parent)
    names = {n for n, _ in pipe.text_encoder.named_modules()}
    assert scalings == pytest.approx(
        {matching.resolve_module_path(p, names): m.scale for p, m in expected.for_component("text_encoder").items()}
    )


def test_peft_native_text_encoder_keys_with_or_without_text_model(tmp_path, pipe):
    """transformers 4 saves `base_model.model.text_model.encoder...`, transformers 5 `base_model.model.encoder...`."""
    expected = _make_state(pipe, tuple("text_encoder." + p for p in TE_PATHS))
    for spelling in ("text_model.", ""):
        tensors = {}
        for path, module in expected.for_component("text_encoder").items():
            name = spelling + path.removeprefix("text_model.")
            tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"] = module.down, module.up
        folder = tmp_path / (spelling or "plain")
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA}))
        assert_same_state(read_lora(folder / "adapter_model.safetensors"), expected)


# ---------------------------------------------------------------- kohya names for every module of real architectures

SD15_UNET = dict(
    sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SDXL_UNET = dict(
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, addition_embed_type="text_time",
    projection_class_embeddings_input_dim=2816, addition_time_embed_dim=256, attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
)  # fmt: skip


def _adaptable_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.fixture(scope="module")
def meta_models() -> dict[str, tuple[torch.nn.Module, dict]]:
    """Real SD1.5 / SDXL UNets and CLIP text encoders, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return {
            "sd15": (UNet2DConditionModel(**SD15_UNET), SD15_UNET),
            "sdxl": (UNet2DConditionModel(**SDXL_UNET), SDXL_UNET),
            "clip-l": (CLIPTextModel(CLIPTextConfig()), {}),
            "clip-g": (
                CLIPTextModelWithProjection(
                    CLIPTextConfig(
                        hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280
                    )
                ),
                {},
            ),
        }


def _tiny_kohya_file(names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A kohya state dict with a rank-1 LoRA under each kohya name (shapes do not matter to key parsing)."""
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = torch.ones(1, 1), torch.ones(1, 1)
        tensors[f"{name}.alpha"] = torch.tensor(3.0)
    return tensors


@pytest.mark.parametrize(
    ("model", "component", "prefix"),
    [("sd15", "unet", "lora_unet_"), ("sdxl", "unet", "lora_unet_"), ("clip-l", "text_encoder", "lora_te_"),
     ("clip-l", "text_encoder", "lora_te1_"), ("clip-g", "text_encoder_2", "lora_te2_")],
)  # fmt: skip
def test_kohya_diffusers_names_parse_back_for_every_module(meta_models, model, component, prefix):
    module_tree, _ = meta_models[model]
    names = _adaptable_modules(module_tree)
    if component != "unet":
        # files spell CLIP with `text_model.` (transformers 5 dropped it from CLIPTextModel's tree)
        names = [n if n.startswith(("text_model.", "text_projection")) else "text_model." + n for n in names]
    kohya = {prefix + "_".join(name.split(".")): name for name in names}  # the documented rule: dots become underscores
    assert len(kohya) == len(names) > 70
    for key, name in kohya.items():
        assert split_kohya_name(key.removeprefix(prefix), key) == name
    state = formats.to_lora_state(_tiny_kohya_file(kohya))
    assert sorted(state.modules) == sorted(f"{component}.{n}" for n in names)
    assert {m.effective_alpha for m in state.modules.values()} == {3.0}


# The SD1/SDXL LDM (original Stability) UNet layout, derived here from the documented block structure:
# input_blocks[0] = conv_in; then per level `layers` blocks [ResBlock, (SpatialTransformer)] and, except on the
# last level, a downsampler block [op]; middle_block = [ResBlock, SpatialTransformer, ResBlock]; output_blocks:
# per level `layers + 1` blocks [ResBlock, (SpatialTransformer), (Upsample.conv on the level's last block)].
_LDM_RESBLOCK_LAYERS = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_LDM_TOP_LEVEL = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "time_embedding.linear_1": "time_embed_0",
                  "time_embedding.linear_2": "time_embed_2", "add_embedding.linear_1": "label_emb_0_0", "add_embedding.linear_2": "label_emb_0_2"}  # fmt: skip
_LDM_MIDDLE = {"resnets.0": "middle_block_0", "attentions.0": "middle_block_1", "resnets.1": "middle_block_2"}


def ldm_kohya_name(path: str, config: dict) -> str:
    """The kohya LDM-style name (without `lora_unet_`) of a diffusers UNet module."""
    if path in _LDM_TOP_LEVEL:
        return _LDM_TOP_LEVEL[path]
    parts = path.split(".")
    stride = config["layers_per_block"] + 1
    if parts[0] == "mid_block":
        block, kind, rest = _LDM_MIDDLE[".".join(parts[1:3])], parts[1], parts[3:]
    else:
        level, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks_{stride * (level + 1)}_0_op"
        if kind == "upsamplers":
            has_attention = "Attn" in config["up_block_types"][level]
            return f"output_blocks_{stride * level + stride - 1}_{2 if has_attention else 1}_conv"
        if parts[0] == "down_blocks":
            block = f"input_blocks_{1 + stride * level + int(parts[3])}_{0 if kind == 'resnets' else 1}"
        else:
            block = f"output_blocks_{stride * level + int(parts[3])}_{0 if kind == 'resnets' else 1}"
        rest = parts[4:]
    if kind == "resnets":
        rest = [_LDM_RESBLOCK_LAYERS[rest[0]]]
    return "_".join([block, *rest])


def test_ldm_name_derivation_matches_known_sd15_keys():
    """Spot checks of the derivation against key names in real SD1.5 checkpoints and kohya files."""
    expected = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
        "down_blocks.3.resnets.1.conv2": "input_blocks_11_0_out_layers_3",
        "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks_2_1_conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
        "up_blocks.3.attentions.2.proj_out": "output_blocks_11_1_proj_out",
        "up_blocks.1.resnets.0.conv_shortcut": "output_blocks_3_0_skip_connection",
    }
    assert {path: ldm_kohya_name(path, SD15_UNET) for path in expected} == expected


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_kohya_ldm_names_map_to_every_unet_module(meta_models, model):
    unet, config = meta_models[model]
    names = _adaptable_modules(unet)
    kohya = {"lora_unet_" + ldm_kohya_name(name, config): name for name in names}
    assert len(kohya) == len(names)
    tensors = _tiny_kohya_file(kohya)
    if model == "sdxl":  # SDXL files carry both text encoders
        tensors.update(
            _tiny_kohya_file(
                {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": 0, "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": 0}
            )
        )
    assert formats.detect_format(tensors) == formats.KOHYA_LDM
    state = formats.to_lora_state(tensors)
    unet_paths = sorted(p.removeprefix("unet.") for p in state.modules if p.startswith("unet."))
    assert unet_paths == sorted(names)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_kohya_ldm_names_agree_with_diffusers_converter(meta_models, model):
    """diffusers' own SGM/LDM block mapping reaches the same modules (one key at a time: on a whole SD1 file it
    confuses input_blocks_1 with input_blocks_10, and it reads SD1's output_blocks_2_1_conv upsampler as an
    attention)."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    if not hasattr(conversion, "_maybe_map_sgm_blocks_to_diffusers"):
        pytest.skip("this diffusers has no SGM block mapping to compare with (private API)")
    unet, config = meta_models[model]
    known_diffusers_mistakes = {"up_blocks.0.upsamplers.0.conv"} if model == "sd15" else set()
    checked = 0
    for name in _adaptable_modules(unet):
        if name in known_diffusers_mistakes:
            continue
        key = f"lora_unet_{ldm_kohya_name(name, config)}.lora_down.weight"
        (block_key,) = conversion._maybe_map_sgm_blocks_to_diffusers({key: None}, unet.config)
        theirs = conversion._convert_unet_lora_key(block_key).removesuffix(".down.weight").removesuffix(".lora")
        # diffusers' names for attention LoRA: attn1.processor.to_q_lora -> attn1.to_q
        theirs = re.sub(r"\.processor\.to_(q|k|v|out)_lora$", lambda m: f".to_{m.group(1)}" + (".0" if m.group(1) == "out" else ""), theirs)
        ours = formats.to_lora_state(_tiny_kohya_file({key.removesuffix(".lora_down.weight"): None}))
        assert list(ours.modules) == [f"unet.{theirs}"] == [f"unet.{name}"]
        checked += 1
    assert checked > 250


def test_sd1_and_sdxl_ldm_tables_agree_where_both_define_a_block():
    shared = set(ldm.LDM_SD1) & set(ldm.LDM_SDXL)
    assert len(shared) > 20
    assert all(ldm.LDM_SD1[block] == ldm.LDM_SDXL[block] for block in shared)


# ---------------------------------------------------------------- detection and keys that map to nothing


def _lora(down_shape=(4, 8), up_shape=(8, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(*down_shape), torch.randn(*up_shape)


def _kohya_module(name: str, alpha: float = 8.0) -> dict[str, torch.Tensor]:
    down, up = _lora()
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}


GOOD_KOHYA = _kohya_module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"lora_unet_foo.weird": torch.ones(1)}, "lora_unet_foo.weird"),
        ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(4, 8)}, "lora_unet_mid_block_attentions_0_proj_in"),
        ({"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(8, 4)}, "lora_unet_mid_block_attentions_0_proj_in"),
        ({"lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0)}, "lora_unet_mid_block_attentions_0_proj_in"),
        (_kohya_module("lora_xyz_mid_block_attentions_0_proj_in"), "lora_xyz_mid_block_attentions_0_proj_in"),
        (_kohya_module("lora_unet_mid_block_Attentions_0_proj_in"), "lora_unet_mid_block_Attentions_0_proj_in"),
        ({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.ones(4, 8)}, "hada_w1_a"),
        ({"lora_unet_mid_block_attentions_0_proj_in.lokr_w1": torch.ones(4, 8)}, "lokr_w1"),
        ({"lora_unet_mid_block_attentions_0_proj_in.dora_scale": torch.ones(8)}, "dora_scale"),
        ({"lora_unet_mid_block_attentions_0_proj_in.lora_mid.weight": torch.ones(4, 4, 3, 3)}, "lora_mid"),
    ],
    ids=["stray", "down-only", "up-only", "alpha-only", "unknown-prefix", "bad-segment", "loha", "lokr", "dora", "tucker"],
)
def test_kohya_key_that_maps_to_nothing_is_an_error_naming_it(extra, named):
    tensors = {**GOOD_KOHYA, **extra}
    with pytest.raises(ValueError, match=re.escape(named)):
        formats.to_lora_state(tensors)


@pytest.mark.parametrize(
    ("tensors", "named"),
    [
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 8)}, "unet.down_blocks.0.attentions.0.proj_in"),
        ({"unet.x.lora_A.weight": torch.ones(4, 8), "unet.x.lora_B.weight": torch.ones(8, 4), "unet.x.lora_C.weight": torch.ones(1)}, "unet.x.lora_C.weight"),
        ({"text_encoder.foo.bar.lora_A.weight": torch.ones(4, 8), "text_encoder.foo.bar.lora_B.weight": torch.ones(8, 4)}, "text_encoder.foo.bar"),
        ({"unet.x.lora_A.weight": torch.ones(4, 8), "unet.x.lora_B.weight": torch.ones(8, 4), "unet.x.lora_magnitude_vector": torch.ones(5)}, "unet.x"),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(1)}, "model.diffusion_model.input_blocks.0.0.weight"),
        ({"unet.a.processor.to_z_lora.down.weight": torch.ones(4, 8), "unet.a.processor.to_q_lora.down.weight": torch.ones(4, 8),
          "unet.a.processor.to_z_lora.up.weight": torch.ones(8, 4), "unet.a.processor.to_q_lora.up.weight": torch.ones(8, 4)}, "to_z_lora"),
        ({"unet.a.lora.down.weight": torch.ones(4, 8), "unet.a.lora.up.weight": torch.ones(8, 4), "unet.b.something": torch.ones(1)}, "unet.b.something"),
        ({"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.ones(4, 8), "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.ones(8, 4)}, "lora_unet_input_blocks_99_1_proj_in"),
        ({"lora_unet_input_blocks_1_0_out_layers_9.lora_down.weight": torch.ones(4, 8), "lora_unet_input_blocks_1_0_out_layers_9.lora_up.weight": torch.ones(8, 4)}, "lora_unet_input_blocks_1_0_out_layers_9"),
    ],
    ids=["diffusers-down-only", "diffusers-stray", "te-without-text-model", "dora-magnitude-of-no-axis", "not-a-lora", "attn-proc-unknown", "old-stray", "ldm-unknown-block", "ldm-unknown-resblock-layer"],
)  # fmt: skip
def test_other_formats_key_that_maps_to_nothing_is_an_error_naming_it(tensors, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        formats.to_lora_state(tensors)


def test_empty_state_dict_is_an_error():
    with pytest.raises(ValueError, match="no tensors"):
        formats.to_lora_state({})


def test_two_keys_for_one_module_is_an_error_naming_the_second():
    """`lora_te_` and `lora_te1_` both name SD1's text encoder: keeping one would drop the other silently."""
    tensors = {
        **_kohya_module("lora_te_text_model_encoder_layers_0_mlp_fc1"),
        **_kohya_module("lora_te1_text_model_encoder_layers_0_mlp_fc1"),
    }
    with pytest.raises(ValueError, match="text_encoder.text_model.encoder.layers.0.mlp.fc1"):
        formats.to_lora_state(tensors)


@pytest.mark.parametrize(
    ("key", "fmt"),
    [
        ("unet.a.lora_A.weight", formats.DIFFUSERS),
        ("lora_unet_a.lora_down.weight", formats.KOHYA),
        ("lora_te_text_model_a.lora_down.weight", formats.KOHYA),
        ("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", formats.KOHYA_LDM),
        ("lora_unet_middle_block_1_proj_in.lora_down.weight", formats.KOHYA_LDM),
        ("unet.a.lora.down.weight", formats.DIFFUSERS_OLD),
        ("text_encoder.a.lora_linear_layer.down.weight", formats.DIFFUSERS_OLD),
        ("unet.a.processor.to_out_lora.down.weight", formats.ATTN_PROCS),
        ("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight", formats.ATTN_PROCS),
        ("base_model.model.a.lora_A.weight", formats.PEFT),
    ],
)
def test_detect_format(key, fmt):
    assert formats.detect_format([key]) == fmt


def test_detect_format_names_the_first_key_of_an_unknown_layout():
    with pytest.raises(ValueError, match="unknown LoRA format.*'encoder.weight'"):
        formats.detect_format(["encoder.weight", "decoder.weight"])


def test_split_underscored_rejects_what_it_cannot_read():
    assert split_kohya_name("mid_block_attentions_0_proj_in", "k") == "mid_block.attentions.0.proj_in"
    with pytest.raises(ValueError, match="'KEY'.*'Proj'"):
        split_kohya_name("mid_block_Proj", "KEY")


def test_resolve_module_path_accepts_both_text_encoder_spellings():
    names = {"encoder.layers.0.self_attn.q_proj"}
    assert matching.resolve_module_path("text_model.encoder.layers.0.self_attn.q_proj", names) == "encoder.layers.0.self_attn.q_proj"
    assert (
        matching.resolve_module_path("encoder.layers.0.self_attn.q_proj", {"text_model." + n for n in names})
        == "text_model.encoder.layers.0.self_attn.q_proj"
    )
    assert matching.resolve_module_path("encoder.layers.9.self_attn.q_proj", names) is None


def test_an_unknown_word_in_a_kohya_key_is_refused_when_the_file_is_read():
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn9_to_q"
    tensors = {f"{key}.lora_down.weight": torch.zeros(4, 8), f"{key}.lora_up.weight": torch.zeros(8, 4), f"{key}.alpha": torch.tensor(2.0)}
    with pytest.raises(ValueError, match=f"LoRA key '{key}.*unknown name 'attn9'"):
        formats.to_lora_state(tensors)


def test_the_kohya_writer_refuses_a_name_its_reader_could_not_split_back():
    state = LoraState({"unet.mid_block.attentions.0.my_layer": LoraModule(torch.zeros(4, 8), torch.zeros(8, 4), 2.0)})
    with pytest.raises(ValueError, match="unet.mid_block.attentions.0.my_layer.*'my_layer'"):
        formats.to_kohya(state, SD1)
    assert "text_encoder_2" not in formats.kohya_prefixes(SD1) and formats.kohya_prefixes(SDXL)["text_encoder"] == "lora_te1_"
