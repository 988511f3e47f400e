"""Stable Diffusion pipelines with random weights built from configs: the tiny offline model and an SD1.5-shaped one.

The tiny model is the SD1 architecture in miniature (cross-attention UNet, AutoencoderKL, CLIP text encoder and a
CLIP tokenizer whose vocabulary is learnt here from a fixed word list). It serves tests, examples and `--model tiny`.
The SD1.5-shaped model has the real SD1.5 UNet and VAE configs with a short text encoder, for benchmarks.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

TINY_SEED = 0
MAX_TOKENS = 77

# Words the tiny tokenizer learns merges from; anything else still tokenizes, byte by byte.
_TINY_WORDS = (
    "a an the of in on with and by at to for photo painting drawing illustration poster style art sks ohwx "
    "cat dog bird horse fish person man woman girl boy child face portrait landscape city street house tree "
    "forest mountain river sea sky sun moon cloud flower garden car road night day red orange yellow green "
    "blue purple pink black white grey gray brown colour color flat ink hatched line lines pattern shape "
    "circle square triangle stripe stripes dots texture paper canvas oil watercolor pencil sketch detailed "
    "simple bold bright dark light soft sharp high quality masterpiece background foreground standing "
    "sitting looking walking smiling"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=4)
def tiny_clip_vocab(num_merges: int = 400, word_list: tuple[str, ...] = tuple(_TINY_WORDS)) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a small CLIP BPE tokenizer, learnt deterministically from `word_list` (the tiny model's
    `_TINY_WORDS` by default); with enough merges every word of the list becomes one token."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [ch + "</w>" for ch in alphabet]
    words = Counter(tuple(word[:-1]) + (word[-1] + "</w>",) for word in word_list)
    merges: list[str] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})
    return {token: index for index, token in enumerate(tokens)}, merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def tiny_tokenizer(vocabulary: tuple[dict[str, int], list[str]] | None = None):
    """A CLIPTokenizer over the tiny vocabulary (or another `(vocab, merges)`) with model_max_length 77."""
    from transformers import CLIPTokenizer  # transformers takes seconds to import: only when a tiny model is built

    vocab, merges = vocabulary or tiny_clip_vocab()
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:
        # transformers 5: vocab=/merges= objects; it ignores vocab_file/merges_file silently
        pairs = [tuple(merge.split(" ")) for merge in merges]
        return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=MAX_TOKENS)
    with tempfile.TemporaryDirectory() as folder:  # transformers 4 reads the two files
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file), model_max_length=MAX_TOKENS)


SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SD1/2/XL's training noise schedule


def _scheduler():
    from diffusers import DDIMScheduler  # diffusers takes seconds to import: only when a tiny model is built

    return DDIMScheduler(
        **SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _text_encoder(
    hidden: int,
    intermediate: int,
    heads: int,
    layers: int,
    projection: int,
    with_projection: bool = False,
    vocab: dict[str, int] | None = None,
):
    """A CLIP text encoder over the tiny vocabulary (or `vocab`); `with_projection`: SDXL's second encoder (pooled, projected output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # only when a tiny model is built

    vocab = vocab or tiny_clip_vocab()[0]
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        projection_dim=projection,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_act="quick_gelu",
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _assemble(unet, vae, text_encoder, tokenizer=None, scheduler=None):
    from diffusers import StableDiffusionPipeline  # only when a tiny model is built

    return StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer or tiny_tokenizer(),
        scheduler=scheduler or _scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(seed: int = TINY_SEED):
    """The tiny SD1-architecture pipeline (64x64 images), random weights from `seed`."""
    from diffusers import UNet2DConditionModel  # only when a tiny model is built

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    vae = _tiny_vae()
    text_encoder = _text_encoder(hidden=32, intermediate=37, heads=4, layers=5, projection=32)
    return _assemble(unet, vae, text_encoder)


# A random VAE's posterior has std ~0.97 per latent element against ~0.27 of spread in its means, so ~97% of a
# training latent (mean + std * noise) would be sampling noise and a LoRA could learn nothing about the images.
# Trained VAEs are near-deterministic (SD's posterior std is ~0.01); the tiny one is made so too: log-variance
# outputs fixed at -12 (std 0.0025), and a scaling factor giving its latents unit variance on the example
# datasets (1 / 0.275), as SD's 0.18215 does for SD's VAE.
TINY_VAE_LOGVAR = -12.0
TINY_VAE_SCALING = 3.64


def _tiny_vae(near_deterministic: bool = True, **config):
    """The tiny models' VAE: 2 levels (a factor 2), 4 latent channels unless `config` says otherwise, its encoder
    near-deterministic unless told not to."""
    from diffusers import AutoencoderKL  # only when a tiny model is built

    vae = AutoencoderKL(
        **{
            "block_out_channels": (32, 64),
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "latent_channels": 4,
            "sample_size": 64,
            "norm_num_groups": 32,
            "scaling_factor": TINY_VAE_SCALING,
            **config,
        }
    )
    if near_deterministic:
        make_encoder_near_deterministic(vae)
    return vae


def make_encoder_near_deterministic(vae) -> None:
    """The VAE posterior's log-variance outputs fixed at TINY_VAE_LOGVAR (std 0.0025), whatever the encoder sees."""
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent_channels:] = 0.0
        vae.quant_conv.bias[latent_channels:] = TINY_VAE_LOGVAR


def _sd_vae(**config):
    """Stable Diffusion's real VAE architecture (a factor 8, 4 latent channels unless `config` says 16), random weights."""
    from diffusers import AutoencoderKL  # only when a model is built

    layout = dict(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4
    )
    return AutoencoderKL(in_channels=3, out_channels=3, layers_per_block=2, **{"latent_channels": 4, **layout, **config})


def build_sd15_shaped_pipeline(seed: int = TINY_SEED, text_layers: int = 2):
    """SD1.5's real UNet and VAE architecture with random weights and a short 768-wide text encoder (benchmarks)."""
    from diffusers import UNet2DConditionModel  # only when a tiny model is built

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = _sd_vae(sample_size=512)
    text_encoder = _text_encoder(hidden=768, intermediate=3072, heads=12, layers=text_layers, projection=768)
    return _assemble(unet, vae, text_encoder)


# ---------------------------------------------------------------- SDXL

# SDXL's added conditioning: 6 time ids (original size, crop top-left, target size) embedded at this width each
_TINY_TIME_EMBED = 8


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler  # only when a tiny model is built

    # SDXL's pipeline's default sampler
    return EulerDiscreteScheduler(
        **SD_BETAS,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _assemble_sdxl(unet, vae, text_encoder, text_encoder_2):
    from diffusers import StableDiffusionXLPipeline  # only when a tiny model is built

    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet.eval(),
        scheduler=_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,  # the watermark needs an optional package and changes every image
    )


def build_tiny_sdxl_pipeline(seed: int = TINY_SEED):
    """The tiny SDXL-architecture pipeline (64x64 images), random weights from `seed`.

    Its two text encoders have different widths (32 and 48, the second with a 48-wide projection), so wiring one in
    place of the other fails on shape; the UNet attends to their concatenation (80) and takes SDXL's pooled
    embedding and time ids, with two transformer blocks per attention in its second level as SDXL stacks them.
    """
    from diffusers import UNet2DConditionModel  # only when a tiny model is built

    torch.manual_seed(seed)
    text_encoder = _text_encoder(hidden=32, intermediate=37, heads=4, layers=5, projection=32)
    text_encoder_2 = _text_encoder(hidden=48, intermediate=53, heads=4, layers=5, projection=48, with_projection=True)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TINY_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * _TINY_TIME_EMBED + 48,
        norm_num_groups=32,
    )
    return _assemble_sdxl(unet, _tiny_vae(), text_encoder, text_encoder_2)


def build_sdxl_shaped_pipeline(seed: int = TINY_SEED, text_layers: int = 2):
    """SDXL's real UNet and VAE architecture with random weights and short text encoders of SDXL's widths
    (benchmarks), built in bf16: 5 GB instead of 10, and never an fp32 copy of the UNet in memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return _build_sdxl_shaped(seed, text_layers)
    finally:
        torch.set_default_dtype(previous)


def _build_sdxl_shaped(seed: int, text_layers: int):
    from diffusers import UNet2DConditionModel  # only when a tiny model is built

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = _sd_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # SDXL's: same layout, other scale
    text_encoder = _text_encoder(hidden=768, intermediate=3072, heads=12, layers=text_layers, projection=768)
    text_encoder_2 = _text_encoder(hidden=1280, intermediate=5120, heads=20, layers=text_layers, projection=1280, with_projection=True)
    return _assemble_sdxl(unet, vae, text_encoder, text_encoder_2)


# ---------------------------------------------------------------- SD3

# Widths of the tiny SD3 model, all different so that wiring one in place of another fails on shape: CLIP-L 32,
# CLIP-G 48 (their pooled projections joined: 80), T5 96 (the text width the transformer reads, CLIP's states padded to
# it), the joint attention 40 (2 heads of 20)
TINY_SD3_T5_WIDTH = 96
TINY_SD3_ATTENTION = (2, 20)  # heads, head width
TINY_SD3_VAE_SHIFT = 0.0609  # SD3's VAE: latents are (z - shift) * scale, 16 channels
TINY_SD3_T5_TOKENS = 32  # the tiny T5 tokenizer's longest prompt

_TINY_T5_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over the tiny word list, one piece per word and a letter fallback, built on the spot."""
    from transformers import T5TokenizerFast  # transformers takes seconds to import: only when a tiny model is built

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + word, -1.0 - index * 0.001) for index, word in enumerate(dict.fromkeys(_TINY_WORDS))]
    pieces += [(letter, -5.0) for letter in _TINY_T5_LETTERS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TINY_SD3_T5_TOKENS)


def _t5_encoder(width: int, layers: int, heads: int, vocab_size: int):
    """A T5 v1.1 encoder (gated GELU, as SD3's T5-XXL) of the given width."""
    from transformers import T5Config, T5EncoderModel  # only when a tiny model is built

    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=width // heads,
        d_ff=2 * width + 8,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def build_tiny_sd3_pipeline(seed: int = TINY_SEED, with_t5: bool = True):
    """The tiny SD3-architecture pipeline (64x64 images), random weights from `seed`.

    Three joint blocks (SD3's MMDiT): the first with SD3.5 Medium's second image self-attention (`attn2`, RMS q/k
    norms), the last with no context MLP (`context_pre_only`); CLIP-L 32 and CLIP-G 48 wide, both with projection;
    T5 96 wide (optional: `with_t5=False` leaves it out, as the pipeline allows); a 16-channel VAE with SD3's shift.
    """
    from diffusers import SD3Transformer2DModel  # only when built

    torch.manual_seed(seed)
    text_encoder = _text_encoder(hidden=32, intermediate=37, heads=4, layers=5, projection=32, with_projection=True)
    text_encoder_2 = _text_encoder(hidden=48, intermediate=53, heads=4, layers=5, projection=48, with_projection=True)
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder_3 = _t5_encoder(TINY_SD3_T5_WIDTH, layers=2, heads=4, vocab_size=len(tokenizer_3))
    heads, head_width = TINY_SD3_ATTENTION
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=3,
        attention_head_dim=head_width,
        num_attention_heads=heads,
        joint_attention_dim=TINY_SD3_T5_WIDTH,
        caption_projection_dim=heads * head_width,
        pooled_projection_dim=32 + 48,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = _tiny_vae(
        near_deterministic=False, latent_channels=16, shift_factor=TINY_SD3_VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False
    )
    return _assemble_sd3(transformer, vae, text_encoder, text_encoder_2, text_encoder_3 if with_t5 else None, tokenizer_3)


def _assemble_sd3(transformer, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer_3):
    """An SD3 pipeline of these parts (T5 left out when `text_encoder_3` is None), SD3's flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # only when a model is built

    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None if text_encoder_3 is None else text_encoder_3.eval(),
        tokenizer_3=None if text_encoder_3 is None else tokenizer_3,
    )


# SD3.5 Medium's transformer (diffusers' config of stabilityai/stable-diffusion-3.5-medium): 24 joint blocks of 24 heads
# of 64, the first 13 with the second image self-attention, RMS q/k norms; CLIP-L 768, CLIP-G 1280, T5-XXL 4096 wide
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD3_VAE_SHIFT, SD3_VAE_SCALING = 0.0609, 1.5305


def build_sd3_shaped_pipeline(seed: int = TINY_SEED, text_layers: int = 2, with_t5: bool = True, meta: bool = False):
    """SD3.5 Medium's real transformer and SD3's 16-channel VAE with random weights, and text encoders of SD3's
    widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096 with its 64 heads and gated MLP of 10240) cut to `text_layers`
    layers, for benchmarks and name coverage. Built in bf16 (the transformer alone is 2.5 B parameters: 4.9 GB), or
    with `meta` on the meta device: every module and shape, no memory (for counting modules and planning memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        if meta:
            with torch.device("meta"):
                return _build_sd3_shaped(seed, text_layers, with_t5)
        return _build_sd3_shaped(seed, text_layers, with_t5)
    finally:
        torch.set_default_dtype(previous)


def _build_sd3_shaped(seed: int, text_layers: int, with_t5: bool):
    from diffusers import SD3Transformer2DModel  # only when built

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
    vae = _sd_vae(sample_size=1024, latent_channels=16, shift_factor=SD3_VAE_SHIFT, scaling_factor=SD3_VAE_SCALING,
                  use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
    text_encoder = _text_encoder(hidden=768, intermediate=3072, heads=12, layers=text_layers, projection=768, with_projection=True)
    text_encoder_2 = _text_encoder(hidden=1280, intermediate=5120, heads=20, layers=text_layers, projection=1280, with_projection=True)
    tokenizer_3 = tiny_t5_tokenizer() if with_t5 else None
    text_encoder_3 = None
    if with_t5:
        from transformers import T5Config, T5EncoderModel  # only when a model is built

        config = T5Config(
            vocab_size=len(tokenizer_3), d_model=4096, d_kv=64, d_ff=10240, num_layers=text_layers, num_heads=64,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        )  # fmt: skip
        text_encoder_3 = T5EncoderModel(config)
    return _assemble_sd3(transformer, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer_3)
