"""Held-out flow-matching loss of an SD3 LoRA over 200 steps on the tiny SD3 model (datasets_examples/flat_poster).

    PYTHONPATH=. python bench/bench_sd3_flow_loss.py [--steps 200] [--output /tmp/sd3-bench]

Trains with the SD3 defaults (logit-normal sigmas, the scheduler's shift 3, no weighting, no preconditioning) and
prints the held-out loss (10% of the images, fixed noise and 8 sigmas per image) at each validation, as a table with
its ratio to the base model's loss at step 0. The figure in docs/guides/sd3.md is this script's output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from sdlora.training.config import TrainConfig
from sdlora.training.recipe import train

DATASET = Path(__file__).resolve().parent.parent / "datasets_examples" / "flat_poster"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    out = Path(args.output or tempfile.mkdtemp(prefix="sd3-bench-")) / "run"
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig.from_options(
        data_dir=str(DATASET), output_dir=str(out), model="tiny-sd3", steps=args.steps, rank=8, alpha=4.0, lr=1e-3,
        val_split=0.1, validate_every=25, samples=False, seed=0, batch_size=2,
    )  # fmt: skip
    train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    base = rows[0]["val_loss"]
    print("| step | held-out flow-matching loss | vs step 0 |")
    print("| ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['step']} | {row['val_loss']:.4f} | {row['val_loss'] / base:.3f} |")


if __name__ == "__main__":
    main()
