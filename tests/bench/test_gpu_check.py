"""bench/gpu_check.py --quick runs end to end on the CPU: every (model, precision, trainer) row measured, and every
LoRA it saved loads into diffusers and draws a finite image. (The GPU figures come from the full mode on a GPU.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.mark.slow
def test_quick_run_fills_every_row_and_the_loras_load_in_diffusers(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "\ndevice: CPU; torch " in "\n" + result.stdout
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| sd") and len(cells) == 15:
            rows[tuple(cells[:3])] = cells
    # --quick on the CPU: fp32 and bf16 (fp16 is emulated on the CPU, too slow here), the tiny SD1 and SDXL models
    expected = {
        (model, precision, trainer) for model in ("sd15", "sdxl") for precision in ("fp32", "bf16") for trainer in ("reference", "sdlora")
    }
    assert set(rows) == expected, result.stdout
    for key, cells in rows.items():
        seconds, images = float(cells[5]), float(cells[6])  # s/step printed to 3 decimals, images/s from the unrounded time
        assert seconds > 0, key
        assert 1 / (seconds + 0.0005) - 0.006 <= images <= 1 / max(seconds - 0.0005, 1e-9) + 0.006, key
        assert cells[4] == cells[7] == cells[9] == "n/a", key  # no CUDA memory counter on the CPU
        assert cells[14] == "yes", key  # the saved LoRA loaded in diffusers and the image is finite
        assert cells[10].endswith("x") and (key[2] == "sdlora" or cells[10] == "1.00x"), key  # s/step vs the reference
    plans = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.stdout.splitlines() if line.startswith("| sd")]
    plans = [cells for cells in plans if len(cells) == 8]  # sdlora's memory plan against the measured peaks
    assert {tuple(cells[:2]) for cells in plans} == {(model, precision) for model in ("sd15", "sdxl") for precision in ("fp32", "bf16")}
    for cells in plans:
        assert all(float(cells[i]) > 0 for i in (2, 4, 6)) and cells[3] == cells[5] == cells[7] == "n/a", cells
    assert "elapsed:" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the temporary models and images are gone
