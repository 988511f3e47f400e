"""torchvision.transforms.functional.crop, which diffusers' SDXL reference script imports (see the package docstring)."""

from __future__ import annotations

from PIL import Image


def crop(image: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    """The (height x width) window of `image` whose top-left corner is (top, left), as torchvision's crop."""
    return image.crop((left, top, left + width, top + height))
