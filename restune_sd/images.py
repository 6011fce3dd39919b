"""Sheets of images: a grid of rows, and the validation folder (rows = prompts, columns = seeds) written whole."""

import os
import shutil
from pathlib import Path

from restune_sd.files import staging_folder


def image_grid(rows: list[list]):
    """One RGB image of `rows` of PIL images, each cell the size of the first image, white where a row is short."""
    from PIL import Image

    width, height = rows[0][0].size
    sheet = Image.new("RGB", (max(map(len, rows)) * width, len(rows) * height), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((width, height)), (c * width, r * height))
    return sheet


def write_validation_folder(rows: list[list], prompts: list[str], folder: Path) -> Path:
    """Each image as prompt-PPP-image-II.png, grid.png and prompts.txt (one line per row) in `folder`, which appears
    whole or not at all (an earlier folder of that name is replaced)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(folder)
    try:
        for r, row in enumerate(rows):
            for i, image in enumerate(row):
                image.save(staging / f"prompt-{r:03d}-image-{i:02d}.png", format="PNG")
        image_grid(rows).save(staging / "grid.png", format="PNG")
        (staging / "prompts.txt").write_text("".join(f"{' '.join(p.split())}\n" for p in prompts))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
