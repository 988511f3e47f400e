"""Aspect-ratio buckets and the sampler that draws each batch from one bucket, in a seeded, shardable order."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from ..errors import UserError

Size = tuple[int, int]  # (width, height) in pixels


def bucket_step(resolution: int) -> int:
    """The multiple every bucket side is rounded to for this resolution."""
    # SD's VAE divides by 8 and its UNet halves the latents 3 times, so 64-pixel sides keep every feature map whole.
    # Below 256 px (test-sized models) 64 would leave one bucket; 16 still gives a spread of shapes and stays
    # divisible for a VAE + UNet that together divide by at most 16 (the tiny model divides by 4).
    return 64 if resolution >= 256 else 16


def bucket_sizes(
    resolution: int, min_side: int | None = None, max_side: int | None = None, step: int | None = None, area: int | None = None
) -> list[Size]:
    """(width, height) buckets with area <= `area` (default resolution^2) and sides multiples of `step`, portrait
    and landscape alike.

    Defaults: sides from resolution // 2 to resolution * 2 (aspect ratios up to 1:4 and 4:1), step from `bucket_step`.
    """
    step = step or bucket_step(resolution)
    area = area or resolution * resolution
    min_side = max(step, _round_up(min_side if min_side is not None else resolution // 2, step))
    max_side = max_side if max_side is not None else resolution * 2
    if resolution < step or max_side < min_side:
        raise UserError(f"no buckets for resolution {resolution} with sides {min_side}..{max_side} in steps of {step}")
    sizes: set[Size] = set()
    for width in range(min_side, max_side + 1, step):
        # the tallest height this width allows; the transposed pair makes portrait and landscape sets mirror each other
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def training_sizes(resolution: int, buckets: bool) -> list[Size]:
    """The sizes images are fitted to: the aspect buckets, or only the square."""
    return bucket_sizes(resolution) if buckets else [(resolution, resolution)]


def no_upscale_bucket(width: int, height: int, area: int, step: int) -> Size:
    """kohya's bucket_no_upscale: an image within `area` keeps its size, a larger one is scaled down to it at its
    aspect ratio (the side that rounds to `step` closer to the ratio chosen, as kohya's BucketManager does); the
    bucket is that size rounded down to `step`, so the image is cropped, never padded or enlarged."""
    if width * height > area:
        ratio = width / height
        fit_width = math.sqrt(area * ratio)
        fit_height = area / fit_width
        by_width = _round_to(fit_width, step)
        by_height = _round_to(fit_height, step)
        width_error = abs(by_width / _round_to(by_width / ratio, step) - ratio)
        height_error = abs(_round_to(by_height * ratio, step) / by_height - ratio)
        if width_error < height_error:
            width, height = by_width, int(by_width / ratio + 0.5)
        else:
            width, height = int(by_height * ratio + 0.5), by_height
    if width < step or height < step:
        raise UserError(f"an image of {width}x{height} is smaller than one bucket step ({step} px)")
    return width - width % step, height - height % step


def _round_to(value: float, step: int) -> int:
    """kohya's BucketManager.round_to_steps: rounded to a whole pixel, then down to a multiple of `step` (at least
    one step, where kohya would divide by zero)."""
    pixels = int(value + 0.5)
    return max(step, pixels - pixels % step)


def assign_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (in log ratio); ties go to the larger bucket."""
    if not buckets:
        raise UserError("assign_bucket needs at least one bucket")
    target = math.log(width / height)
    # ties -> more pixels kept, then the smaller width, so the choice never depends on the list's order
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b[0]))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket of one dataset, reshuffled every epoch from (seed, epoch).

    `datasets` gives each index its dataset (a dataset TOML's), and `batch_size` may be one per dataset: batches
    never mix datasets, as kohya's dataset group never does.

    Every index appears once per epoch. Incomplete batches (the tail of each bucket) are kept by default so small
    datasets still train; `drop_last=True` drops them. With `num_replicas` processes, rank r takes batches
    r, r + R, r + 2R, ... of the epoch's shuffled list, so ranks are disjoint; when the batch count does not divide,
    the list is topped up with its first batches (as torch's DistributedSampler does) so all ranks step equally often.
    """

    def __init__(
        self,
        buckets: Sequence[Size],
        batch_size: int | Sequence[int],
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        repeats: Sequence[int] | None = None,
        datasets: Sequence[int] | None = None,
    ):
        if not buckets:
            raise UserError("BucketBatchSampler needs at least one image")
        self.batch_sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
        if min(self.batch_sizes) < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise UserError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.buckets = [tuple(b) for b in buckets]
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._groups: dict[tuple[int, Size], list[int]] = {}
        if repeats is not None and (len(repeats) != len(self.buckets) or min(repeats) < 1):
            raise UserError("repeats must give every image a count of at least 1")
        datasets = datasets if datasets is not None else [0] * len(self.buckets)
        if len(datasets) != len(self.buckets) or not all(0 <= d < len(self.batch_sizes) or len(self.batch_sizes) == 1 for d in datasets):
            raise UserError("datasets must give every image a dataset with a batch size")
        for index, bucket in enumerate(self.buckets):
            # an image repeated N times per epoch (kohya's N_words folders) is N entries of its bucket
            key = (datasets[index], bucket)
            self._groups.setdefault(key, []).extend([index] * (repeats[index] if repeats is not None else 1))
        if self._total_batches() == 0:
            raise UserError(f"no batch of {batch_size} fits: every bucket has fewer images and drop_last is on")

    def _batch_size(self, dataset: int) -> int:
        return self.batch_sizes[dataset] if len(self.batch_sizes) > 1 else self.batch_sizes[0]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def _total_batches(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(group) / self._batch_size(dataset)) for (dataset, _), group in self._groups.items())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch` across every rank, in order (before sharding)."""
        # an integer seed: random.Random hashes it the same way in every process and Python version
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches: list[list[int]] = []
        for key in sorted(self._groups):
            group, size = list(self._groups[key]), self._batch_size(key[0])
            if self.shuffle:
                rng.shuffle(group)
            for start in range(0, len(group), size):
                batch = group[start : start + size]
                if len(batch) == size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        per_rank = len(self)
        padded = (batches * (per_rank * self.num_replicas // len(batches) + 1))[: per_rank * self.num_replicas]
        yield from padded[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return math.ceil(self._total_batches() / self.num_replicas)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
