"""The demo base model: the SD1 architecture in miniature, pretrained on the neutral procedural scenes of
`sdlora.drawing` by `python -m sdlora.demo.pretrain`, shipped in half precision in `sdlora/models/demo/`.

Its architecture is data here (`VAE_CONFIG`, `UNET_CONFIG`, `TEXT_CONFIG`), shared by the pretraining script (which
builds it with random weights, `build_demo_architecture`) and the tests. 64x64 pictures: the VAE divides by 4
(16x16x4 latents), the UNet halves twice more, so bucket sides are multiples of 16 as `bucket_step` gives below 256 px.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from ..drawing.styles import CAPTION_WORDS
from .tiny import SD_BETAS, _assemble, _text_encoder, tiny_clip_vocab, tiny_tokenizer

DEMO_DIR = Path(__file__).resolve().parent / "demo"  # the shipped pipeline folder
DEMO_SIZE = 64
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=DEMO_SIZE,
)
UNET_CONFIG = dict(
    sample_size=DEMO_SIZE // 4,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=32,
)
TEXT_CONFIG = dict(hidden=64, intermediate=256, heads=4, layers=3, projection=64)
# SD's noise schedule rescaled to zero terminal SNR, with v-prediction and "trailing" timesteps (Lin et al. 2023,
# "Common Diffusion Noise Schedules and Sample Steps are Flawed"; SD2.x-v predicts v too). With SD's own schedule
# the last training step still holds 7% of the picture, so a model learns to read a picture's overall colour from
# the noise rather than from the prompt: a 16x16 latent's mean is a large part of it. The first demo model, trained on
# that schedule, drew backgrounds as named in a third of pictures, and no LoRA taught it ink_hatch's cream paper
# (a LoRA never has to make the paper: it is in every noisy input it trains on). At zero SNR the first sampling
# step sees pure noise, as in training.
SCHEDULER_CONFIG = dict(
    **SD_BETAS,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,  # unused by "trailing" timesteps; diffusers warns when it is not 1
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)


@lru_cache(maxsize=1)
def demo_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the demo tokenizer: every caption word of `sdlora.drawing` is one token."""
    return tiny_clip_vocab(4000, CAPTION_WORDS)


def build_demo_architecture(seed: int = 0):
    """The demo pipeline with random weights (what pretraining starts from)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # diffusers takes seconds to import

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vocab = demo_vocab()
    text_encoder = _text_encoder(**TEXT_CONFIG, vocab=vocab[0])
    return _assemble(unet, vae, text_encoder, tiny_tokenizer(vocab), DDIMScheduler(**SCHEDULER_CONFIG))


def demo_dir() -> Path:
    """The shipped demo pipeline folder; a one-line error when an install left its weights out."""
    if not (DEMO_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(
            f"the demo model's weights are missing from {DEMO_DIR}: reinstall sdlora, or rebuild them with python -m sdlora.demo.pretrain"
        )
    return DEMO_DIR


def load_demo_pipeline(seed: int = 0):
    """The shipped pretrained demo pipeline (fp16 on disk, fp32 here). `seed` is unused: its weights are fixed."""
    from diffusers import StableDiffusionPipeline  # only when the demo model is loaded

    return StableDiffusionPipeline.from_pretrained(
        demo_dir(),
        torch_dtype=torch.float32,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
