"""The judge of generated digits: a small classifier trained on the real digits' train splits, which reads an image as
a digit (conditional accuracy: is an image asked for "7" read as 7?) and gives the features of a Frechet distance.

Every image, real or generated, goes through one path: grey levels, an area downscale to 8 x 8 (the digits' own
grid) and ink counts 0..16 as scikit-learn ships them. The classifier is an MLP with one hidden layer of 64 ReLUs;
those 64 activations are the Frechet distance's features (docs/method.md §4's formula, evaluation/fid.py's code).
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from restune_sd.evaluation import digits_data
from restune_sd.evaluation.fid import Statistics, frechet_distance

GRID = 8
HIDDEN = 64


def grid_values(images) -> np.ndarray:
    """PIL images (any size, RGB or grey) as [n, 64] ink values 0..16 on the 8 x 8 grid."""
    small = [np.asarray(image.convert("L").resize((GRID, GRID), Image.BOX), dtype=np.float64) for image in images]
    return np.stack(small).reshape(len(small), -1) * (16 / 255)


def rendered(digits: digits_data.Digits, size: int) -> list[Image.Image]:
    """Real digits as the pipeline sees them: rendered at `size` px (the data folders' rendering)."""
    return [digits_data.render(image, size) for image in digits.images]


@dataclass
class Splits:
    """The real digits split as the benchmark splits them: 0-4 and 5-9 each 70/30 by digit_data.split."""

    train: digits_data.Digits
    test: digits_data.Digits

    @classmethod
    def make(cls, digits: digits_data.Digits) -> "Splits":
        parts = [digits_data.split(digits, keep) for keep in (digits_data.PRETRAIN_DIGITS, digits_data.TRANSFER_DIGITS)]
        join = lambda chosen: digits_data.Digits(np.concatenate([c.images for c in chosen]),  # noqa: E731
                                                 np.concatenate([c.labels for c in chosen]))
        return cls(join([p[0] for p in parts]), join([p[1] for p in parts]))

    def test_of(self, keep: tuple[int, ...]) -> digits_data.Digits:
        return self.test.subset(np.isin(self.test.labels, keep))


class DigitScorer:
    """An MLP on the 8 x 8 grid trained on real train digits rendered at `size` px and brought back to the grid."""

    def __init__(self, train: digits_data.Digits, size: int, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.size = size
        self.model = MLPClassifier(hidden_layer_sizes=(HIDDEN,), max_iter=500, random_state=seed)
        self.model.fit(grid_values(rendered(train, size)) / 16, train.labels)

    def predict(self, images) -> np.ndarray:
        return self.model.predict(grid_values(images) / 16)

    def features(self, images) -> np.ndarray:
        """The hidden layer's ReLU activations, [n, 64]."""
        weights, bias = self.model.coefs_[0], self.model.intercepts_[0]
        return np.maximum(grid_values(images) / 16 @ weights + bias, 0.0)

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def real_accuracy(self, test: digits_data.Digits) -> float:
        """Top-1 on real test digits: the ceiling of any conditional accuracy."""
        return self.accuracy(rendered(test, self.size), test.labels)

    def frechet(self, images, reference) -> float:
        """Frechet distance between two image sets in this classifier's feature space."""
        return frechet_distance(Statistics.from_features(self.features(images)),
                                Statistics.from_features(self.features(reference)))
