"""The memory plan against what the code allocates: the plan `sdlora train` prints, and the process's resident memory
(RSS) while the same run's setup and training steps actually happen on the CPU, where "the accelerator" is the
process's own memory. One table: plan, measured, plan / measured, per phase.

    python bench/bench_memory_plan.py [--model sdxl-shaped] [--resolution 1024] [--rank 32] [--steps 2]
        [--precision bf16] [--no-checkpointing]

The measured figure of a phase is its peak RSS (sampled every 2 ms from /proc/self/statm) minus the RSS before the
model was built (Python, torch, diffusers, the dataset, and the code the phases run, loaded by a dry run on the tiny
model first). glibc is told to give large freed blocks back at once
(MALLOC_MMAP_THRESHOLD_, set before torch starts), so a phase's figure is what it holds, not what an earlier one left in
malloc's free lists. Sampling is planned but not run here: SDXL's 20 denoising steps at 1024 px take most of an hour on
two cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # must be in the environment when the process starts
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    os.execv(sys.executable, [sys.executable, *sys.argv])

GIB = 2**30


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The highest RSS seen since the last `reset`, sampled on a thread."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self.stopped = every, rss(), False
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stopped:
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def reset(self) -> None:
        time.sleep(4 * self.every)
        self.peak = rss()

    def read(self) -> int:
        time.sleep(4 * self.every)
        return self.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl-shaped")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--fp8-base", action="store_true")
    parser.add_argument(
        "--plan-as-gpu", action="store_true",
        help="only print the plan as a run on a CUDA GPU would hold it (VAE and text encoders off the GPU between uses), and stop",
    )  # fmt: skip
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from sdlora.training import recipe
    from sdlora.training.config import TrainConfig

    work = Path(tempfile.mkdtemp(prefix="sdlora-memplan-"))
    (work / "data").mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        pixels = (rng.random((args.resolution, args.resolution, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(work / "data" / f"{index}.png")
        (work / "data" / f"{index}.txt").write_text(f"a test picture {index}")
    config = TrainConfig.from_options(
        data_dir=str(work / "data"), output_dir=str(work / "out"), model=args.model, resolution=args.resolution,
        rank=args.rank, alpha=args.rank / 2, mixed_precision=args.precision, steps=args.steps, checkpoint_every=0,
        samples=False, validate_every=0, fp8_base=args.fp8_base,
        **({"gradient_checkpointing": False} if args.no_checkpointing else {}),
    )  # fmt: skip
    if args.plan_as_gpu:
        import torch

        from sdlora.training import memory

        plan_memory = memory.plan_memory
        memory.plan_memory = lambda *a, **k: plan_memory(*a[:4], torch.device("cuda"), **k)
        recipe.setup(config.replace(dry_run=True, samples=True))
        return
    # the code every phase runs, imported and run once on the tiny model first: the baseline holds it, the phases do not
    recipe.setup(config.replace(model="tiny", resolution=64, dry_run=True))
    watch = PeakRss()
    baseline = rss()
    watch.reset()
    start = time.perf_counter()
    run = recipe.setup(config)  # loads, plans (printed), fills the caches
    setup_peak, setup_seconds = watch.read() - baseline, time.perf_counter() - start
    plan = run.plan
    batches = recipe._Batches(run)
    watch.reset()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        recipe._optimizer_step(run, batches)
        run.state.step += 1
        times.append(time.perf_counter() - start)
    step_peak = watch.read() - baseline
    watch.stopped = True

    rows = [
        ("setup (caching)", plan.phase("setup (caching)").total, setup_peak),
        ("training step", plan.phase("training step").total, step_peak),
    ]
    print()
    print(f"{args.model} {args.resolution} px rank {args.rank}, {args.precision}, checkpointing {not args.no_checkpointing}"
          f"{', fp8 base' if args.fp8_base else ''}: setup {setup_seconds:.0f} s, steps {', '.join(f'{t:.0f}' for t in times)} s")  # fmt: skip
    print("| phase | plan | measured (RSS - baseline) | plan / measured |")
    print("| --- | ---: | ---: | ---: |")
    for name, planned, measured in rows:
        print(f"| {name} | {planned / GIB:.2f} GiB | {measured / GIB:.2f} GiB | {planned / measured:.3f} |")
    print(f"baseline RSS (Python, torch, diffusers, data): {baseline / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
