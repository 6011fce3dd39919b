"""Readers for the fine-grained sets in their distributors' layouts (CUB, NABirds, Flowers-102, Stanford Dogs, Stanford
Cars, FGVC-Aircraft, Food-101) and for generic class folders; each returns (image path, clean class name) pairs for one
split, and *_class_names gives a set's classes in label order."""

import re
from pathlib import Path

import numpy as np

from restune_sd.datasets.checks import (
    descend, load_mat, read_lines, read_pairs, require_folder, require_images, require_root,
)
from restune_sd.datasets.flower_names import FLOWER_NAMES
from restune_sd.datasets.masks import is_mask_file
from restune_sd.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

CUB_FIX = "extract CUB_200_2011.tgz and pass the CUB_200_2011 folder (or its parent)"
NABIRDS_FIX = "extract nabirds.tar.gz from the Cornell Lab and pass the nabirds folder (or its parent)"
DOGS_FIX = ("extract images.tar and lists.tar from the Stanford Dogs site into ROOT (Images/ and train_list.mat, "
            "test_list.mat in ROOT or ROOT/lists)")
FLOWERS_FIX = "put 102flowers.tgz's jpg/ folder, imagelabels.mat and setid.mat from the Oxford VGG site in ROOT"
CARS_FIX = "extract car_devkit.tgz, cars_train.tgz and cars_test.tgz from the Stanford Cars site into ROOT"
CARS_TEST_FIX = "download cars_test_annos_withlabels.mat (shipped separately) into ROOT or ROOT/devkit"
AIRCRAFT_FIX = "extract fgvc-aircraft-2013b.tar.gz and pass the fgvc-aircraft-2013b folder (or its parent)"
FOOD_FIX = "extract food-101.tar.gz and pass the food-101 folder (or its parent)"


def clean_class_name(raw: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'; aircraft variants such as '707-320' are kept."""
    name = re.sub(r"^\d+\.\s*", "", raw.strip()).replace("_", " ")
    return " ".join(name.split())


def cub_root(root, prefix: str = "cub", subfolder: str = "CUB_200_2011") -> Path:
    return descend(require_root(root, prefix, f"{subfolder}'s images.txt and images/"), "images.txt", subfolder)


def read_cub(root, split: str, prefix: str = "cub", fix: str = CUB_FIX, subfolder: str = "CUB_200_2011"
             ) -> list[tuple[Path, str]]:
    """CUB-200-2011 (or NABirds, which ships the same files); train_test_split.txt marks training images with 1."""
    root = cub_root(root, prefix, subfolder)
    listing = root / "images.txt"
    files = read_pairs(listing, prefix, fix)
    labels = {key: value for _, key, value in read_pairs(root / "image_class_labels.txt", prefix, fix)}
    is_train = {key: value for _, key, value in read_pairs(root / "train_test_split.txt", prefix, fix)}
    classes = {key: clean_class_name(value) for _, key, value in read_pairs(root / "classes.txt", prefix, fix)}
    images = require_folder(root / "images", prefix, fix)
    wanted = "1" if split == "train" else "0"
    items = []
    for number, image_id, relative in files:
        if image_id not in labels or image_id not in is_train:
            raise UserError(f"{prefix}: image {image_id} ({listing} line {number}) has no entry in "
                            f"image_class_labels.txt or train_test_split.txt: {fix}")
        if labels[image_id] not in classes:
            raise UserError(f"{prefix}: image {image_id} has class {labels[image_id]}, which classes.txt lacks: {fix}")
        if is_train[image_id] == wanted:
            items.append((images / relative, classes[labels[image_id]]))
    require_images([path for path, _ in items], prefix, fix, images)
    return items


def read_nabirds(root, split: str) -> list[tuple[Path, str]]:
    """NABirds (555 classes), whose classes.txt also names the inner nodes of its hierarchy, which label no image."""
    return read_cub(root, split, prefix="nabirds", fix=NABIRDS_FIX, subfolder="nabirds")


def cub_class_names(root, prefix: str = "cub", fix: str = CUB_FIX, subfolder: str = "CUB_200_2011") -> list[str]:
    """The classes.txt entries that label an image, in classes.txt order (CUB: all 200; NABirds: the 555 leaves)."""
    root = cub_root(root, prefix, subfolder)
    used = {value for _, _, value in read_pairs(root / "image_class_labels.txt", prefix, fix)}
    return [clean_class_name(name) for _, key, name in read_pairs(root / "classes.txt", prefix, fix) if key in used]


def nabirds_class_names(root) -> list[str]:
    return cub_class_names(root, prefix="nabirds", fix=NABIRDS_FIX, subfolder="nabirds")


def integer_vector(value, path: Path, key: str, prefix: str, fix: str) -> list[int]:
    vector = np.atleast_1d(np.asarray(value))
    if vector.ndim != 1 or vector.dtype.kind not in "iuf" or not np.all(vector == np.round(vector)):
        raise UserError(f"{prefix}: {key} in {path} is not a vector of integers: {fix}")
    return [int(v) for v in vector]


def read_flowers102(root, split: str) -> list[tuple[Path, str]]:
    """Oxford Flowers-102; train is setid's trnid + valid (2,040 images), test is tstid (6,149 images); the splits
    trnid and valid read those halves of train alone."""
    root = descend(require_root(root, "flowers102", "jpg/, imagelabels.mat and setid.mat"), "imagelabels.mat",
                   "flowers-102")
    labels_path, setid_path = root / "imagelabels.mat", root / "setid.mat"
    labels = integer_vector(load_mat(labels_path, "flowers102", ("labels",), FLOWERS_FIX)["labels"], labels_path,
                            "labels", "flowers102", FLOWERS_FIX)
    setid = load_mat(setid_path, "flowers102", ("trnid", "valid", "tstid"), FLOWERS_FIX)
    keys = {"train": ("trnid", "valid"), "trnid": ("trnid",), "valid": ("valid",)}.get(split, ("tstid",))
    ids = [i for key in keys for i in integer_vector(setid[key], setid_path, key, "flowers102", FLOWERS_FIX)]
    if any(not 1 <= i <= len(labels) for i in ids):
        raise UserError(f"flowers102: {setid_path} lists image ids outside 1..{len(labels)}, the images labelled in "
                        f"{labels_path}: {FLOWERS_FIX}")
    if any(not 1 <= label <= len(FLOWER_NAMES) for label in labels):
        raise UserError(f"flowers102: {labels_path} has labels outside 1..102: {FLOWERS_FIX}")
    images = require_folder(root / "jpg", "flowers102", FLOWERS_FIX)
    items = [(images / f"image_{i:05d}.jpg", FLOWER_NAMES[labels[i - 1] - 1]) for i in ids]
    require_images([path for path, _ in items], "flowers102", FLOWERS_FIX, images)
    return items


def read_cars(root, split: str) -> list[tuple[Path, str]]:
    """Stanford Cars in the original devkit layout; the test labels come from cars_test_annos_withlabels.mat."""
    root = require_root(root, "cars", "devkit/, cars_train/ and cars_test/")
    meta_path = root / "devkit" / "cars_meta.mat"
    names = [str(name) for name in np.atleast_1d(load_mat(meta_path, "cars", ("class_names",), CARS_FIX)["class_names"])]
    if split == "train":
        annotations_path, fix = root / "devkit" / "cars_train_annos.mat", CARS_FIX
    else:
        candidates = [root / "cars_test_annos_withlabels.mat", root / "devkit" / "cars_test_annos_withlabels.mat"]
        annotations_path, fix = next((p for p in candidates if p.is_file()), candidates[0]), CARS_TEST_FIX
    annotations = np.atleast_1d(load_mat(annotations_path, "cars", ("annotations",), fix)["annotations"])
    if annotations.dtype.names is None or not {"fname", "class"} <= set(annotations.dtype.names):
        raise UserError(f"cars: {annotations_path} has no annotations struct with fname and class fields: {fix}")
    images = require_folder(root / f"cars_{split}", "cars", CARS_FIX)
    items = []
    for record in annotations:
        label = int(record["class"])
        if not 1 <= label <= len(names):
            raise UserError(f"cars: {annotations_path} gives {record['fname']} class {label}, but {meta_path} names "
                            f"only {len(names)} classes: {CARS_FIX}")
        items.append((images / str(record["fname"]), clean_class_name(names[label - 1])))
    require_images([path for path, _ in items], "cars", CARS_FIX, images)
    return items


def cars_class_names(root) -> list[str]:
    """The 196 names of devkit/cars_meta.mat in label order."""
    meta_path = require_root(root, "cars", "devkit/, cars_train/ and cars_test/") / "devkit" / "cars_meta.mat"
    names = np.atleast_1d(load_mat(meta_path, "cars", ("class_names",), CARS_FIX)["class_names"])
    return [clean_class_name(str(name)) for name in names]


def dog_breed(folder: str) -> str:
    """'n02085782-Japanese_spaniel' -> 'Japanese spaniel'."""
    return clean_class_name(re.sub(r"^n\d+-", "", folder))


def dogs_class_folders(root: Path) -> list[str]:
    """Images/'s class folders in label order (sorted WordNet ids, as the lists' labels 1..120 count them)."""
    images = require_folder(root / "Images", "dogs", DOGS_FIX)
    folders = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"dogs: {images} has no breed folders: {DOGS_FIX}")
    return folders


def read_dogs(root, split: str) -> list[tuple[Path, str]]:
    """Stanford Dogs: Images/<wnid>-<breed>/, the split from train_list.mat or test_list.mat (in ROOT or ROOT/lists)."""
    root = require_root(root, "dogs", "Images/ and the lists (train_list.mat, test_list.mat)")
    candidates = [root / "lists" / f"{split}_list.mat", root / f"{split}_list.mat"]
    listing = next((p for p in candidates if p.is_file()), candidates[0])
    if not listing.is_file() and any((folder / "file_list.mat").is_file() for folder in (root, root / "lists")):
        raise UserError(f"dogs: {listing} is missing and file_list.mat holds no train/test split: {DOGS_FIX}")
    files = np.atleast_1d(load_mat(listing, "dogs", ("file_list",), DOGS_FIX)["file_list"])
    folders = set(dogs_class_folders(root))
    items = []
    for entry in files:
        relative = str(np.asarray(entry).squeeze())
        folder = relative.partition("/")[0]
        if folder not in folders:
            raise UserError(f"dogs: {listing} lists {relative}, whose breed folder is not in {root / 'Images'}: "
                            f"{DOGS_FIX}")
        items.append((root / "Images" / relative, dog_breed(folder)))
    require_images([path for path, _ in items], "dogs", DOGS_FIX, root / "Images")
    return items


def dogs_class_names(root) -> list[str]:
    return [dog_breed(folder) for folder in dogs_class_folders(require_root(root, "dogs", "Images/ and the lists"))]


def read_aircraft(root, split: str) -> list[tuple[Path, str]]:
    """FGVC-Aircraft 2013b at the variant level; `split` names the listing: trainval or test."""
    root = descend(require_root(root, "aircraft", "fgvc-aircraft-2013b's data/ folder"), "data", "fgvc-aircraft-2013b")
    data = require_folder(root / "data", "aircraft", AIRCRAFT_FIX)
    variants = {line for _, line in read_lines(data / "variants.txt", "aircraft", AIRCRAFT_FIX)}
    listing = data / f"images_variant_{split}.txt"
    images = require_folder(data / "images", "aircraft", AIRCRAFT_FIX)
    items = []
    for number, image_id, variant in read_pairs(listing, "aircraft", AIRCRAFT_FIX):
        if variant not in variants:
            raise UserError(f"aircraft: {listing} line {number} names variant {variant!r}, which variants.txt lacks: "
                            f"{AIRCRAFT_FIX}")
        items.append((images / f"{image_id}.jpg", clean_class_name(variant)))
    require_images([path for path, _ in items], "aircraft", AIRCRAFT_FIX, images)
    return items


def read_food101(root, split: str) -> list[tuple[Path, str]]:
    """Food-101; class names come from meta/labels.txt ('Apple pie') when present, else from meta/classes.txt."""
    root = descend(require_root(root, "food101", "food-101's images/ and meta/"), "meta", "food-101")
    meta = root / "meta"
    classes = [line for _, line in read_lines(meta / "classes.txt", "food101", FOOD_FIX)]
    names = [clean_class_name(c) for c in classes]
    if (meta / "labels.txt").is_file():
        labels = [line for _, line in read_lines(meta / "labels.txt", "food101", FOOD_FIX)]
        if len(labels) != len(classes):
            raise UserError(f"food101: {meta / 'labels.txt'} has {len(labels)} names for the {len(classes)} classes "
                            f"of classes.txt: {FOOD_FIX}")
        names = labels
    name_of = dict(zip(classes, names))
    listing = meta / f"{split}.txt"
    images = require_folder(root / "images", "food101", FOOD_FIX)
    items = []
    for number, entry in read_lines(listing, "food101", FOOD_FIX):
        folder = entry.partition("/")[0]
        if folder not in name_of:
            raise UserError(f"food101: {listing} line {number} names class {folder!r}, which classes.txt lacks: "
                            f"{FOOD_FIX}")
        items.append((images / f"{entry}.jpg", name_of[folder]))
    require_images([path for path, _ in items], "food101", FOOD_FIX, images)
    return items


def read_class_folders(root, split: str) -> list[tuple[Path, str]]:
    """One sub-folder per class, named after it ('red_fox' -> 'red fox'); hidden files and folders, and --masked-loss
    masks (<stem>.mask.png), are ignored."""
    root = require_root(root, "classfolder", "one sub-folder of images per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"classfolder: {root} has no class sub-folders: put each class's images in ROOT/<class name>/ "
                        "(for captioned images use folder: with a metadata.jsonl)")
    items = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not is_mask_file(p))
        if not files:
            raise UserError(f"classfolder: class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}): "
                            "add images or remove the folder")
        items += [(path, clean_class_name(folder.name)) for path in files]
    return items
