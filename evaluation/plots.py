"""A loss-curve PNG drawn with Pillow alone (no plotting library needed on training machines)."""

import math
from pathlib import Path

from PIL import Image, ImageDraw


def loss_curve_png(steps: list[int], losses: list[float], path, size=(640, 360)) -> Path:
    """Plot loss against step, with min/max labels, into a PNG at `path`."""
    width, height = size
    left, right, top, bottom = 60, 20, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [(s, l) for s, l in zip(steps, losses) if math.isfinite(l)]
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if points:
        s0, s1 = points[0][0], max(points[-1][0], points[0][0] + 1)
        lo, hi = min(l for _, l in points), max(l for _, l in points)
        hi = hi if hi > lo else lo + 1e-8

        def xy(step, loss):
            x = left + (step - s0) / (s1 - s0) * (width - left - right)
            return x, top + (hi - loss) / (hi - lo) * (height - top - bottom)

        draw.line([xy(s, l) for s, l in points], fill=(31, 119, 180), width=2)
        draw.text((5, top), f"{hi:.4g}", fill="black")
        draw.text((5, height - bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, height - bottom + 8), f"step {s0}", fill="black")
        draw.text((width - right - 80, height - bottom + 8), f"step {s1}", fill="black")
    draw.text((width // 2 - 20, height - 18), "loss", fill="black")
    path = Path(path)
    image.save(path)
    return path
