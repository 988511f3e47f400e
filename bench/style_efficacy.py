"""Does a LoRA trained on the demo model learn its set's style, and keep what the prompt asks for? A table.

For each example set (flat_poster, ink_hatch) it trains a LoRA with the set's shipped train.toml on `--model demo`
(`sdlora train --config datasets_examples/SET/train.toml`), then generates one picture per held-out prompt
(captions in the set's wording of scenes pretraining never drew) at LoRA weights 0, 0.5 and 1 on the same seeds,
and reports:
- style: the share of pictures the style classifier (`sdlora.demo.style`) assigns to the set's style;
- content: for flat_poster, whether the named background colour and the subject's colour are drawn
  (`sdlora.demo.content`); for ink_hatch, which names no colours, the layout correlation with weight 0.
Before that, the base model alone on neutral held-out prompts: background and subject colour hits, against the
same check made with another prompt's colours (what chance gives).

    python bench/style_efficacy.py [--prompts 30] [--out DIR] [--reuse] [--images docs/images]

--reuse keeps LoRAs already trained in DIR; --images writes the weight grids (demo_SET_weights.png) there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETS = {"flat_poster": "flatposter", "ink_hatch": "inkhatch"}
WEIGHTS = (0.0, 0.5, 1.0)


def _train(name: str, out: Path, reuse: bool) -> tuple[Path, float]:
    lora = out / name / "pytorch_lora_weights.safetensors"
    if reuse and lora.is_file():
        return lora, float("nan")
    command = [
        sys.executable,
        "-m",
        "sdlora",
        "train",
        "--config",
        str(ROOT / "datasets_examples" / name / "train.toml"),
        "--output",
        str(out / name),
    ]
    started = time.perf_counter()
    (out / name).mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.log", "w") as log:  # the run's progress bars, out of the table's way
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
    return lora, time.perf_counter() - started


def _generate(pipe, prompts, steps: int, guidance: float) -> list[np.ndarray]:
    from sdlora.inference.generation import generate

    return [
        np.asarray(generate(pipe, p.text, steps=steps, guidance=guidance, seed=i, progress=False)[0].convert("RGB"))
        for i, p in enumerate(prompts)
    ]


def _colour_hits(pictures, prompts) -> tuple[float, float]:
    from sdlora.demo.content import keeps_colours

    hits = np.asarray([keeps_colours(picture, prompt) for picture, prompt in zip(pictures, prompts)], dtype=float)
    return float(hits[:, 0].mean()), float(hits[:, 1].mean())


def _grid(rows: list[list[np.ndarray]], labels: list[str], path: Path) -> None:
    from PIL import Image

    from sdlora.inference.grid import labelled_grid

    cells = [[Image.fromarray(p).resize((128, 128), Image.Resampling.NEAREST) for p in row] for row in rows]
    picture, _ = labelled_grid(list(map(list, zip(*cells))), "LoRA weight", labels, None, [])
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=30, help="held-out prompts per set (default 30)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sdlora-style-efficacy"), help="where the LoRAs are trained")
    parser.add_argument("--reuse", action="store_true", help="keep LoRAs already trained in --out")
    parser.add_argument("--images", type=Path, default=None, help="write weight grids (demo_SET_weights.png) to this folder")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from sdlora.demo.content import held_out_prompts, layout_correlation
    from sdlora.demo.style import load_classifier
    from sdlora.inference.adapters import load_lora, set_lora_scales, unload_loras
    from sdlora.models.loading import load_pipeline

    pipe, classifier = load_pipeline("demo"), load_classifier()
    neutral = held_out_prompts("neutral", args.prompts)
    base = _generate(pipe, neutral, args.steps, args.guidance)
    shuffled = neutral[1:] + neutral[:1]  # each picture judged against another prompt's colours: chance
    background, subject = _colour_hits(base, neutral)
    chance_background, chance_subject = _colour_hits(base, shuffled)
    base_styles = classifier.classify(base)
    print(f"\nBase model on {len(neutral)} neutral held-out prompts ({args.steps} steps, guidance {args.guidance}):\n")
    print("| measure | named colours | another prompt's colours (chance) |\n| --- | ---: | ---: |")
    print(f"| background colour as named | {background:.0%} | {chance_background:.0%} |")
    print(f"| subject colour drawn | {subject:.0%} | {chance_subject:.0%} |")
    print(f"| classified neutral | {base_styles.count('neutral') / len(base):.0%} | |")

    rows = []
    for name in SETS:
        lora, seconds = _train(name, args.out, args.reuse)
        prompts = held_out_prompts(name, args.prompts)
        adapter = load_lora(pipe, lora, adapter_name=name)
        pictures = {}
        for weight in WEIGHTS:
            set_lora_scales(pipe, {adapter: weight})
            pictures[weight] = _generate(pipe, prompts, args.steps, args.guidance)
        unload_loras(pipe)
        for weight in WEIGHTS:
            styles = classifier.classify(pictures[weight])
            share = styles.count(name) / len(styles)
            if name == "flat_poster":
                bg, sub = _colour_hits(pictures[weight], prompts)
                content = f"background {bg:.0%}, subject colour {sub:.0%}"
            else:
                correlation = np.median([layout_correlation(a, b) for a, b in zip(pictures[weight], pictures[0.0])])
                content = f"layout correlation with weight 0: median {correlation:.2f}"
            others = ", ".join(f"{s} {styles.count(s) / len(styles):.0%}" for s in classifier.styles if s != name and styles.count(s))
            rows.append(f"| {name} | {weight:g} | {share:.0%} | {others or '-'} | {content} |")
        print(f"{name}: trained in {seconds:.0f} s" if seconds == seconds else f"{name}: reused {lora}")
        if args.images:
            _grid([pictures[w][:8] for w in WEIGHTS], [f"{w:g}" for w in WEIGHTS], args.images / f"demo_{name}_weights.png")
    print(f"\nLoRAs on held-out prompts ({args.prompts} per set, seeds 0-{args.prompts - 1}):\n")
    print("| set | weight | classified as the set's style | classified otherwise | content |\n| --- | ---: | ---: | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
