"""Read and rewrite .safetensors files tensor by tensor, without loading a whole file.

Layout: 8-byte little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}}, plus an optional
"__metadata__" of strings), then the raw little-endian tensor bytes. `rewrite` lays out every output offset from
shapes and dtypes first, then copies untouched tensors' byte ranges straight from the input (kernel-side where the
OS allows) and writes only the tensors it is asked to change.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_ALIGN = 8  # the reference writer pads the header so tensor data starts 8-byte aligned
_CHUNK = 16 << 20  # bytes per read/write when the kernel cannot copy ranges itself


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: dtype name as in the header, shape, and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensors in file order, `__metadata__`, and the header's raw bytes."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    raw: bytes  # length prefix + JSON, reused verbatim when the layout does not change


def read_header(path: str | os.PathLike) -> Header:
    """Parse the header of a .safetensors file (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            (length,) = struct.unpack("<Q", prefix)
            size = os.fstat(handle.fileno()).st_size
            if length > size - 8:
                raise UserError(f"header length {length} exceeds the file")
            text = handle.read(length)
            entries = json.loads(text, object_pairs_hook=_without_repeats)
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a readable .safetensors file ({err}): is it truncated or of another kind?") from err
    if not isinstance(entries, dict):
        raise UserError(f"{path} is not a readable .safetensors file (its header is not a JSON object)")
    metadata = entries.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise UserError(f"{path}: the header's __metadata__ is not a table of strings")
    data_start = 8 + length
    tensors = sorted((_tensor_info(path, name, entry, data_start, size) for name, entry in entries.items()), key=lambda i: (i.begin, i.end))
    for before, after in zip(tensors, tensors[1:]):
        if after.begin < before.end:
            raise UserError(f"{path}: the bytes of tensors {before.name!r} and {after.name!r} overlap: the header is corrupt")
    return Header(path, {info.name: info for info in tensors}, metadata, prefix + text)


def _without_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object as a dict; a name given twice raises (json keeps the last silently: a corrupt model file's
    second entry would stand for the real weight, and a LoRA that fits the first would be blamed for not fitting)."""
    entries: dict[str, object] = {}
    for name, value in pairs:
        if name in entries:
            raise UserError(f"the header names {name!r} twice")
        entries[name] = value
    return entries


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    """One header entry checked before any use: a known dtype, a shape, and a byte range inside the data section
    exactly as long as the shape and dtype need."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise UserError(f"{path}: the header entry of tensor {name!r} lacks dtype, shape or data_offsets: the header is corrupt")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in TORCH_DTYPES:
        raise UserError(f"{path}: tensor {name!r} has the unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise UserError(f"{path}: tensor {name!r} has the invalid shape {shape!r}: the header is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{path}: tensor {name!r} has the invalid data_offsets {offsets!r}: the header is corrupt")
    begin, end = offsets
    if data_start + end > size:
        raise UserError(f"{path}: tensor {name!r} ends past the end of the file ({size} bytes): is the file truncated?")
    if end - begin != tensor_nbytes(dtype, tuple(shape)):
        raise UserError(
            f"{path}: tensor {name!r} of shape {tuple(shape)} and dtype {dtype} needs {tensor_nbytes(dtype, tuple(shape))} bytes, "
            f"its header gives {end - begin}: the header is corrupt"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_tensor(fd: int, info: TensorInfo, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor read from an open file descriptor into a writable CPU tensor: the start of `scratch` (uint8, at
    least `info.nbytes`) when given, which the next read overwrites, else fresh memory."""
    dtype = TORCH_DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    raw = scratch[: info.nbytes] if scratch is not None else torch.empty(info.nbytes, dtype=torch.uint8)
    view, done = memoryview(raw.numpy()), 0
    while done < info.nbytes:
        got = os.preadv(fd, [view[done:]], info.begin + done)
        if got == 0:
            raise UserError(f"tensor {info.name!r} ends past the end of the file: is the file truncated?")
        done += got
    return raw.view(dtype).reshape(info.shape)


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors `dtype` and `shape`."""
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()


def rewrite(
    header: Header,
    out_path: str | os.PathLike,
    changed: Mapping[str, str],
    transform: Callable[[TensorInfo, torch.Tensor], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write `header.path` to `out_path` with the tensors named in `changed` (name -> output dtype) replaced by
    `transform(info, tensor)` (`tensor` lives in a buffer the next read reuses); every other tensor is copied byte for
    byte; `metadata` entries are added to the header's. Returns the bytes of tensor data written."""
    layout, offset = [], 0
    for info in header.tensors.values():
        dtype = changed.get(info.name, info.dtype)
        size = tensor_nbytes(dtype, info.shape)
        layout.append((info, dtype, offset, offset + size))
        offset += size
    # a dense input whose dtypes stay keeps its header byte for byte (and every offset)
    same_layout = all(dtype == info.dtype and info.begin == len(header.raw) + begin for info, dtype, begin, _ in layout)
    new_metadata = {**(header.metadata or {}), **metadata} if metadata else header.metadata
    raw_header = header.raw if same_layout and new_metadata == header.metadata else _header_bytes(layout, new_metadata)
    # one reused (64-byte aligned) read buffer: no fresh pages to fault in for each changed tensor
    scratch = torch.empty(max((header.tensors[name].nbytes for name in changed), default=0), dtype=torch.uint8)
    with open(header.path, "rb") as source, open(out_path, "wb", buffering=0) as target:
        src_fd, dst_fd = source.fileno(), target.fileno()
        _write_all(dst_fd, memoryview(raw_header))
        run_begin = run_end = None  # a run of untouched tensors adjacent in the input: one copy call
        for info, dtype, _, _ in layout:
            if info.name not in changed:
                if run_end != info.begin:
                    if run_begin is not None:
                        _copy_range(src_fd, dst_fd, run_begin, run_end - run_begin)
                    run_begin = info.begin
                run_end = info.end
                continue
            if run_begin is not None:
                _copy_range(src_fd, dst_fd, run_begin, run_end - run_begin)
                run_begin = run_end = None
            result = transform(info, read_tensor(src_fd, info, scratch))
            if DTYPE_NAMES.get(result.dtype) != dtype or tuple(result.shape) != info.shape:
                raise RuntimeError(f"transform of {info.name} gave {result.dtype} {tuple(result.shape)}, expected {dtype} {info.shape}")
            _write_all(dst_fd, memoryview(result.contiguous().reshape(-1).view(torch.uint8).numpy()))
        if run_begin is not None:
            _copy_range(src_fd, dst_fd, run_begin, run_end - run_begin)
    return offset


def _header_bytes(layout: list, metadata: dict[str, str] | None) -> bytes:
    entries: dict = {} if metadata is None else {"__metadata__": metadata}
    for info, dtype, begin, end in layout:
        entries[info.name] = {"dtype": dtype, "shape": list(info.shape), "data_offsets": [begin, end]}
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % _ALIGN)
    return struct.pack("<Q", len(text)) + text


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append `length` bytes of the source from `offset` to the target's current position."""
    while length and hasattr(os, "copy_file_range"):
        try:
            copied = os.copy_file_range(src_fd, dst_fd, length, offset)
        except OSError as err:
            # other filesystems or old kernels: fall back to plain reads and writes
            if err.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                break
            raise
        if copied == 0:
            raise UserError(f"input ends {length} bytes early: is the file truncated?")
        offset, length = offset + copied, length - copied
    while length:
        chunk = os.pread(src_fd, min(length, _CHUNK), offset)
        if not chunk:
            raise UserError(f"input ends {length} bytes early: is the file truncated?")
        _write_all(dst_fd, memoryview(chunk))
        offset, length = offset + len(chunk), length - len(chunk)
