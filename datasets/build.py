"""`PREFIX:ROOT` data specs: the table of layouts, their splits, and build_dataset that turns a spec into a dataset."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from restune_sd.datasets.caption_dataset import CaptionDataset
from restune_sd.datasets.coco import read_coco
from restune_sd.datasets.finegrained import (
    read_aircraft, read_cars, read_class_folders, read_cub, read_flowers102, read_food101,
)
from restune_sd.datasets.folder import read_metadata_folder
from restune_sd.datasets.hf import read_hf
from restune_sd.datasets.kohya import read_kohya_folder
from restune_sd.datasets.masks import Masks
from restune_sd.datasets.tags import TagOptions
from restune_sd.errors import UserError

TRAIN_TEST = {"train": "train", "val": "test", "test": "test"}


@dataclass(frozen=True)
class Layout:
    description: str
    splits: dict[str, str]  # split a caller asks for -> the distributor's split that is read
    read: Callable[[Path, str], list]
    captions_from_class: bool  # read gives (path, class name) pairs, captioned through the template
    options: tuple[str, ...] = ()  # build_dataset's keyword options that read takes too


# In every fine-grained set the train split absorbs the distributor's val images, so "val" means the test images.
REGISTRY = {
    "coco": Layout("COCO2017 captions: annotations/captions_{train,val}2017.json + {train,val}2017/ (test reads val)",
                   {"train": "train", "val": "val", "test": "val"}, read_coco, False),
    "cub": Layout("CUB-200-2011: images.txt, classes.txt, image_class_labels.txt, train_test_split.txt, images/",
                  TRAIN_TEST, read_cub, True),
    "flowers102": Layout("Oxford Flowers-102: jpg/, imagelabels.mat, setid.mat (train = trnid + valid, test = tstid)",
                         TRAIN_TEST, read_flowers102, True),
    "cars": Layout("Stanford Cars: devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
                   "cars_test_annos_withlabels.mat, cars_test/", TRAIN_TEST, read_cars, True),
    "aircraft": Layout("FGVC-Aircraft 2013b variants: data/images/, data/images_variant_*.txt (train = trainval)",
                       {"train": "trainval", "val": "test", "test": "test"}, read_aircraft, True),
    "food101": Layout("Food-101: images/<class>/, meta/{train,test,classes,labels}.txt", TRAIN_TEST, read_food101, True),
    "classfolder": Layout("one sub-folder of images per class, captioned from the folder name (train only)",
                          {"train": "train"}, read_class_folders, True),
    "folder": Layout("images + metadata.jsonl lines {\"file_name\", \"text\"} (Hugging Face imagefolder; train only)",
                     {"train": "train"}, read_metadata_folder, False),
    "kohya": Layout("images with same-name .caption or .txt captions (--caption-extension); N_name sub-folders "
                    "repeat their images N times (kohya sd-scripts; train only)", {"train": "train"}, read_kohya_folder, False,
                    ("caption_extension",)),
    "hf": Layout("a Hugging Face dataset folder from save_to_disk, or an imagefolder with metadata.jsonl/csv "
                 "(--image-column, --caption-column)", {"train": "train", "val": "validation", "test": "test"},
                 read_hf, False, ("image_column", "caption_column")),
}
LAYOUTS: dict[str, str] = {prefix: layout.description for prefix, layout in REGISTRY.items()}


def check_caption_template(template: str) -> None:
    try:
        filled = template.format("NAME")
    except (IndexError, KeyError, ValueError):
        raise UserError(f"caption template {template!r} must contain one {{}} for the class name and no other braces") from None
    if "NAME" not in filled:
        raise UserError(f"caption template {template!r} has no {{}} for the class name: write e.g. 'a photo of a {{}}'")


def build_dataset(spec: str, *, split: str = "train", resolution: int = 512, center_crop: bool = True,
                  random_flip: bool = False, caption_template: str = "a photo of a {}", seed: int = 0,
                  caption_extension: str | None = None, image_column: str = "image", caption_column: str = "text",
                  caption_dropout: float = 0.0, bucket_sizes: list[tuple[int, int]] | None = None,
                  tags: TagOptions = TagOptions(), masked_loss: bool = False, mask_dir: str | None = None
                  ) -> CaptionDataset:
    """The dataset named by `spec` (PREFIX:ROOT), checked on disk before anything is returned; see LAYOUTS.

    `caption_extension` applies to kohya: (None: .caption, else .txt), the columns to hf:; see CaptionDataset for the
    rest. With `masked_loss` each image's loss mask is found beside it or in `mask_dir` (datasets/masks.py).
    """
    options = {"caption_extension": caption_extension, "image_column": image_column, "caption_column": caption_column}
    prefix, colon, root = spec.partition(":")
    if not colon or prefix.lower() not in REGISTRY:
        raise UserError(f"unknown data source {spec!r}: write PREFIX:ROOT with PREFIX one of {', '.join(REGISTRY)}")
    prefix = prefix.lower()
    if not root.strip():
        raise UserError(f"data source {spec!r} names no folder: write {prefix}:ROOT")
    layout = REGISTRY[prefix]
    if split not in layout.splits:
        raise UserError(f"{prefix} has no split {split!r}: use one of {', '.join(layout.splits)}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise UserError(f"resolution must be a positive number of pixels, not {resolution!r}")
    if layout.captions_from_class:
        check_caption_template(caption_template)
    items = layout.read(Path(root), layout.splits[split], **{name: options[name] for name in layout.options})
    if layout.captions_from_class:
        items = [(path, [caption_template.format(name)]) for path, name in items]
    if not items:
        raise UserError(f"{spec} has no images in its {split} split: check the data set's split files")
    masks = Masks.find([source for source, _ in items], mask_dir, spec) if masked_loss else None
    return CaptionDataset(items, name=spec, resolution=resolution, center_crop=center_crop, random_flip=random_flip,
                          seed=seed, caption_dropout=caption_dropout, bucket_sizes=bucket_sizes, tags=tags, masks=masks)
