"""Local Hugging Face datasets through the `datasets` library: a folder written by `save_to_disk`, or an imagefolder
(images with metadata.jsonl or metadata.csv) loaded with `load_dataset("imagefolder", data_dir=...)`; never downloads."""

import importlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from restune_sd.datasets.checks import require_inside, require_images, require_root
from restune_sd.errors import UserError

SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what Dataset/DatasetDict.save_to_disk write at the top
SPLIT_NAMES = {"validation": ("validation", "val", "valid")}  # --split val reads whichever the dataset has


def hf_datasets():
    """Hugging Face's `datasets`, also when Python runs from this repository's root, whose datasets/ folder (this
    package's own sources, installed as restune_sd.datasets) would otherwise shadow it."""
    module = sys.modules.get("datasets")
    if module is not None and hasattr(module, "load_from_disk"):
        return module
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when the package is imported: local data only
    sources = Path(__file__).resolve().parent.parent
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != sources]
    sys.modules.pop("datasets", None)
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise UserError("hf: data needs Hugging Face's datasets package: pip install datasets") from None
    finally:
        sys.path[:] = saved


@dataclass(frozen=True, eq=False)
class DatasetRow:
    """One row's image in a Hugging Face dataset, opened on demand: stored bytes, or a file the row names."""

    images: object  # the dataset's image column, with images left undecoded
    column: str
    row: int
    root: Path

    def open(self) -> Image.Image:
        cell = self.images[self.row][self.column]
        if isinstance(cell, str):
            return Image.open(self.root / cell)
        if cell.get("bytes"):
            return Image.open(io.BytesIO(cell["bytes"]))
        return Image.open(cell["path"])

    def __str__(self) -> str:
        return f"{self.root} row {self.row}"


def load_split(root: Path, split: str):
    """The split of the saved dataset or imagefolder at ROOT; a dataset saved without splits is the train split."""
    hf = hf_datasets()
    saved = any((root / marker).is_file() for marker in SAVED_MARKERS)
    bars_were_on = hf.is_progress_bar_enabled()
    hf.disable_progress_bars()  # a run's own progress bar is the one to read
    try:
        loaded = hf.load_from_disk(str(root)) if saved else hf.load_dataset("imagefolder", data_dir=str(root))
    except Exception as error:  # the library's own errors (missing files, no images, bad metadata) say what is wrong
        how = "load_from_disk" if saved else "load_dataset('imagefolder')"
        while error.__cause__ is not None:  # "An error occurred while generating the dataset" wraps the reason
            error = error.__cause__
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"hf: {how} cannot read {root} ({reason}): pass a folder written by save_to_disk, or images "
                        "with a metadata.jsonl/metadata.csv") from None
    finally:
        if bars_were_on:
            hf.enable_progress_bars()
    if isinstance(loaded, hf.DatasetDict):
        names = [name for name in SPLIT_NAMES.get(split, (split,)) if name in loaded]
        if not names:
            raise UserError(f"hf: {root} has no split {split!r}: it has {', '.join(loaded)}")
        return loaded[names[0]]
    if split != "train":
        raise UserError(f"hf: {root} holds one dataset without splits: use it as --split train")
    return loaded


def linked_files(images, column: str) -> list[Path]:
    """The files that rows without stored bytes name (read from the Arrow table: stored bytes stay on disk)."""
    paths = []
    for chunk in images.data.column(column).chunks:
        unstored = chunk.field("bytes").is_null().to_pylist()
        paths += [Path(path) for path, empty in zip(chunk.field("path").to_pylist(), unstored) if empty and path]
    return paths


def require_column(table, name: str, flag: str, root: Path) -> str:
    if name not in table.column_names:
        raise UserError(f"hf: {root} has no column {name!r} (its columns: {', '.join(table.column_names)}): "
                        f"pass {flag} with one of them")
    return name


def caption_list(value, row: int, column: str, root: Path) -> list[str]:
    """A row's captions: one string, or a list of them (one is drawn each time, as diffusers' script does)."""
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise UserError(f"hf: {root} row {row}: column {column!r} holds {value!r}, not a caption or a list of captions: "
                        "pass --caption-column with the column of captions")
    return captions


def read_hf(root, split: str, image_column: str = "image", caption_column: str = "text") -> list[tuple[DatasetRow, list[str]]]:
    """(image of each row, its captions) of a local Hugging Face dataset's split."""
    root = require_root(root, "hf", "a dataset written by save_to_disk, or images with a metadata.jsonl/csv")
    table = load_split(root, split)
    hf = hf_datasets()
    require_column(table, image_column, "--image-column", root)
    require_column(table, caption_column, "--caption-column", root)
    images = table.select_columns([image_column])
    feature = images.features[image_column]
    if isinstance(feature, hf.Image):
        images = images.cast_column(image_column, hf.Image(decode=False))  # decoded by us, one row at a time
        require_inside(linked_files(images, image_column), root, "hf")
    elif getattr(feature, "dtype", None) == "string":
        require_images([root / name for name in images[image_column]], "hf",
                       f"column {image_column!r} names image files relative to {root}: put them there", root)
    else:
        raise UserError(f"hf: column {image_column!r} of {root} holds {feature}, not images: pass --image-column with "
                        "the column of images (or of image file names)")
    captions = [caption_list(value, row, caption_column, root) for row, value in enumerate(table[caption_column])]
    return [(DatasetRow(images, image_column, row, root), texts) for row, texts in enumerate(captions)]
