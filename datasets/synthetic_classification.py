"""Tiny labelled data sets in each classification layout's on-disk format (VTAB-1K export, NABirds, Stanford Dogs, split
class folders; CUB, Flowers-102 and Stanford Cars through make_synthetic), for tests and demos.

As in synthetic.py, class k is SHAPES[k % 3] on a background of colour PALETTE[k % 12], split by split_plan.
"""

from pathlib import Path

import numpy as np

from restune_sd.datasets.classification import VTAB_TASKS, vtab_class_names
from restune_sd.datasets.finegrained import clean_class_name, dog_breed
from restune_sd.datasets.synthetic import (
    class_words, make_synthetic, raw_class_name, save, synthetic_class_names, title, write_lines, write_synthetic,
)
from restune_sd.errors import UserError

SHARED_LAYOUTS = ("cub", "flowers102", "cars")  # written by make_synthetic, read by the SD side too
SYNTHETIC_CLASSIFICATION_LAYOUTS = ("vtab", "cub", "nabirds", "flowers102", "dogs", "cars", "classfolder")
VTAB_SPLIT_FILES = {"train": "train800", "val": "val200", "test": "test"}


def default_vtab_task(num_classes: int) -> str:
    """The task with the fewest classes that still has `num_classes` (3 -> kitti, 10 -> svhn)."""
    fitting = [task for task, (count, _) in VTAB_TASKS.items() if count >= num_classes]
    if not fitting:
        raise UserError(f"no VTAB-1K task has {num_classes} classes (sun397 has the most, 397)")
    return min(fitting, key=lambda task: VTAB_TASKS[task][0])


def nabirds_leaf(k: int) -> tuple[int, str]:
    """Class k's NABirds id and name; ids leave gaps for the inner nodes of the hierarchy, as the real ones do."""
    return 100 + 7 * k, f"{title(class_words(k))} (Adult)"


def dogs_folder(k: int) -> str:
    return f"n{2085620 + 17 * k:08d}-{title(class_words(k)).replace(' ', '_')}"


def synthetic_classification_names(layout: str, num_classes: int = 3, task: str | None = None) -> list[str]:
    """The name each synthetic class k gets in the dataset's `classes` (for vtab, the task's class names)."""
    if layout == "vtab":
        return vtab_class_names(task or default_vtab_task(num_classes))[:num_classes]
    if layout == "nabirds":
        return [nabirds_leaf(k)[1] for k in range(num_classes)]
    if layout == "dogs":
        return [dog_breed(dogs_folder(k)) for k in range(num_classes)]
    if layout == "classfolder":
        return [clean_class_name(raw_class_name("classfolder", k)) for k in range(num_classes)]
    return synthetic_class_names(layout, num_classes)


def make_synthetic_classification(layout: str, root, *, num_classes: int = 3, images_per_class: int = 4, size: int = 32,
                                  seed: int = 0, corrupt: int = 0, task: str | None = None) -> Path:
    """Write a tiny labelled `layout` data set under `root` and return the ROOT to pass as `layout:ROOT`.

    vtab writes ROOT/TASK (TASK: `task`, default default_vtab_task) and returns it; `corrupt` training images are
    overwritten with bytes that are no image.
    """
    if layout not in SYNTHETIC_CLASSIFICATION_LAYOUTS:
        raise UserError(f"no synthetic classification layout {layout!r}: use one of "
                        f"{', '.join(SYNTHETIC_CLASSIFICATION_LAYOUTS)}")
    options = dict(num_classes=num_classes, images_per_class=images_per_class, size=size, seed=seed, corrupt=corrupt)
    if layout in SHARED_LAYOUTS:
        return make_synthetic(layout, root, **options)
    if num_classes < 1 or images_per_class < 2:
        raise UserError("make_synthetic_classification needs num_classes >= 1 and images_per_class >= 2")
    if layout == "vtab":
        task = task or default_vtab_task(num_classes)
        if task not in VTAB_TASKS or VTAB_TASKS[task][0] < num_classes:
            raise UserError(f"vtab task {task!r} is unknown or has fewer than {num_classes} classes")
        folder = Path(root) / task
        write_synthetic(write_vtab, folder, **options)
        return folder
    return write_synthetic(WRITERS[layout], root, **options)


def write_vtab(root: Path, images, num_classes: int, size: int) -> list[Path]:
    lines = {name: [] for name in VTAB_SPLIT_FILES.values()}
    train_files = []
    for k, split, image in images:
        name = VTAB_SPLIT_FILES[split]
        relative = f"images/{name}/{len(lines[name]):06d}.jpg"
        path = save(image, root / relative)
        lines[name].append(f"{relative} {k}")
        if split != "test":
            train_files.append(path)
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for name, split_lines in lines.items():
        write_lines(root / f"{name}.txt", split_lines)
    return train_files


def write_nabirds(root: Path, images, num_classes: int, size: int) -> list[Path]:
    root = root / "nabirds"
    listing, labels, is_train, train_files = [], [], [], []
    for i, (k, split, image) in enumerate(images):
        image_id = f"{i:08x}-21dc-4d0c-bfe1-{7919 * i:012x}"
        relative = f"{nabirds_leaf(k)[0]:04d}/{image_id.replace('-', '')}.jpg"
        path = save(image, root / "images" / relative)
        listing.append(f"{image_id} {relative}")
        labels.append(f"{image_id} {nabirds_leaf(k)[0]}")
        is_train.append(f"{image_id} {0 if split == 'test' else 1}")
        if split != "test":
            train_files.append(path)
    inner = ["0 Birds"] + [f"{1 + s} {shape.capitalize()}s" for s, shape in enumerate(("circle", "square", "triangle"))]
    write_lines(root / "images.txt", listing)
    write_lines(root / "image_class_labels.txt", labels)
    write_lines(root / "train_test_split.txt", is_train)
    write_lines(root / "classes.txt", inner + [" ".join(map(str, nabirds_leaf(k))) for k in range(num_classes)])
    return train_files


def write_dogs(root: Path, images, num_classes: int, size: int) -> list[Path]:
    import scipy.io

    rows = {"train": [], "test": []}
    for i, (k, split, image) in enumerate(images):
        relative = f"{dogs_folder(k)}/{dogs_folder(k)[:9]}_{1000 + i}.jpg"
        save(image, root / "Images" / relative)
        rows["test" if split == "test" else "train"].append((relative, k + 1))
    rows["file"] = rows["train"] + rows["test"]
    for name, entries in rows.items():
        files = np.empty((len(entries), 1), dtype=object)
        files[:, 0] = [relative for relative, _ in entries]
        annotations = np.empty((len(entries), 1), dtype=object)
        annotations[:, 0] = [relative[: -len(".jpg")] for relative, _ in entries]
        labels = np.array([[label] for _, label in entries], dtype=np.float64)
        (root / "lists").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "lists" / f"{name}_list.mat",
                         {"file_list": files, "annotation_list": annotations, "labels": labels})
    return [root / "Images" / relative for relative, _ in rows["train"]]


def write_split_class_folders(root: Path, images, num_classes: int, size: int) -> list[Path]:
    files = [save(image, root / split / raw_class_name("classfolder", k) / f"img_{i:04d}.{'png' if i % 2 else 'jpg'}")
             for i, (k, split, image) in enumerate(images)]
    return [path for path, (_, split, _) in zip(files, images) if split == "train"]


WRITERS = {"nabirds": write_nabirds, "dogs": write_dogs, "classfolder": write_split_class_folders}
