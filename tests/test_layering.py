"""The package's layering: each folder imports only folders below it, no import circle, and no function-local
import that could hide one (lazy imports of heavy libraries stay, each with a comment saying why)."""

from __future__ import annotations

import ast
from pathlib import Path

import sdlora

PACKAGE = Path(sdlora.__file__).parent
# bottom to top; a module may import its own folder and the folders listed before it
LAYERS = (
    "errors",  # sdlora/errors.py: UserError, which every layer raises; it imports nothing of sdlora
    "storage",
    "drawing",
    "core",
    "models",
    "inference",
    "tools",
    "training",
    "demo",
    "ui",  # sdlora/ui: the web page over training and the tools
    "",
)  # "": cli.py, config.py, __init__.py, __main__.py
LAZY_INTERNAL_IMPORTS = {"sdlora.cli"}  # the CLI imports each command's modules when it runs (fast --help)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    if module == "sdlora.errors":
        return LAYERS.index("errors")
    parts = module.split(".")
    folder = parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""
    return LAYERS.index(folder)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported sdlora module, line, inside a function) for every import of a sdlora module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sdlora":
                continue
            for alias in node.names:  # `from . import formats` imports the submodule sdlora.core.formats
                candidate = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or (
                    PACKAGE.parent / candidate.replace(".", "/")
                ).is_dir()
                found.append((candidate if is_module else target, node.lineno, id(node) in local))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in local) for a in node.names if a.name.split(".")[0] == "sdlora"]
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_imports_only_its_own_folder_and_those_below():
    wrong = []
    for module, targets in graph().items():
        for target, line, _ in targets:
            if target != "sdlora" and layer_of(target) > layer_of(module):
                wrong.append(f"{module}:{line} imports {target}")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_no_import_circle():
    edges = {module: {t for t, _, _ in targets if t != module} for module, targets in graph().items()}
    # a package's __init__ is imported by each of its modules; only real module-to-module edges count
    edges = {m: {t for t in ts if t in edges and not (t != "sdlora" and m.startswith(t + "."))} for m, ts in edges.items()}
    state: dict[str, str] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_function_local_imports_are_only_lazy_libraries_with_a_reason():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            previous_import_line = None
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                internal = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("sdlora"))
                if internal and module not in LAZY_INTERNAL_IMPORTS:
                    problems.append(f"{module}:{node.lineno} imports sdlora code inside a function")
                # the first import of a block says why it is lazy; the lines right after it share the reason
                if previous_import_line != node.lineno - 1 and "#" not in lines[node.lineno - 1]:
                    problems.append(f"{module}:{node.lineno} has a function-local import without a comment saying why")
                previous_import_line = node.end_lineno
    assert not problems, "\n".join(problems)


def test_the_layer_table_names_every_folder():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(LAYERS) - {"", "errors"}
