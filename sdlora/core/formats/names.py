"""The key tables every format shares: format names, per-format suffixes, kohya's prefixes and segment vocabulary.

A kohya key is a module path with its dots turned into underscores (`lora_unet_down_blocks_0_attentions_0_proj_in`),
so reading one back needs to know which underscores belong to a name. `SEGMENTS` is that vocabulary: every name a
module path of a Stable Diffusion UNet, SD3 transformer (in diffusers' and SAI's MMDiT names), CLIP or T5 text
encoder is made of. The reader splits with it and the writer
joins with it, so a path the writer accepts always reads back, and a word outside it raises when a file is read,
naming the key.
"""

from __future__ import annotations

import re

from ...errors import UserError
from ..families import FAMILIES
from ..state import COMPONENTS

DIFFUSERS = "diffusers"  # unet.<path>.lora_A.weight + lora_adapter_metadata (what save_lora_weights writes)
KOHYA = "kohya"  # lora_unet_<path_with_underscores>.lora_down.weight / .lora_up.weight / .alpha
KOHYA_LDM = "kohya-ldm"  # lora_unet_input_blocks_1_1_... (original LDM/SGM block names)
DIFFUSERS_OLD = "diffusers-old"  # unet.<path>.lora.down.weight, text encoder ...lora_linear_layer.down.weight
ATTN_PROCS = "diffusers-attn-procs"  # unet.<path>.processor.to_q_lora.down.weight
PEFT = "peft"  # base_model.model.<path>.lora_A.weight + adapter_config.json
FORMATS = (DIFFUSERS, KOHYA, KOHYA_LDM, DIFFUSERS_OLD, ATTN_PROCS, PEFT)
WRITABLE = (DIFFUSERS, KOHYA)

METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the peft LoraConfig of each component

# per-format (down, up) weight names after the module path
SUFFIXES = {
    DIFFUSERS: (".lora_A.weight", ".lora_B.weight"),
    PEFT: (".lora_A.weight", ".lora_B.weight"),
    KOHYA: (".lora_down.weight", ".lora_up.weight"),
    KOHYA_LDM: (".lora_down.weight", ".lora_up.weight"),
}
KOHYA_ALPHA = ".alpha"
# The adapter kinds in kohya/LyCORIS files, as A1111, ComfyUI and LyCORIS name their tensors: key suffix (after the
# module name and a dot) -> the field of the kind's class in core.kinds (or core.state for LoRA)
KIND_KEYS = {
    "lora": {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"},
    "loha": {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2"},
    "lokr": {
        "lokr_w1": "w1",
        "lokr_w1_a": "w1a",
        "lokr_w1_b": "w1b",
        "lokr_w2": "w2",
        "lokr_w2_a": "w2a",
        "lokr_w2_b": "w2b",
        "lokr_t2": "t2",
    },
    "full": {"diff": "diff", "diff_b": "diff_b"},
    "oft": {"oft_blocks": "blocks", "rescale": "rescale"},  # BOFT too: its blocks have one more dimension
    "ia3": {"weight": "weight", "on_input": "on_input"},
    "glora": {"a1.weight": "a1", "a2.weight": "a2", "b1.weight": "b1", "b2.weight": "b2", "bm.weight": "bm"},
}
KIND_KEYS["boft"] = KIND_KEYS["oft"]
# the factors a kind cannot do without (the others are optional: Tucker cores, a bias diff, LoKr's other spelling)
KIND_REQUIRED = {
    "lora": ("down", "up"),
    "loha": ("w1a", "w1b", "w2a", "w2b"),
    "lokr": (),
    "full": ("diff",),
    "oft": ("blocks",),
    "ia3": ("weight", "on_input"),
    "glora": ("a1", "a2", "b1", "b2"),
}
SHARED_KEYS = {"alpha": "alpha", "dora_scale": "magnitude"}  # beside any kind: the scale's alpha, DoRA's magnitude
PEFT_MAGNITUDE = ("lora_magnitude_vector.weight", "lora_magnitude_vector")  # peft's DoRA, in diffusers/peft files
KOHYA_UNET_PREFIX = "lora_unet_"  # the denoiser's, in every family (SD3's MMDiT too: kohya chose it for ComfyUI)
# kohya prefix -> component, from the family table (lora_te_ for one text encoder, lora_te1_/lora_te2_ for two,
# lora_te3_ for SD3's T5); a lora_unet_ key with SAI's MMDiT names is the transformer's (the reader tells)
KOHYA_PREFIXES = {KOHYA_UNET_PREFIX: "unet"} | {spec.kohya_prefix: spec.component for family in FAMILIES for spec in family.text_encoders}
# kohya-style prefixes other SD3 trainers use for the transformer under diffusers' names (read only): OneTrainer's
# lora_transformer_, SimpleTuner's LyCORIS lycoris_ (ComfyUI's comfy/lora.py reads both for SD3)
KOHYA_PREFIXES |= {"lora_transformer_": "transformer", "lycoris_": "transformer"}

# Old diffusers (non-peft and attention processors) keys are <module key>.down.weight / .up.weight; the module
# key's last name says what it adapts: `.lora` the module itself, `<proj>_lora` a projection of the attention
# (`attn1.processor.to_q_lora` -> attn1.to_q; in CLIP `self_attn.to_q_lora` -> self_attn.q_proj).
OLD_SUFFIXES = (".down.weight", ".up.weight")
# the attention processors' projections: name -> (the UNet's module, CLIP's module)
ATTN_PROC_PROJECTIONS = {"to_q": (".to_q", ".q_proj"), "to_k": (".to_k", ".k_proj"), "to_v": (".to_v", ".v_proj"), "to_out": (".to_out.0", ".out_proj")}  # fmt: skip
OLD_UNET_ENDINGS = {".lora": ""} | {f".{name}_lora": unet for name, (unet, _) in ATTN_PROC_PROJECTIONS.items()}
OLD_TEXT_ENCODER_ENDINGS = {".lora": "", ".lora_linear_layer": ""} | {
    f".{name}_lora": clip for name, (_, clip) in ATTN_PROC_PROJECTIONS.items()
}
ATTN_PROC_ENDINGS = tuple(f".{name}_lora" for name in ATTN_PROC_PROJECTIONS)
# diffusers' `convert_state_dict_to_diffusers` renames only the attention projections' lora_A/lora_B: the other
# modules keep peft's names (SUFFIXES[DIFFUSERS]), and every DoRA magnitude (PEFT_MAGNITUDE) keeps the module's own
# name, except in the attention processors' spelling, which diffusers' state_dict_utils still reads
# (`attn1.processor.to_out.lora_magnitude_vector` -> attn1.to_out.0; CLIP `self_attn.to_q...` -> self_attn.q_proj)
OLD_UNET_MAGNITUDE_ENDINGS = {f".{name}": unet for name, (unet, _) in ATTN_PROC_PROJECTIONS.items()}
OLD_TEXT_ENCODER_MAGNITUDE_ENDINGS = {f".{name}": clip for name, (_, clip) in ATTN_PROC_PROJECTIONS.items()}

# Every name (between dots) of a module path in SD1/SD2/SDXL UNets, SD3's transformer (diffusers' and SAI's names),
# CLIP and T5 text encoders; numbers are indices.
SEGMENTS = frozenset({
    # UNet blocks and layers
    "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding",
    "class_embedding", "encoder_hid_proj", "down_blocks", "mid_block", "up_blocks", "attentions", "resnets",
    "downsamplers", "upsamplers", "conv", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "norm", "norm1",
    "norm2", "norm3", "proj_in", "proj_out", "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out",
    "add_k_proj", "add_v_proj", "ff", "net", "proj",
    # CLIP text encoders
    "text_model", "embeddings", "token_embedding", "position_embedding", "encoder", "layers", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2", "mlp", "fc1", "fc2", "final_layer_norm",
    "text_projection",
    # SD3's transformer, diffusers' names
    "pos_embed", "time_text_embed", "timestep_embedder", "text_embedder", "context_embedder", "attn", "add_q_proj",
    "to_add_out", "ff_context", "norm1_context", "linear", "norm_out",
    # SD3's MMDiT, SAI's names (kohya's SD3 files)
    "joint_blocks", "context_block", "x_block", "qkv", "adaLN_modulation", "x_embedder", "t_embedder", "y_embedder",
    "final_layer",
    # T5 (SD3's third text encoder)
    "block", "layer", "SelfAttention", "q", "k", "v", "o", "DenseReluDense", "wi_0", "wi_1", "wo",
})  # fmt: skip
_MAX_SEGMENT_PARTS = max(len(segment.split("_")) for segment in SEGMENTS)


def kohya_name(path: str, key_for_errors: str | None = None) -> str:
    """`down_blocks.0.attentions.0.proj_in` -> `down_blocks_0_attentions_0_proj_in`; a name outside SEGMENTS raises."""
    for segment in path.split("."):
        if not (segment.isdigit() or segment in SEGMENTS):
            raise UserError(
                f"module {key_for_errors or path!r} has the name {segment!r}, which kohya names cannot hold (known: SD UNet and CLIP layers)"
            )
    return path.replace(".", "_")


def split_kohya_name(name: str, key: str) -> str:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in` by longest known segment."""
    parts = name.split("_")
    segments, i = [], 0
    while i < len(parts):
        for width in range(min(_MAX_SEGMENT_PARTS, len(parts) - i), 0, -1):
            candidate = "_".join(parts[i : i + width])
            if candidate in SEGMENTS or candidate.isdigit():
                break
        else:
            raise UserError(f"LoRA key {key!r} maps to no module (unknown name {parts[i]!r} in {name!r})")
        segments.append(candidate)
        i += width
    return ".".join(segments)


# the first names of diffusers' SD3 transformer paths (a UNet's are conv_in, time_embedding, down_blocks, ...)
TRANSFORMER_FIRST_NAMES = ("transformer_blocks", "pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")
# the text encoders that are T5 (module paths encoder.block..., no text_model.), from the family table
T5_COMPONENTS = frozenset(spec.component for family in FAMILIES for spec in family.text_encoders if spec.architecture == "t5")


def canonical_path(component: str, path: str, key: str) -> str:
    """Component-relative module path as LoraState keeps it: CLIP text encoders always with `text_model.`."""
    if component in T5_COMPONENTS:
        if not path.startswith("encoder."):
            raise UserError(f"LoRA key {key!r} maps to no T5 text-encoder module (expected encoder.block...)")
        return path
    if component.startswith("text_encoder"):
        if path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
            path = "text_model." + path
        if not path.startswith(("text_model.", "text_projection")):  # text_projection: SDXL's second encoder
            raise UserError(f"LoRA key {key!r} maps to no text-encoder module (expected text_model.encoder.layers...)")
    return path


def split_component(key: str, default: str) -> tuple[str, str]:
    """`unet.down_blocks...` -> ("unet", "down_blocks..."); a key without a component prefix belongs to `default`."""
    head, _, rest = key.partition(".")
    if head in COMPONENTS:
        return head, rest
    return default, key


def peft_pattern_matches(pattern: str, path: str) -> bool:
    """peft's rule for rank/alpha patterns: a pattern matches a module name ending in it."""
    return bool(re.match(rf"(.*\.)?({pattern})$", path))
