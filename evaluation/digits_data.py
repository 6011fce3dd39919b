"""The UCI handwritten digits that scikit-learn ships inside its package (`load_digits`: 1,797 real 8x8 images,
nothing downloaded), split by digit for transfer: a backbone is trained on digits 0-4 and tuned on digits 5-9.

Every split is fixed by a seed, stratified by digit, and written in the layouts the commands read: `classfolder:`
(ROOT/{train,test}/<digit>/NNNN.png) for `restune-sd classify`, and `folder:` (images + metadata.jsonl captions
"a handwritten digit 7") for `restune-sd train`. Ink is drawn white on black, upscaled bicubically.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
TRANSFER_DIGITS = (5, 6, 7, 8, 9)
TEST_FRACTION = 0.3
SPLIT_SEED = 0


def caption(digit: int) -> str:
    return f"a handwritten digit {digit}"


@dataclass(frozen=True)
class Digits:
    """Images as uint8 [n, 8, 8] (0 = no ink, 255 = full ink) and their digits [n]."""

    images: np.ndarray
    labels: np.ndarray

    def subset(self, indices) -> "Digits":
        return Digits(self.images[indices], self.labels[indices])


def load() -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)  # its values are ink counts 0..16
    return Digits(images, data.target.astype(np.int64))


def split(digits: Digits, keep: tuple[int, ...], test_fraction: float = TEST_FRACTION,
          seed: int = SPLIT_SEED) -> tuple[Digits, Digits]:
    """(train, test) of the digits in `keep`: per digit, a fixed random `test_fraction` is test, the rest train."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in keep:
        members = np.flatnonzero(digits.labels == digit)
        members = members[rng.permutation(len(members))]
        cut = int(round(len(members) * test_fraction))
        test += members[:cut].tolist()
        train += members[cut:].tolist()
    return digits.subset(np.sort(train)), digits.subset(np.sort(test))


def render(image: np.ndarray, size: int) -> Image.Image:
    """One 8x8 digit as a size x size RGB picture (bicubic upscaling)."""
    small = Image.fromarray(image, mode="L")
    return small.resize((size, size), Image.BICUBIC).convert("RGB")


def write_classfolder(root, splits: dict[str, Digits], size: int) -> Path:
    """ROOT/<split>/<digit>/NNNN.png for each split: the `classfolder:` layout."""
    root = Path(root)
    for name, part in splits.items():
        for index, (image, digit) in enumerate(zip(part.images, part.labels)):
            folder = root / name / str(int(digit))
            folder.mkdir(parents=True, exist_ok=True)
            render(image, size).save(folder / f"{index:04d}.png")
    return root


def write_captioned(root, part: Digits, size: int) -> Path:
    """Images with metadata.jsonl lines {"file_name", "text": "a handwritten digit D"}: the `folder:` layout."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, digit) in enumerate(zip(part.images, part.labels)):
        name = f"{index:04d}.png"
        render(image, size).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": caption(int(digit))}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
