"""`import sdlora` exposes the functions in __all__, whichever private modules were imported before."""

import subprocess
import sys

import sdlora


def test_every_public_name_resolves():
    for name in sdlora.__all__:
        assert getattr(sdlora, name) is not None, name


def test_train_is_the_function_even_after_the_cli_imported_the_trainer():
    # a submodule named like a public function would replace it on the package once imported (this happened with train.py)
    code = "import sdlora.cli, sdlora.training.recipe, sdlora.training.outputs; from sdlora import train; print(callable(train), type(train).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "function"]
    clashes = [name for name, module in sdlora._API.items() if module.split(".")[0] == name]
    assert not clashes, f"public functions that share their module's name: {clashes}"
