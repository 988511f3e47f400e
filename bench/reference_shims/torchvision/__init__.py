"""A stand-in for torchvision, for running diffusers' reference training script in bench/bench_train.py only.

PyPI's torchvision does not import beside the CPU build of torch this project tests with, and the reference script
needs only `torchvision.transforms` for its image preprocessing. This package provides those few transforms with
Pillow and numpy, with torchvision's semantics (shorter side resized to the size, bilinear by default; center or
random crop; horizontal flip; [0, 1] CHW float tensor; per-channel normalisation). bench_train.py puts it on the
reference's PYTHONPATH only when a real torchvision cannot be imported.
"""

from . import transforms  # noqa: F401

__version__ = "0.0.0+sdlora-bench-shim"
