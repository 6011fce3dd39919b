"""Aspect-ratio buckets as kohya's sd-scripts makes them: sizes of about the training area with sides a multiple of a
step, and each image assigned to the bucket whose aspect ratio is nearest its own."""

import math
from dataclasses import dataclass

from restune_sd.errors import UserError


def bucket_sizes(resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None
                 ) -> list[tuple[int, int]]:
    """(width, height) of each bucket, sorted: the square of about resolution^2 pixels, then for every width from
    `min_side` to `max_side` in `step`s the tallest height within the area (kohya's make_bucket_resolutions)."""
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or resolution * 2
    for flag, side in (("--bucket-min-side", min_side), ("--bucket-max-side", max_side)):
        if side % step:
            raise UserError(f"{flag} {side} is not a multiple of --bucket-step {step}: use {side // step * step or step}")
    if not min_side <= resolution <= max_side:
        raise UserError(f"--resolution {resolution} must lie between --bucket-min-side {min_side} and "
                        f"--bucket-max-side {max_side}")
    area = resolution * resolution
    square = max(step, math.isqrt(area) // step * step)
    sizes = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


@dataclass(frozen=True)
class Buckets:
    """The bucket sizes and the bucket of each dataset index."""

    sizes: list[tuple[int, int]]  # (width, height)
    of: list[int]

    @classmethod
    def assign(cls, sizes: list[tuple[int, int]], image_sizes: list[tuple[int, int] | None]) -> "Buckets":
        """Each image in the bucket of nearest aspect ratio; an image whose size cannot be read goes in the most
        square bucket (it is skipped as corrupt when it is read, and the next good image takes its place)."""
        ratios = [width / height for width, height in sizes]
        square = min(range(len(sizes)), key=lambda b: abs(math.log(ratios[b])))
        nearest = lambda w, h: min(range(len(sizes)), key=lambda b: abs(ratios[b] - w / h))  # noqa: E731
        return cls(list(sizes), [square if size is None else nearest(*size) for size in image_sizes])

    def members(self) -> list[list[int]]:
        """The indices in each bucket that holds any, in index order."""
        groups = [[] for _ in self.sizes]
        for index, bucket in enumerate(self.of):
            groups[bucket].append(index)
        return [group for group in groups if group]
