"""The torchvision.transforms subset diffusers' train_text_to_image_lora(_sdxl).py scripts use, on PIL images."""

from __future__ import annotations

import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    BOX = "box"
    HAMMING = "hamming"


_PIL = {
    InterpolationMode.NEAREST: Image.NEAREST,
    InterpolationMode.BILINEAR: Image.BILINEAR,
    InterpolationMode.BICUBIC: Image.BICUBIC,
    InterpolationMode.LANCZOS: Image.LANCZOS,
    InterpolationMode.BOX: Image.BOX,
    InterpolationMode.HAMMING: Image.HAMMING,
}


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, value):
        for transform in self.transforms:
            value = transform(value)
        return value


class Lambda:
    def __init__(self, function):
        self.function = function

    def __call__(self, value):
        return self.function(value)


class Resize:
    """An int size resizes the shorter side to it, keeping the aspect ratio (torchvision's rule)."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size = size
        self.interpolation = interpolation if interpolation is not None else InterpolationMode.BILINEAR

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(self.size, int):
            if width <= height:
                new = (self.size, int(self.size * height / width))
            else:
                new = (int(self.size * width / height), self.size)
        else:
            new = (self.size[1], self.size[0])
        return image.resize(new, _PIL[self.interpolation])


def _crop_box(image: Image.Image, size, left: int, top: int):
    height, width = (size, size) if isinstance(size, int) else size
    return image.crop((left, top, left + width, top + height))


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        height, width = (self.size, self.size) if isinstance(self.size, int) else self.size
        left = int(round((image.width - width) / 2.0))
        top = int(round((image.height - height) / 2.0))
        return _crop_box(image, self.size, left, top)


class RandomCrop:
    def __init__(self, size):
        self.size = size

    @staticmethod
    def get_params(image: Image.Image, output_size):
        height, width = output_size
        return random.randint(0, image.height - height), random.randint(0, image.width - width), height, width

    def __call__(self, image: Image.Image) -> Image.Image:
        height, width = (self.size, self.size) if isinstance(self.size, int) else self.size
        top, left, _, _ = self.get_params(image, (height, width))
        return _crop_box(image, self.size, left, top)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else image


class ToTensor:
    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std
