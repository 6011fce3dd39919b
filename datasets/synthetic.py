"""Tiny synthetic data sets written in exactly each layout's on-disk format, for tests and the demo.

Class k is a shape on a plain background of colour PALETTE[k % 12]; COCO and folder captions name the colour and
the shape. Everything is deterministic in `seed`.
"""

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from restune_sd.datasets.finegrained import clean_class_name
from restune_sd.datasets.flower_names import FLOWER_NAMES
from restune_sd.errors import UserError

PALETTE = (
    ("red", (220, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 70, 220)), ("yellow", (230, 210, 40)),
    ("purple", (140, 50, 170)), ("orange", (240, 140, 30)), ("cyan", (40, 200, 210)), ("pink", (240, 130, 190)),
    ("brown", (120, 75, 35)), ("grey", (128, 128, 128)), ("white", (240, 240, 240)), ("black", (20, 20, 20)),
)
SHAPES = ("circle", "square", "triangle")
COCO_CAPTIONS = (
    "a {shape} on a {colour} background", "a simple {shape} drawn over {colour}", "{colour} backdrop with a {shape}",
    "an icon of a {shape}, {colour} background", "one {shape} in the middle of a {colour} picture",
)
SYNTHETIC_LAYOUTS = ("coco", "cub", "flowers102", "cars", "aircraft", "food101", "classfolder", "folder", "kohya")
ASPECTS = ((1, 1), (3, 1), (1, 3), (2, 1), (1, 2))  # kohya: image i is stretched to ASPECTS[i % 5], for buckets


def class_words(k: int) -> str:
    """'red circle' for class 0; classes past the palette's end get a number ('red circle 2')."""
    colour, shape = PALETTE[k % len(PALETTE)][0], SHAPES[k % len(SHAPES)]
    return f"{colour} {shape}" + (f" {k // len(PALETTE) + 1}" if k >= len(PALETTE) else "")


def title(words: str) -> str:
    return " ".join(w.capitalize() for w in words.split())


def raw_class_name(layout: str, k: int) -> str:
    """Class k's name as the layout's files spell it."""
    words = class_words(k)
    return {
        "cub": f"{k + 1:03d}." + title(words).replace(" ", "_"),
        "flowers102": FLOWER_NAMES[k % len(FLOWER_NAMES)],
        "cars": f"{title(words)} Coupe 2012",
        "aircraft": f"{title(words)} {100 * (k + 1)}",
        "food101": words.replace(" ", "_"),
        "classfolder": words.replace(" ", "_"),
    }[layout]


def synthetic_class_names(layout: str, num_classes: int = 3) -> list[str]:
    """The class names a fine-grained layout's captions should show for a make_synthetic data set."""
    if layout == "food101":
        return [class_words(k).capitalize() for k in range(num_classes)]  # from meta/labels.txt
    return [clean_class_name(raw_class_name(layout, k)) for k in range(num_classes)]


def draw(k: int, rng: random.Random, size: int) -> Image.Image:
    """Class k's shape on its background; landscape or portrait at random so crops have something to do."""
    width, height = (size, size * 3 // 4) if rng.random() < 0.5 else (size * 3 // 4, size)
    background = PALETTE[k % len(PALETTE)][1]
    if k >= len(PALETTE):
        background = tuple((c + 17 * (k // len(PALETTE))) % 256 for c in background)
    image = Image.new("RGB", (width, height), background)
    fill = (0, 0, 0) if sum(background) > 600 else (255, 255, 255)
    cx, cy = width * rng.uniform(0.42, 0.58), height * rng.uniform(0.42, 0.58)
    r = min(width, height) * rng.uniform(0.12, 0.2)
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = SHAPES[k % len(SHAPES)]
    if shape == "circle":
        ImageDraw.Draw(image).ellipse(box, fill=fill)
    elif shape == "square":
        ImageDraw.Draw(image).rectangle(box, fill=fill)
    else:
        ImageDraw.Draw(image).polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def split_plan(images_per_class: int) -> list[str]:
    """The split of each image of a class: the last is test, the one before val (from three images on), rest train."""
    plan = ["train"] * images_per_class
    plan[-1] = "test"
    if images_per_class >= 3:
        plan[-2] = "val"
    return plan


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        image.save(path, quality=95)
    else:
        image.save(path)
    return path


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def cars_annotations(rows: list[tuple[str, int]], size: int, with_class: bool = True) -> np.ndarray:
    """A 1xN struct array with the fields of the Stanford Cars annotation files (bbox_x1..y2, class, fname)."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    annotations = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, (fname, label) in enumerate(rows):
        box = [np.array([[v]], dtype=np.uint16) for v in (2, 2, size // 2, size // 2)]
        annotations[0, i] = tuple(box + ([np.array([[label]], dtype=np.uint8)] if with_class else []) + [fname])
    return annotations


def make_synthetic(layout: str, root, *, num_classes: int = 3, images_per_class: int = 4, size: int = 48,
                   seed: int = 0, corrupt: int = 0) -> Path:
    """Write a tiny `layout` data set under `root` and return the ROOT to pass as `layout:ROOT`.

    Each class gets `images_per_class` images split by split_plan (COCO: train2017/val2017 the same way);
    `corrupt` training images are then overwritten with bytes that are no image.
    """
    if layout not in SYNTHETIC_LAYOUTS:
        raise UserError(f"no synthetic layout {layout!r}: use one of {', '.join(SYNTHETIC_LAYOUTS)}")
    if num_classes < 1 or images_per_class < 2 or (layout == "flowers102" and num_classes > len(FLOWER_NAMES)):
        raise UserError("make_synthetic needs num_classes >= 1 (at most 102 for flowers102) and images_per_class >= 2")
    return write_synthetic(WRITERS[layout], root, num_classes=num_classes, images_per_class=images_per_class, size=size,
                           seed=seed, corrupt=corrupt)


def write_synthetic(writer, root, *, num_classes: int, images_per_class: int, size: int, seed: int,
                    corrupt: int) -> Path:
    """Draw the images, let `writer(root, images, num_classes, size)` lay them out and corrupt `corrupt` of the
    training files it returns; make_synthetic's work for any layout's writer."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    plan = split_plan(images_per_class)
    # (class, split, image) in class order; i, the position in this list, numbers the image in every layout
    images = [(k, plan[j], draw(k, rng, size)) for k in range(num_classes) for j in range(images_per_class)]
    train_files = writer(root, images, num_classes, size)
    if corrupt > len(train_files):
        raise UserError(f"cannot corrupt {corrupt} of the {len(train_files)} training images")
    for path in sorted(rng.sample(train_files, corrupt)):
        path.write_bytes(b"this is not an image file\x00\xff" * 4)
    return root


def write_coco(root: Path, images, num_classes: int, size: int) -> list[Path]:
    written = {"train": [], "val": []}
    tables = {"train": ([], []), "val": ([], [])}
    for i, (k, split, image) in enumerate(images):
        split = "train" if split == "train" else "val"
        image_id = 139 + 17 * i
        file_name = f"{image_id:012d}.jpg"
        written[split].append(save(image, root / f"{split}2017" / file_name))
        entries, annotations = tables[split]
        entries.append({"license": 1, "file_name": file_name, "coco_url": "", "height": image.height,
                        "width": image.width, "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": image_id})
        colour, shape = class_words(k).split()[:2]
        annotations += [{"image_id": image_id, "id": 1000 * i + c, "caption": text.format(colour=colour, shape=shape)}
                        for c, text in enumerate(COCO_CAPTIONS)]
    for split, (entries, annotations) in tables.items():
        data = {"info": {"description": "synthetic COCO 2017", "version": "1.0", "year": 2017}, "licenses": [],
                "images": entries[::-1], "annotations": annotations}  # reversed: readers must sort by image id
        path = root / "annotations" / f"captions_{split}2017.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return written["train"]


def write_cub(root: Path, images, num_classes: int, size: int) -> list[Path]:
    root = root / "CUB_200_2011"
    listing, labels, is_train, train_files = [], [], [], []
    for i, (k, split, image) in enumerate(images, 1):
        folder = raw_class_name("cub", k)
        relative = f"{folder}/{folder[4:]}_{i:04d}_{700 + i}.jpg"
        path = save(image, root / "images" / relative)
        listing.append(f"{i} {relative}")
        labels.append(f"{i} {k + 1}")
        is_train.append(f"{i} {0 if split == 'test' else 1}")
        if split != "test":
            train_files.append(path)
    write_lines(root / "images.txt", listing)
    write_lines(root / "image_class_labels.txt", labels)
    write_lines(root / "train_test_split.txt", is_train)
    write_lines(root / "classes.txt", [f"{k + 1} {raw_class_name('cub', k)}" for k in range(num_classes)])
    return train_files


def write_flowers102(root: Path, images, num_classes: int, size: int) -> list[Path]:
    import scipy.io

    ids = {"train": [], "val": [], "test": []}
    train_files = []
    for i, (k, split, image) in enumerate(images, 1):
        path = save(image, root / "jpg" / f"image_{i:05d}.jpg")
        ids[split].append(i)
        if split != "test":
            train_files.append(path)
    labels = np.array([[k + 1 for k, _, _ in images]], dtype=np.float64)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(root / "setid.mat", {name: np.array([ids[split]], dtype=np.float64)
                                          for name, split in (("trnid", "train"), ("valid", "val"), ("tstid", "test"))})
    return train_files


def write_cars(root: Path, images, num_classes: int, size: int) -> list[Path]:
    import scipy.io

    rows = {"train": [], "test": []}
    train_files = []
    for k, split, image in images:
        split = "test" if split == "test" else "train"
        fname = f"{len(rows[split]) + 1:05d}.jpg"
        path = save(image, root / f"cars_{split}" / fname)
        rows[split].append((fname, k + 1))
        if split == "train":
            train_files.append(path)
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    class_names = np.empty((1, num_classes), dtype=object)
    class_names[0, :] = [raw_class_name("cars", k) for k in range(num_classes)]
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": class_names})
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": cars_annotations(rows["train"], size)})
    scipy.io.savemat(root / "devkit" / "cars_test_annos.mat",
                     {"annotations": cars_annotations(rows["test"], size, with_class=False)})
    scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": cars_annotations(rows["test"], size)})
    return train_files


def write_aircraft(root: Path, images, num_classes: int, size: int) -> list[Path]:
    data = root / "fgvc-aircraft-2013b" / "data"
    listings = {"train": [], "val": [], "test": []}
    train_files = []
    for i, (k, split, image) in enumerate(images):
        image_id = f"{1025794 + 7 * i:07d}"
        path = save(image, data / "images" / f"{image_id}.jpg")
        listings[split].append(f"{image_id} {raw_class_name('aircraft', k)}")
        if split != "test":
            train_files.append(path)
    listings["trainval"] = listings["train"] + listings["val"]
    for split, lines in listings.items():
        write_lines(data / f"images_variant_{split}.txt", lines)
    write_lines(data / "variants.txt", [raw_class_name("aircraft", k) for k in range(num_classes)])
    return train_files


def write_food101(root: Path, images, num_classes: int, size: int) -> list[Path]:
    root = root / "food-101"
    listings = {"train": [], "test": []}
    train_files = []
    for i, (k, split, image) in enumerate(images):
        split = "test" if split == "test" else "train"
        entry = f"{raw_class_name('food101', k)}/{100000 + 13 * i}"
        path = save(image, root / "images" / f"{entry}.jpg")
        listings[split].append(entry)
        if split == "train":
            train_files.append(path)
    for split, lines in listings.items():
        write_lines(root / "meta" / f"{split}.txt", lines)
    write_lines(root / "meta" / "classes.txt", [raw_class_name("food101", k) for k in range(num_classes)])
    write_lines(root / "meta" / "labels.txt", [class_words(k).capitalize() for k in range(num_classes)])
    return train_files


def write_classfolder(root: Path, images, num_classes: int, size: int) -> list[Path]:
    return [save(image, root / raw_class_name("classfolder", k) / f"img_{i:04d}.{'png' if i % 2 else 'jpg'}")
            for i, (k, _, image) in enumerate(images)]


def write_folder(root: Path, images, num_classes: int, size: int) -> list[Path]:
    files, lines = [], []
    for i, (k, _, image) in enumerate(images):
        file_name = f"img_{i:04d}.png"
        files.append(save(image, root / file_name))
        colour, shape = class_words(k).split()[:2]
        key = "text" if i % 2 == 0 else "caption"  # both keys of the imagefolder convention
        lines.append(json.dumps({"file_name": file_name, key: COCO_CAPTIONS[i % len(COCO_CAPTIONS)].format(
            colour=colour, shape=shape)}))
    write_lines(root / "metadata.jsonl", lines)
    return files


def write_kohya(root: Path, images, num_classes: int, size: int) -> list[Path]:
    """Class k's images in the folder `N_colour shape` with N = 1 + k % 2 repeats, each with a same-name .txt caption
    except every fourth image (captioned with its folder's name), and stretched to the aspect ratios of ASPECTS."""
    files = []
    for i, (k, _, image) in enumerate(images):
        wide, tall = ASPECTS[i % len(ASPECTS)]
        image = image.resize((size * wide // max(wide, tall), size * tall // max(wide, tall)))
        path = save(image, root / f"{1 + k % 2}_{class_words(k)}" / f"img_{i:04d}.png")
        if i % 4 != 3:
            colour, shape = class_words(k).split()[:2]
            write_lines(path.with_suffix(".txt"), [COCO_CAPTIONS[i % len(COCO_CAPTIONS)].format(colour=colour, shape=shape)])
        files.append(path)
    return files


WRITERS = {"coco": write_coco, "cub": write_cub, "flowers102": write_flowers102, "cars": write_cars,
           "aircraft": write_aircraft, "food101": write_food101, "classfolder": write_classfolder,
           "folder": write_folder, "kohya": write_kohya}
