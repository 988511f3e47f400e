"""Benchmark `sdlora merge` into an SDXL single-file checkpoint against what a diffusers user writes:
`StableDiffusionXLPipeline.from_single_file` + `load_lora_weights` + `fuse_lora` + `save_pretrained`.

The checkpoint is the SDXL-shaped model (`sdlora tiny-model DIR --variant sdxl-shaped`: SDXL's real UNet and VAE,
random weights, two short text encoders of SDXL's widths) turned into an A1111/ComfyUI single file by diffusers' own
`scripts/convert_diffusers_to_original_sdxl.py` (fetch it; never commit it) in fp16, as SDXL checkpoints are shared.
The LoRA is random, in kohya's SDXL format, on kohya's default SDXL targets (the UNet's 722 transformer layers,
both text encoders' attention and MLP), alpha = rank / 2. Each run is its own process, measured from a small
launcher (bench_merge.run_measured: wall time and that process's own peak RSS); median of N, tools alternating.
Both outputs are checked to hold the same merged weights.

    python bench/bench_merge_sdxl.py --converter convert_diffusers_to_original_sdxl.py [--ranks 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import run_measured  # noqa: E402

UNET_TARGETS = re.compile(
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))\.weight$"
)
TEXT_TARGETS = re.compile(r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))\.weight$")
FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}
CHECKED = (
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
)


def single_file(converter: Path, model: Path, out: Path) -> Path:
    """The diffusers folder as an fp16 SGM single file, converted with diffusers' own script's functions."""
    from safetensors.torch import load_file, save_file

    spec = importlib.util.spec_from_file_location("convert_sdxl", converter)
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    unet = {"model.diffusion_model." + k: v for k, v in convert.convert_unet_state_dict(load_file(model / FILES["unet"])).items()}
    vae = {
        "first_stage_model." + k: v
        for k, v in convert.convert_vae_state_dict(load_file(model / "vae/diffusion_pytorch_model.safetensors")).items()
    }
    # transformers 5 saves CLIPTextModel without its `text_model.` level, which single files keep
    te1 = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in load_file(model / FILES["text_encoder"]).items()}
    te1 = {"conditioner.embedders.0.transformer." + k: v for k, v in convert.convert_openai_text_enc_state_dict(te1).items()}
    te2 = {
        "conditioner.embedders.1.model." + k: v
        for k, v in convert.convert_openclip_text_enc_state_dict(load_file(model / FILES["text_encoder_2"])).items()
    }
    te2["conditioner.embedders.1.model.text_projection"] = te2.pop("conditioner.embedders.1.model.text_projection.weight").T.contiguous()
    state = {k: v.to(torch.float16) for k, v in {**unet, **vae, **te1, **te2}.items()}
    save_file(state, str(out))
    return out


def write_bench_lora(model: Path, rank: int, out: Path) -> Path:
    """A random kohya-format SDXL LoRA (alpha = rank / 2) shaped from the folder's weight headers."""
    from sdlora.core.families import SDXL
    from sdlora.core.files import write_kohya
    from sdlora.core.state import LoraModule, LoraState
    from sdlora.storage.safetensors_stream import read_header

    generator = torch.Generator().manual_seed(rank)
    modules = {}
    for component, file in FILES.items():
        pattern = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        for name, info in read_header(model / file).tensors.items():
            if pattern.search(name):
                path = name.removesuffix(".weight")
                if component != "unet" and not path.startswith("text_model."):
                    path = "text_model." + path
                down = torch.randn(rank, info.shape[1], generator=generator) * 0.01
                up = torch.randn(info.shape[0], rank, generator=generator) * 0.01
                modules[f"{component}.{path}"] = LoraModule(down, up, rank / 2)
    return write_kohya(LoraState(modules), out, family=SDXL)


def reference_merge(checkpoint: str, config: str, lora: str, out: str) -> None:
    """What a diffusers user writes to bake a LoRA into an SDXL checkpoint (fp32 on the CPU: fp16 matmuls crawl)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(checkpoint, config=config, torch_dtype=torch.float32, add_watermarker=False)
    pipe.load_lora_weights(lora, adapter_name="bench")
    pipe.fuse_lora(adapter_names=["bench"], lora_scale=0.8)
    pipe.unload_lora_weights()
    pipe.save_pretrained(out, safe_serialization=True)


def same_merge(ours: Path, theirs: Path) -> float:
    """Largest relative difference of one merged UNet weight between our fp16 file and diffusers' (sharded) fp32 folder."""
    import json

    from safetensors import safe_open

    with safe_open(str(ours), "pt") as handle:
        a = handle.get_tensor(CHECKED[1]).float()
    index = theirs / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][CHECKED[0]] if index.is_file() else "diffusion_pytorch_model.safetensors"
    with safe_open(str(theirs / "unet" / shard), "pt") as handle:
        b = handle.get_tensor(CHECKED[0]).float()
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--converter", type=Path, required=True, help="diffusers' scripts/convert_diffusers_to_original_sdxl.py")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sdlora-bench"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    model = work / "sdxl-shaped"
    if not (model / "model_index.json").is_file():
        run_measured([sys.executable, "-m", "sdlora", "tiny-model", str(model), "--variant", "sdxl-shaped"])
    checkpoint = work / "sdxl-shaped.safetensors"
    if not checkpoint.is_file():
        single_file(args.converter, model, checkpoint)
    print(
        f"checkpoint: {checkpoint} ({checkpoint.stat().st_size / 2**30:.2f} GiB, fp16); torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []
    for rank in args.ranks:
        lora = write_bench_lora(model, rank, work / f"sdxl-lora-r{rank}.safetensors")
        commands = {
            "sdlora": [
                sys.executable,
                "-m",
                "sdlora",
                "merge",
                "--model",
                str(checkpoint),
                "--lora",
                f"{lora}:0.8",
                "--single-file",
                str(work / "out-sdlora.safetensors"),
            ],
            "diffusers": [sys.executable, __file__, "--reference", str(checkpoint), str(model), str(lora), str(work / "out-diffusers")],
            "cp": ["cp", str(checkpoint), str(work / "out-copy.safetensors")],  # the I/O floor: the file copied as it is
        }
        runs: dict[str, list[tuple[float, float]]] = {tool: [] for tool in commands}
        for repeat in range(args.repeats):
            for tool, command in commands.items():
                (work / "out-copy.safetensors").unlink(missing_ok=True)
                if tool == "sdlora":
                    (work / "out-sdlora.safetensors").unlink(missing_ok=True)
                elif tool == "diffusers":
                    shutil.rmtree(work / "out-diffusers", ignore_errors=True)
                seconds, rss, _ = run_measured(command)
                runs[tool].append((seconds, rss))
                print(f"  rank {rank} run {repeat + 1} {tool}: {seconds:.1f} s, {rss:.2f} GiB", flush=True)
        difference = same_merge(work / "out-sdlora.safetensors", work / "out-diffusers")
        (sd_time, sd_rss), (ref_time, ref_rss) = ((statistics.median(v) for v in zip(*runs[tool])) for tool in ("sdlora", "diffusers"))
        rows.append((rank, sd_time, ref_time, sd_rss, ref_rss, difference))
    shutil.rmtree(work / "out-diffusers", ignore_errors=True)
    (work / "out-sdlora.safetensors").unlink(missing_ok=True)
    print(f"\nmedian of {args.repeats}; time end to end (process start to exit), peak RSS of the process")
    print(
        "| rank | sdlora merge | diffusers | speed-up | sdlora peak RSS | diffusers peak RSS | memory ratio | max rel. diff (one UNet weight) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rank, sd_time, ref_time, sd_rss, ref_rss, difference in rows:
        print(
            f"| {rank} | {sd_time:.1f} s | {ref_time:.1f} s | {ref_time / sd_time:.1f}x | {sd_rss:.2f} GiB | {ref_rss:.2f} GiB | {sd_rss / ref_rss:.2f} | {difference:.1e} |"
        )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--reference":
        reference_merge(*sys.argv[2:])
    else:
        main()
