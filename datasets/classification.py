"""Labelled images for classifier tuning: VTAB-1K exports, the FGVC sets and split class folders, named by `PREFIX:ROOT`
specs; the fine-grained layouts share the SD side's readers and only turn class names into label indices."""

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from restune_sd.datasets.checks import read_lines, require_folder, require_images, require_root
from restune_sd.datasets.finegrained import (
    cars_class_names, cub_class_names, dogs_class_names, nabirds_class_names, read_cars, read_class_folders,
    read_cub, read_dogs, read_flowers102, read_nabirds,
)
from restune_sd.datasets.flower_names import FLOWER_NAMES
from restune_sd.datasets.image_files import ImageFiles
from restune_sd.datasets.transforms import resize_shorter_side
from restune_sd.errors import UserError

NATURAL, SPECIALIZED, STRUCTURED = "Natural", "Specialized", "Structured"
# The 19 VTAB-1K tasks under the folder names of the common (NOAH/VPT) exporter, in the paper's table order.
VTAB_TASKS: dict[str, tuple[int, str]] = {
    "cifar": (100, NATURAL), "caltech101": (102, NATURAL), "dtd": (47, NATURAL), "oxford_flowers102": (102, NATURAL),
    "oxford_iiit_pet": (37, NATURAL), "svhn": (10, NATURAL), "sun397": (397, NATURAL),
    "patch_camelyon": (2, SPECIALIZED), "eurosat": (10, SPECIALIZED), "resisc45": (45, SPECIALIZED),
    "diabetic_retinopathy": (5, SPECIALIZED),
    "clevr_count": (8, STRUCTURED), "clevr_dist": (6, STRUCTURED), "dmlab": (6, STRUCTURED), "kitti": (4, STRUCTURED),
    "dsprites_loc": (16, STRUCTURED), "dsprites_ori": (16, STRUCTURED), "smallnorb_azi": (18, STRUCTURED),
    "smallnorb_ele": (9, STRUCTURED),
}
VTAB_GROUPS = (NATURAL, SPECIALIZED, STRUCTURED)
# Other folder names the tasks go by (lower case, '-' read as '_'), e.g. cifar100, pets, camelyon.
VTAB_ALIASES: dict[str, str] = {name: name for name in VTAB_TASKS} | {
    "cifar100": "cifar", "cifar_100": "cifar", "caltech": "caltech101", "caltech_101": "caltech101",
    "flowers102": "oxford_flowers102", "oxford_flowers": "oxford_flowers102", "flowers": "oxford_flowers102",
    "pets": "oxford_iiit_pet", "pet": "oxford_iiit_pet", "oxford_pet": "oxford_iiit_pet",
    "oxford_pets": "oxford_iiit_pet",
    "svhn_cropped": "svhn", "sun": "sun397", "camelyon": "patch_camelyon", "pcam": "patch_camelyon",
    "resisc": "resisc45", "retinopathy": "diabetic_retinopathy",
    "diabetic_retinopathy_detection": "diabetic_retinopathy",
    "clevr_count_all": "clevr_count", "clevr_distance": "clevr_dist", "clevr_closest_object_distance": "clevr_dist",
    "kitti_dist": "kitti", "kitti_distance": "kitti", "dsprites_location": "dsprites_loc",
    "dsprites_position": "dsprites_loc", "dsprites_orientation": "dsprites_ori", "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
}
# Class names where the tfds label order is known; the other tasks are class_0..class_{n-1}.
VTAB_CLASS_NAMES: dict[str, list[str]] = {
    "oxford_flowers102": list(FLOWER_NAMES),
    "svhn": [str(digit) for digit in range(10)],
    "patch_camelyon": ["no tumor", "tumor"],
    "eurosat": ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
                "Residential", "River", "SeaLake"],
    "diabetic_retinopathy": ["no DR", "mild", "moderate", "severe", "proliferative DR"],
    "clevr_count": [f"{count} objects" for count in range(3, 11)],
}
VTAB_FIX = ("export the task with the common VTAB-1K script (NOAH/VPT), which writes train800.txt, val200.txt, "
            "train800val200.txt and test.txt of 'images/<split>/NNNNNN.jpg LABEL' lines into ROOT/TASK")
CLASSFOLDER_FIX = "make ROOT/train, ROOT/val and ROOT/test, each with one sub-folder of images per class"


def vtab_task(name: str) -> str | None:
    """The canonical VTAB-1K task for a folder name or alias ('cifar100' -> 'cifar'), None for anything else."""
    return VTAB_ALIASES.get(name.strip().lower().replace("-", "_"))


def vtab_class_names(task: str) -> list[str]:
    return VTAB_CLASS_NAMES.get(task) or [f"class_{k}" for k in range(VTAB_TASKS[task][0])]


def vtab_task_folder(root) -> tuple[Path, str]:
    """ROOT/TASK as a folder and its canonical task name, or a UserError that says which folder to pass."""
    root = require_root(root, "vtab", "one VTAB-1K task's split files (ROOT/TASK, e.g. vtab-1k/cifar)")
    task = vtab_task(root.name)
    if task is None:
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and vtab_task(p.name))
        if found:
            raise UserError(f"vtab: {root} holds VTAB-1K task folders ({', '.join(found)}): pass one of them, e.g. "
                            f"vtab:{root / found[0]}")
        raise UserError(f"vtab: folder {root.name!r} is not a VTAB-1K task name: name it after one of "
                        f"{', '.join(VTAB_TASKS)} (its class count checks the labels)")
    return root, task


def read_vtab(root, split_file: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """One split file of a VTAB-1K task folder; every label is checked against the task's class count."""
    root, task = vtab_task_folder(root)
    num_classes = VTAB_TASKS[task][0]
    listing = root / split_file
    items = []
    for number, line in read_lines(listing, "vtab", VTAB_FIX):
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].lstrip("-").isdecimal():
            raise UserError(f"vtab: {listing} line {number} should read 'images/<split>/NNNNNN.jpg LABEL' but is "
                            f"{line!r}: {VTAB_FIX}")
        label = int(fields[1])
        if not 0 <= label < num_classes:
            raise UserError(f"vtab: {listing} line {number} has label {label}, out of range for {task} "
                            f"({num_classes} classes, labels 0..{num_classes - 1}): check that the folder holds "
                            f"{task}'s export")
        items.append((root / fields[0], label))
    require_images([path for path, _ in items], "vtab", VTAB_FIX, root)
    return items, vtab_class_names(task)


def by_class_name(read_names: Callable[[Path, str], list[tuple[Path, str]]], class_names: Callable[[Path], list[str]],
                  prefix: str) -> Callable[[Path, str], tuple[list[tuple[Path, int]], list[str]]]:
    """A labelled reader from an SD-side reader of (path, class name) pairs and the set's class names in label order."""

    def read(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
        classes = class_names(root)
        label_of = {name: label for label, name in enumerate(classes)}
        if len(label_of) != len(classes):
            repeated = next(name for name in classes if classes.count(name) > 1)
            raise UserError(f"{prefix}: two classes of {root} are both named {repeated!r}: rename one")
        items = []
        for path, name in read_names(root, split):
            if name not in label_of:
                raise UserError(f"{prefix}: {path} has class {name!r}, which is not among the {len(classes)} classes "
                                f"of {root}: every class needs images in the training split")
            items.append((path, label_of[name]))
        return items, classes

    return read


def train_class_names(root: Path) -> list[str]:
    """The classes of a split class-folder set: train/'s sub-folders in sorted order."""
    train = require_folder(require_root(root, "classfolder", "train/, val/ and test/") / "train", "classfolder",
                           CLASSFOLDER_FIX)
    return list(dict.fromkeys(name for _, name in read_class_folders(train, "train")))


def read_split_folder(root: Path, split: str) -> list[tuple[Path, str]]:
    return read_class_folders(require_folder(Path(root) / split, "classfolder", CLASSFOLDER_FIX), split)


# VPT's FGVC protocol (KMnP/vpt src/data/transforms.py): ImageNet's statistics, the shorter side resized to 8/7 of
# the crop (256 for 224), a random crop and flip to train, the centre crop to evaluate.
IMAGENET_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
VAL_FRACTION_DIVISOR = 10  # VPT's FGVC validation split: 10% of train (600 of CUB's 5,994, 815 of Cars' 8,144)
VAL_SALT = "restune-sd val split v1"


@dataclass(frozen=True)
class ClassificationLayout:
    description: str
    splits: dict[str, str]  # split a caller asks for -> what the reader reads
    read: Callable[[Path, str], tuple[list[tuple[Path, int]], list[str]]]  # (path, label) pairs and the class names
    crop: bool = False  # VPT's FGVC protocol: resize the shorter side, then a random (train) or centre (eval) crop
    normalisation: tuple | None = None  # (mean, std) the protocol uses; None: the model's own


def val_carve(items: list[tuple[Path, int]]) -> set[Path]:
    """The fixed validation part of a training split: ceil(10%) of its images (VPT's sizes), those whose paths,
    keyed by its last two parts (class folder or split folder, file name) have the smallest salted SHA-256, so the choice
    depends neither on listing order, nor on which folder ROOT names, nor on the machine or a library's version."""

    def key(path: Path) -> str:
        return hashlib.sha256(f"{VAL_SALT}:{'/'.join(Path(path).parts[-2:])}".encode()).hexdigest()

    count = -(-len(items) // VAL_FRACTION_DIVISOR)
    return set(sorted((path for path, _ in items), key=key)[:count])


def with_val_carved(read):
    """A labelled reader whose "train" is split into "train-minus-val" and "val-of-train" (test is never touched)."""

    def carved(root: Path, split: str):
        if split not in ("train-minus-val", "val-of-train"):
            return read(root, split)
        items, classes = read(root, "train")
        val = val_carve(items)
        return [item for item in items if (item[0] in val) == (split == "val-of-train")], classes

    return carved


# FGVC sets without a validation split of their own: val is carved out of train, never test. `train` is train minus
# that val (for model selection); `trainval` is every training image (what `train` read before).
CARVED = {"train": "train-minus-val", "val": "val-of-train", "trainval": "train", "test": "test"}
FGVC = dict(crop=True, normalisation=IMAGENET_NORMALISATION)
CARVED_NOTE = ("train = train minus val, val = a fixed 10% of the official train (never test), trainval = all of the "
               "official train")


def fgvc(description: str, read, class_names, prefix: str) -> ClassificationLayout:
    return ClassificationLayout(f"{description}; {CARVED_NOTE}", CARVED,
                                with_val_carved(by_class_name(read, class_names, prefix)), **FGVC)


REGISTRY = {
    "vtab": ClassificationLayout(
        "VTAB-1K task folder ROOT/TASK of the common export: train = trainval = train800val200.txt, train800, val200 "
        "(= val), test; TASK is one of the 19 task folder names or an alias", {
            "train": "train800val200.txt", "trainval": "train800val200.txt", "train800": "train800.txt",
            "val200": "val200.txt", "val": "val200.txt", "test": "test.txt"}, read_vtab),
    "cub": fgvc("CUB-200-2011: images.txt, classes.txt, image_class_labels.txt, train_test_split.txt, images/",
                read_cub, cub_class_names, "cub"),
    "nabirds": fgvc("NABirds: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/; the 555 "
                    "classes that label images", read_nabirds, nabirds_class_names, "nabirds"),
    "flowers102": ClassificationLayout(
        "Oxford Flowers-102: jpg/, imagelabels.mat, setid.mat; train = trnid, val = valid, trainval = trnid + valid, "
        "test = tstid (the official splits, as VPT uses them)",
        {"train": "trnid", "trnid": "trnid", "val": "valid", "trainval": "train", "test": "test"},
        by_class_name(read_flowers102, lambda root: list(FLOWER_NAMES), "flowers102"), **FGVC),
    "dogs": fgvc("Stanford Dogs: Images/<wnid>-<breed>/, train_list.mat and test_list.mat in ROOT or ROOT/lists",
                 read_dogs, dogs_class_names, "dogs"),
    "cars": fgvc("Stanford Cars: devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
                 "cars_test_annos_withlabels.mat, cars_test/", read_cars, cars_class_names, "cars"),
    "classfolder": ClassificationLayout("train/, val/ and test/, each with one sub-folder of images per class; the "
                                        "classes are train/'s sub-folders in sorted order",
                                        {"train": "train", "val": "val", "test": "test"},
                                        by_class_name(read_split_folder, train_class_names, "classfolder")),
}
CLASSIFICATION_LAYOUTS: dict[str, str] = {prefix: layout.description for prefix, layout in REGISTRY.items()}


def crop_source(resolution: int) -> int:
    """The shorter side an image is resized to before a `resolution` crop: VPT's 256 for 224 (512 for 448, 438 for 384)."""
    return resolution * 8 // 7


class ClassificationTransform:
    """The VTAB-1K protocol by default: a direct bicubic resize to R x R (no crop). With `crop`, VPT's FGVC protocol:
    the shorter side resized to crop_source(R), then a random R x R crop when training (`train` and an rng given),
    the centre one otherwise. Then an optional random flip, and normalisation."""

    def __init__(self, resolution: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), random_flip: bool = False,
                 crop: bool = False, train: bool = False):
        self.resolution, self.random_flip, self.crop, self.train = resolution, random_flip, crop, train
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.apply(image, rng)[0]

    def apply(self, image: Image.Image, rng: random.Random | None = None) -> tuple[torch.Tensor, bool]:
        """The normalised [3, R, R] tensor of an RGB image and whether it was flipped (never without an rng)."""
        side = self.resolution
        if self.crop:
            image = resize_shorter_side(image, crop_source(side))
            if self.train and rng is not None:
                left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
            else:
                left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        elif image.size != (side, side):
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        flipped = self.random_flip and rng is not None and rng.random() < 0.5
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        return (pixels - self.mean) / self.std, flipped


class ClassificationDataset(ImageFiles):
    """Items `{"pixel_values": [3, R, R] normalised, "label": int, "index": int, "flipped": bool, "skipped": int}`.

    The flip is a pure function of (seed, epoch, index). An image that fails to decode is replaced by the next good
    index, as in CaptionDataset: "index" and "label" are those of the image returned, "skipped" counts the corrupt
    ones passed over. `task` is the canonical VTAB-1K task name for vtab specs, else the layout prefix.
    """

    def __init__(self, records: list[tuple[Path, int]], classes: list[str], *, name: str, task: str | None = None,
                 resolution: int = 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), random_flip: bool = False,
                 seed: int = 0, crop: bool = False, train: bool = False):
        super().__init__([path for path, _ in records], name=name, seed=seed)
        self.labels = [int(label) for _, label in records]
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.task = task or name
        self.transform = ClassificationTransform(resolution, mean, std, random_flip, crop, train)

    def __getitem__(self, index: int) -> dict:
        current, image, rng = self.decode_from(index)
        pixels, flipped = self.transform.apply(image, rng)
        return {"pixel_values": pixels, "label": self.labels[current], "index": current, "flipped": flipped,
                "skipped": (current - index) % len(self)}


def parse_spec(spec: str, registry: dict) -> tuple[str, Path]:
    """(prefix, ROOT) of a `PREFIX:ROOT` spec whose prefix is in `registry`."""
    prefix, colon, root = spec.partition(":")
    if not colon or prefix.lower() not in registry:
        raise UserError(f"unknown data source {spec!r}: write PREFIX:ROOT with PREFIX one of {', '.join(registry)}")
    if not root.strip():
        raise UserError(f"data source {spec!r} names no folder: write {prefix.lower()}:ROOT")
    return prefix.lower(), Path(root)


def check_normalisation(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    values = {}
    for key, triple in (("mean", mean), ("std", std)):
        try:
            numbers = tuple(float(v) for v in triple)
        except (TypeError, ValueError):
            numbers = ()
        if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers) or (key == "std" and min(numbers) <= 0):
            raise UserError(f"{key} must be three finite numbers (one per RGB channel{', each > 0' * (key == 'std')}), "
                            f"not {triple!r}")
        values[key] = numbers
    return values["mean"], values["std"]


def classification_layout(spec: str) -> ClassificationLayout:
    """The layout a `PREFIX:ROOT` spec names, with its protocol (crop, normalisation)."""
    return REGISTRY[parse_spec(spec, REGISTRY)[0]]


def build_classification_dataset(spec: str, *, split: str, resolution: int = 224, mean=(0.5, 0.5, 0.5),
                                 std=(0.5, 0.5, 0.5), random_flip: bool = False, seed: int = 0,
                                 crop: bool | None = None, train: bool = False) -> ClassificationDataset:
    """The labelled dataset named by `spec` (PREFIX:ROOT), checked on disk before anything is returned; see
    CLASSIFICATION_LAYOUTS. `crop` None takes the layout's protocol; `train` draws random crops (with `crop`). Pass
    random_flip and train only for a training split."""
    prefix, root = parse_spec(spec, REGISTRY)
    layout = REGISTRY[prefix]
    if split not in layout.splits:
        raise UserError(f"{prefix} has no split {split!r}: use one of {', '.join(layout.splits)}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise UserError(f"resolution must be a positive number of pixels, not {resolution!r}")
    mean, std = check_normalisation(mean, std)
    items, classes = layout.read(root, layout.splits[split])
    if not items:
        raise UserError(f"{spec} has no images in its {split} split: check the data set's split files")
    task = vtab_task_folder(root)[1] if prefix == "vtab" else prefix
    return ClassificationDataset(items, classes, name=spec, task=task, resolution=resolution, mean=mean, std=std,
                                 random_flip=random_flip, seed=seed, crop=layout.crop if crop is None else crop,
                                 train=train)
