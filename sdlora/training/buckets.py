"""Aspect-ratio buckets and the sampler that draws each batch from one bucket, in a seeded, shardable order."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

Size = tuple[int, int]  # (width, height) in pixels


def bucket_step(resolution: int) -> int:
    """The multiple every bucket side is rounded to for this resolution."""
    # SD's VAE divides by 8 and its UNet halves the latents 3 times, so 64-pixel sides keep every feature map whole.
    # Below 256 px (test-sized models) 64 would leave one bucket; 16 still gives a spread of shapes and stays
    # divisible for a VAE + UNet that together divide by at most 16 (the tiny model divides by 4).
    return 64 if resolution >= 256 else 16


def bucket_sizes(resolution: int, min_side: int | None = None, max_side: int | None = None, step: int | None = None) -> list[Size]:
    """(width, height) buckets with area <= resolution^2 and sides multiples of `step`, portrait and landscape alike.

    Defaults: sides from resolution // 2 to resolution * 2 (aspect ratios up to 1:4 and 4:1), step from `bucket_step`.
    """
    step = step or bucket_step(resolution)
    min_side = max(step, _round_up(min_side if min_side is not None else resolution // 2, step))
    max_side = max_side if max_side is not None else resolution * 2
    if resolution < step or max_side < min_side:
        raise ValueError(f"no buckets for resolution {resolution} with sides {min_side}..{max_side} in steps of {step}")
    sizes: set[Size] = set()
    for width in range(min_side, max_side + 1, step):
        # the tallest height this width allows; the transposed pair makes portrait and landscape sets mirror each other
        height = min(max_side, resolution * resolution // width // step * step)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def training_sizes(resolution: int, buckets: bool) -> list[Size]:
    """The sizes images are fitted to: the aspect buckets, or only the square."""
    return bucket_sizes(resolution) if buckets else [(resolution, resolution)]


def assign_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (in log ratio); ties go to the larger bucket."""
    if not buckets:
        raise ValueError("assign_bucket needs at least one bucket")
    target = math.log(width / height)
    # ties -> more pixels kept, then the smaller width, so the choice never depends on the list's order
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b[0]))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket, reshuffled every epoch from (seed, epoch).

    Every index appears once per epoch. Incomplete batches (the tail of each bucket) are kept by default so small
    datasets still train; `drop_last=True` drops them. With `num_replicas` processes, rank r takes batches
    r, r + R, r + 2R, ... of the epoch's shuffled list, so ranks are disjoint; when the batch count does not divide,
    the list is topped up with its first batches (as torch's DistributedSampler does) so all ranks step equally often.
    """

    def __init__(
        self,
        buckets: Sequence[Size],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        repeats: Sequence[int] | None = None,
    ):
        if not buckets:
            raise ValueError("BucketBatchSampler needs at least one image")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.buckets = [tuple(b) for b in buckets]
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._groups: dict[Size, list[int]] = {}
        if repeats is not None and (len(repeats) != len(self.buckets) or min(repeats) < 1):
            raise ValueError("repeats must give every image a count of at least 1")
        for index, bucket in enumerate(self.buckets):
            # an image repeated N times per epoch (kohya's N_words folders) is N entries of its bucket
            self._groups.setdefault(bucket, []).extend([index] * (repeats[index] if repeats is not None else 1))
        if self._total_batches() == 0:
            raise ValueError(f"no batch of {batch_size} fits: every bucket has fewer images and drop_last is on")

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def _total_batches(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(group) / self.batch_size) for group in self._groups.values())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch` across every rank, in order (before sharding)."""
        # an integer seed: random.Random hashes it the same way in every process and Python version
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches: list[list[int]] = []
        for bucket in sorted(self._groups):
            group = list(self._groups[bucket])
            if self.shuffle:
                rng.shuffle(group)
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
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
