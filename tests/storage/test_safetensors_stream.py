"""safetensors_stream.py's header reading: a corrupt header is refused naming the file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from sdlora.storage.safetensors_stream import read_header


def test_a_header_naming_a_tensor_twice_is_refused_naming_the_file(tmp_path):
    """JSON keeps the last of two entries silently: a model weight would take the shape of a stray tensor, and a
    LoRA that fits the real weight would be blamed for not fitting it."""
    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.ones(4, 4)}, str(good))
    raw = good.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text, data = raw[8 : 8 + length].decode().rstrip(), raw[8 + length :]
    stray = {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}
    header = (text[:-1] + ',"a.weight":' + json.dumps(stray) + "}").encode()
    header += b" " * (-len(header) % 8)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + data + bytes(8))
    assert read_header(good).tensors["a.weight"].shape == (4, 4)
    with pytest.raises(ValueError, match=rf"{bad} is not a readable .safetensors file \(the header names 'a.weight' twice\)"):
        read_header(bad)
