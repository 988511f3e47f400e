"""Every file sdlora writes goes through atomic.py: a scan of the package's source for file-writing calls, each
of which must sit inside an `atomic_file`/`atomic_dir` block, write into a folder such a block handed out, or be
one of the few reviewed exceptions below."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

import sdlora
from sdlora.storage import atomic

PACKAGE = Path(sdlora.__file__).parent
WRITERS = {"write_text", "write_bytes", "save", "save_file", "save_pretrained", "save_lora_weights", "write_safetensors"}
# reviewed: (module, function) -> why it may write without its own atomic block
EXCEPTIONS = {
    ("metrics.py", "log"): "metrics.jsonl is an append-only log; a torn last line is skipped by readers and cut by the next run",
    ("checkpoint.py", "_write_contents"): "writes into the temporary folder save_checkpoint's atomic_dir handed out",
    ("checkpoint.py", "_write_json"): "called only by _write_contents, inside the temporary checkpoint folder",
    ("models.py", "_write_tokenizer_files"): "called only by save_pipeline, inside its atomic_dir",
    ("tiny.py", "tiny_tokenizer"): "writes the vocabulary into a TemporaryDirectory for transformers 4's tokenizer, never an output",
    ("safetensors_stream.py", "rewrite"): "merge.py's callers pass a path inside their atomic_dir/atomic_file blocks",
}


def _calls_outside_atomic(tree: ast.AST) -> list[tuple[str, str, int]]:
    found = []

    def visit(node: ast.AST, function: str, inside_atomic: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", "")) in {"atomic_file", "atomic_dir"}:
                    inside_atomic = True
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            is_open_for_writing = name == "open" and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str) and set(a.value) & set("wax") for a in node.args[1:2]
            )
            if (name in WRITERS or is_open_for_writing) and not inside_atomic:
                found.append((function, name, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function, inside_atomic)

    visit(tree, "<module>", False)
    return found


def test_every_write_is_atomic_or_a_reviewed_exception():
    unreviewed = []
    for path in sorted(PACKAGE.glob("*.py")):
        for function, call, line in _calls_outside_atomic(ast.parse(path.read_text())):
            if (path.name, function) not in EXCEPTIONS:
                unreviewed.append(f"{path.name}:{line} {function}() calls {call}() outside atomic_file/atomic_dir")
    assert not unreviewed, "\n".join(unreviewed)


def test_the_scan_finds_a_plain_write():
    tree = ast.parse("def f(p):\n    p.write_text('x')\n\ndef g(p):\n    with atomic_file(p) as t:\n        t.write_text('x')\n")
    assert _calls_outside_atomic(tree) == [("f", "write_text", 2)]


class _WriterError(Exception):
    """A writer's own error type, as safetensors' SafetensorError: not an OSError, whatever the OS said."""


def _fails_after_writing(tmp: Path, error: Exception, size: int = 0) -> None:
    (tmp / "weights.bin" if tmp.is_dir() else tmp).write_bytes(b"\0" * size)
    raise error


def _enospc_chain() -> Exception:
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as err:
        try:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from err
        except RuntimeError as wrapped:
            return wrapped


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize(
    "error, free",
    [
        (_WriterError("Error while serializing: I/O error: No space left on device (os error 28)"), 1 << 40),  # safetensors' words
        (_enospc_chain(), 1 << 40),  # an ENOSPC in the cause chain
        (_WriterError("file write failed"), (3 << 20) - 1),  # less free than the 2 MiB written + 1 MiB
    ],
)
def test_a_writer_failing_on_a_full_disk_is_enospc_naming_the_output(tmp_path, monkeypatch, kind, error, free):
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: free)
    output = tmp_path / ("model.safetensors" if kind == "file" else "model")
    with pytest.raises(OSError) as caught:
        with atomic.atomic_file(output) if kind == "file" else atomic.atomic_dir(output) as tmp:
            _fails_after_writing(tmp, error, size=2 << 20)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(output)
    assert list(tmp_path.iterdir()) == []


def test_a_writer_failing_with_room_to_spare_keeps_its_own_error(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 3 << 20)  # more than the 1 MiB written + 1 MiB
    with pytest.raises(_WriterError, match="file write failed"):
        with atomic.atomic_file(tmp_path / "model.safetensors") as tmp:
            _fails_after_writing(tmp, _WriterError("file write failed"), size=1 << 20)
    assert list(tmp_path.iterdir()) == []
