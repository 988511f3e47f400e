"""The notebooks in notebooks/: committed without outputs, written against the public API only, and each runs top to
bottom on the demo model producing real images (executed here with nbclient, as Jupyter would, from notebooks/)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import nbformat
import pytest

import sdlora

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# plots each notebook must show at least. 01: data, loss, sample grids; 02: a row per LoRA, two at once; 03: blocks, comparison
MIN_IMAGES = {"01_train_style_lora": 3, "02_load_lora_into_pipeline": 3, "03_merge_into_unet": 2}
CELL_TIMEOUT_S = 300


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_three_notebooks_exist():
    assert [path.stem for path in NOTEBOOKS] == sorted(MIN_IMAGES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    notebook = read(path)
    nbformat.validate(notebook)
    for index, cell in enumerate(code_cells(notebook)):
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{path.name}: code cell {index} holds outputs; clear them before committing"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_says_how_to_use_sd15(path):
    first = read(path).cells[0]
    assert first.cell_type == "markdown"
    assert "real SD1.5 checkpoint" in first.source and "stable-diffusion-v1-5/stable-diffusion-v1-5" in first.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_uses_only_the_public_api(path):
    public = set(sdlora.__all__)
    used = set()
    for cell in code_cells(read(path)):
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdlora"):
                assert node.module == "sdlora", f"{path.name} imports from the private module {node.module}"
                used.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("sdlora."), f"{path.name} imports the private module {alias.name}"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sdlora":
                used.add(node.attr)
    assert used, f"{path.name} uses nothing from sdlora"
    assert used <= public, f"{path.name} uses names outside sdlora.__all__: {sorted(used - public)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_demo_model(path, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = read(path)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    started = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{str(err)[-4000:]}")
    elapsed = time.perf_counter() - started
    outputs = [output for cell in code_cells(notebook) for output in cell.outputs]
    errors = [output for output in outputs if output.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= MIN_IMAGES[path.stem], f"{path.name} showed {len(images)} images"
    print(f"{path.name}: {elapsed:.1f} s, {len(images)} images")
