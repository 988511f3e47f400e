"""Check sdlora's kohya SD3 files with kohya's own code: its LoRA network loads them onto its MMDiT without a missing
or unexpected key, and its merge changes every weight as sdlora's modules say.

    python bench/kohya_sd3_check.py --sd-scripts /path/to/sd-scripts    # a checkout of kohya-ss/sd-scripts

Builds, from configs and on the CPU, a small SD3 transformer in diffusers' layout and kohya's MMDiT of the same
geometry (kohya's MMDiT is 64 wide per block: 3 joint blocks of width 192, the first with SD3.5 Medium's `attn2`,
RMS q/k norms, the last block's context stream without its MLP), plus the tiny SD3 model's CLIP-L, CLIP-G and T5.
A LoRA (rank 3, alpha 5) on every Linear and Conv2d of the transformer and on the text encoders' attention and MLP
layers is written by sdlora as a kohya file (q/k/v fused into `qkv`). Then kohya's `networks/lora_sd3.py`:

- `create_network_from_weights` + `load_state_dict`: the modules kohya makes from the file, and the keys missing
  from or unexpected in it (both must be 0);
- `merge_to`: each MMDiT and text-encoder weight's change, the MMDiT's converted to diffusers' layout by diffusers'
  own `convert_sd3_transformer_checkpoint_to_diffusers` (q/k/v thirds, (shift, scale) swaps), against each sdlora
  module's update: the largest relative difference.

kohya's `library/utils.py` imports torchvision and cv2 at the top but uses neither on these paths: torchvision is
never installed here, so the script puts `bench/reference_shims` (a Pillow stand-in, as bench_train.py does) on the
path after diffusers and transformers have looked for the real one, and an empty `cv2` module.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
from pathlib import Path

import torch

SHIMS = Path(__file__).resolve().parent / "reference_shims"
DEPTH = 3  # kohya's MMDiT: width 64 per block, one head per block


def _import_kohya(sd_scripts: Path):
    """kohya's SD3 model and LoRA network modules, from a checkout."""
    import diffusers  # noqa: F401  (imported before the shims: they must not see a stand-in torchvision)
    import transformers  # noqa: F401

    sys.path[:0] = [str(SHIMS), str(sd_scripts)]
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # imported by library/utils.py, unused on these paths
    logging.disable(logging.WARNING)
    from library import sd3_models
    from networks import lora_sd3

    return sd3_models, lora_sd3


def _mmdit(sd3_models):
    """kohya's MMDiT of the check's geometry: SD3.5 Medium's layout in miniature (attn2 on block 0, RMS q/k norms)."""
    return sd3_models.MMDiT(
        input_size=None, pos_embed_max_size=32, patch_size=2, in_channels=16, depth=DEPTH, adm_in_channels=80,
        context_embedder_in_features=96, context_embedder_out_features=64 * DEPTH, num_patches=32 * 32, qk_norm="rms",
        x_block_self_attn_layers=[0],
    )  # fmt: skip


def _lora(models: dict[str, torch.nn.Module], rank: int = 3, alpha: float = 5.0):
    """A LoRA on every Linear/Conv2d of the transformer and the text encoders' attention and MLP layers."""
    from sdlora.core.state import LoraModule, LoraState

    generator = torch.Generator().manual_seed(1)
    modules = {}
    for component, model in models.items():
        for name, layer in model.named_modules():
            if component != "transformer" and not any(part in name for part in ("self_attn.", "mlp.", "SelfAttention.", "DenseReluDense.")):
                continue
            if isinstance(layer, torch.nn.Linear):
                down, up = (
                    torch.randn(rank, layer.in_features, generator=generator),
                    torch.randn(layer.out_features, rank, generator=generator),
                )
            elif isinstance(layer, torch.nn.Conv2d):
                down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator)
                up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator)
            else:
                continue
            clip = component in ("text_encoder", "text_encoder_2") and not name.startswith("text_model.")
            modules[f"{component}.{'text_model.' + name if clip else name}"] = LoraModule(down, up, alpha)
    return LoraState(modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-scripts", type=Path, required=True, help="a checkout of kohya-ss/sd-scripts")
    args = parser.parse_args()
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from sdlora.core import formats
    from sdlora.core.families import SD3
    from sdlora.models.tiny import build_tiny_sd3_pipeline

    sd3_models, lora_sd3 = _import_kohya(args.sd_scripts)
    torch.manual_seed(0)
    hidden = 64 * DEPTH
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=DEPTH, attention_head_dim=64, num_attention_heads=DEPTH,
        joint_attention_dim=96, caption_projection_dim=hidden, pooled_projection_dim=80, pos_embed_max_size=32, dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )  # fmt: skip
    mmdit = _mmdit(sd3_models)
    pipe = build_tiny_sd3_pipeline()
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2, "text_encoder_3": pipe.text_encoder_3}
    state = _lora({"transformer": transformer, **encoders})
    kohya = formats.to_kohya(state, SD3)

    network, _ = lora_sd3.create_network_from_weights(
        1.0, None, None, list(encoders.values()), mmdit, weights_sd=dict(kohya), for_inference=True
    )
    network.apply_to(list(encoders.values()), mmdit, apply_text_encoder=True, apply_unet=True)
    loaded = network.load_state_dict(dict(kohya), strict=False)
    print(f"sdlora's kohya file: {len(state)} modules as {len(kohya)} tensors")
    print(f"kohya's lora_sd3: {len(network.unet_loras)} MMDiT modules, {len(network.text_encoder_loras)} text-encoder modules")
    print(f"missing keys {len(loaded.missing_keys)}, unexpected keys {len(loaded.unexpected_keys)}")

    mmdit = _mmdit(sd3_models)
    pipe = build_tiny_sd3_pipeline()  # fresh encoders: the ones above carry kohya's unmerged modules
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2, "text_encoder_3": pipe.text_encoder_3}
    before = {"transformer": {k: v.clone() for k, v in mmdit.state_dict().items()}}
    before |= {c: {k: v.clone() for k, v in model.state_dict().items()} for c, model in encoders.items()}
    merger, _ = lora_sd3.create_network_from_weights(
        1.0, None, None, list(encoders.values()), mmdit, weights_sd=dict(kohya), for_inference=True
    )
    merger.merge_to(list(encoders.values()), mmdit, dict(kohya), torch.float32, "cpu")
    changes = {k: v - before["transformer"][k] for k, v in mmdit.state_dict().items()}
    changes["pos_embed"] = torch.zeros(1, 32 * 32, hidden)
    in_diffusers_layout = convert_sd3_transformer_checkpoint_to_diffusers(changes)
    for component in ("transformer", *encoders):
        worst = 0.0
        now = in_diffusers_layout if component == "transformer" else encoders[component].state_dict()
        modules = state.for_component(component)
        for path, module in modules.items():
            key = path + ".weight" if path + ".weight" in now else path.removeprefix("text_model.") + ".weight"
            change = now[key] - (0 if component == "transformer" else before[component][key])
            expected = module.delta().reshape(change.shape)
            worst = max(worst, float((change - expected).abs().max() / expected.abs().max()))
        print(f"{component}: {len(modules)} modules, kohya's merge vs sdlora's update: largest relative difference {worst:.1e}")


if __name__ == "__main__":
    main()
