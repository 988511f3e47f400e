"""Training throughput per adapter kind: s/step of `sdlora train --kind lora|loha|lokr|dora` on the SD1.5-shaped
model (real SD1.5 UNet and VAE shapes, random weights) at 256 px, rank 16, batch 1, fp32, latents cached, as a
table with each kind's ratio against plain LoRA measured in the same run (median of `--repeats` runs, each its own
process; time per step over the steps after 2 warm-up steps, from the metrics log's timestamps, as
`bench/bench_train.py` measures).

    python bench/bench_train_kinds.py [--repeats 3] [--steps 6] [--kinds lora loha lokr dora dora-input] [--preset attn]

The issue's goals: LoHa and LoKr within 1.5x of a LoRA step, DoRA within 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import CHILD, make_dataset  # noqa: E402 - the same child and data as the training benchmark

GOALS = {"loha": 1.5, "lokr": 1.5, "dora": 1.3, "dora-input": 1.3}
# the names --kinds takes beyond sdlora's kinds: DoRA with its magnitude per input column (--dora-axis input)
VARIANTS = {"dora-input": {"kind": "dora", "dora_axis": "input"}}


def run(kind: str, model: Path, data: Path, out: Path, steps: int, preset: str) -> dict:
    options = dict(
        data_dir=str(data), output_dir=str(out), model=str(model), steps=steps, lr=1e-4, mixed_precision="no", cache="memory",
        checkpoint_every=0, validate_every=0, sample_steps=1, samples=False, seed=0, resolution=256, rank=16, alpha=8.0,
        batch_size=1, preset=preset, **VARIANTS.get(kind, {"kind": kind}),
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(options)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if result.returncode != 0:
        raise SystemExit(f"{kind}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'failed'}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run; the first 2 are warm-up")
    parser.add_argument("--kinds", nargs="+", default=["lora", "loha", "lokr", "dora"])
    parser.add_argument("--preset", default="attn", help="the layers adapted (sdlora train --preset)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sdlora-bench"), help="folder for the model and data")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "sd15-shaped"
    if not (model / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "sdlora", "tiny-model", str(model), "--variant", "sd15-shaped"], check=True)
    data = make_dataset(work / "data-sd15", count=8, size=256)
    measured: dict[str, list[dict]] = {kind: [] for kind in args.kinds}
    for _ in range(args.repeats):  # kinds interleaved, so a change in the machine's load touches them all alike
        for kind in args.kinds:
            with tempfile.TemporaryDirectory(dir=work) as out:
                measured[kind].append(run(kind, model, data, Path(out) / "run", args.steps, args.preset))
            print(f"{kind}: {measured[kind][-1]['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    medians = {kind: statistics.median(r["s_per_step"] for r in runs) for kind, runs in measured.items()}
    rss = {kind: statistics.median(r["peak_rss_gib"] for r in runs) for kind, runs in measured.items()}
    base = medians.get("lora")
    print(
        f"SD1.5-shaped, 256 px, rank 16, batch 1, fp32, preset {args.preset}, median of {args.repeats} runs ({args.steps - 2} timed steps each)"
    )
    print("| kind | s/step | x LoRA | goal | peak RSS GiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in args.kinds:
        ratio = f"{medians[kind] / base:.2f}" if base else "-"
        goal = f"<= {GOALS[kind]}" if kind in GOALS else "-"
        print(f"| {kind} | {medians[kind]:.3f} | {ratio} | {goal} | {rss[kind]:.2f} |")


if __name__ == "__main__":
    main()
