"""Curves drawn with Pillow alone (no plotting library needed on training machines): a run's loss, or panels of
several labelled series side by side."""

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series: dict, y_label: str) -> None:
    """One framed plot of `series` ({label: (xs, ys)}) inside `box`, with min/max labels and a legend."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 20, y0 + 24, y1 - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, y0 + 6), title, fill="black")
    points = {label: [(x, y) for x, y in zip(*xy) if math.isfinite(y)] for label, xy in series.items()}
    every = [p for pts in points.values() for p in pts]
    if every:
        s0, s1 = min(x for x, _ in every), max(x for x, _ in every)
        s1 = s1 if s1 > s0 else s0 + 1
        lo, hi = min(y for _, y in every), max(y for _, y in every)
        hi = hi if hi > lo else lo + 1e-8

        def to_pixel(x, y):
            return left + (x - s0) / (s1 - s0) * (right - left), top + (hi - y) / (hi - lo) * (bottom - top)

        for i, (label, pts) in enumerate(points.items()):
            colour = COLOURS[i % len(COLOURS)]
            if len(pts) > 1:
                draw.line([to_pixel(x, y) for x, y in pts], fill=colour, width=2)
            draw.text((right - 150, top + 6 + 14 * i), label, fill=colour)
        draw.text((x0 + 5, top), f"{hi:.4g}", fill="black")
        draw.text((x0 + 5, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 8), f"step {s0:g}", fill="black")
        draw.text((right - 80, bottom + 8), f"step {s1:g}", fill="black")
    draw.text(((left + right) // 2 - 20, y1 - 18), y_label, fill="black")


def curves_png(panels: list[tuple[str, dict]], path, y_label: str = "loss", panel_size=(640, 360)) -> Path:
    """Panels side by side, each `(title, {label: (xs, ys)})`, into a PNG at `path`."""
    width, height = panel_size
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, series) in enumerate(panels):
        _panel(draw, (i * width, 0, (i + 1) * width, height), title, series, y_label)
    path = Path(path)
    image.save(path)
    return path


def loss_curve_png(steps: list[int], losses: list[float], path, size=(640, 360)) -> Path:
    """Plot loss against step, with min/max labels, into a PNG at `path`."""
    return curves_png([("", {"": (steps, losses)})], path, panel_size=size)
