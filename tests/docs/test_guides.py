"""The Python examples of the guides run as written (the commands of every page are checked to parse by
test_pages.py; those of the getting-started page also run, in test_getting_started.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_python_api_guide_runs(tmp_path, docs_dir, repo_workspace):
    """The ```python blocks of guides/python-api.md, one after another in one interpreter (a later block uses what an
    earlier one wrote), on the demo model."""
    text = (docs_dir / "guides" / "python-api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert blocks, "guides/python-api.md shows no Python"
    work = repo_workspace(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=work, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "modules; rank/alpha (4, 8.0)" in result.stdout, result.stdout
    assert (work / "out/api-merged/model_index.json").is_file() and (work / "out/api-diffusers.safetensors").is_file()
