"""restune_sd.datasets' labelled data (classify): every layout on tiny synthetic sets written in its on-disk format."""

import random
import shutil
import warnings

import pytest
import torch
from PIL import Image

from restune_sd.datasets import (
    CLASSIFICATION_LAYOUTS, VTAB_ALIASES, VTAB_TASKS, ClassificationDataset, build_classification_dataset,
    make_synthetic_classification,
)
from restune_sd.datasets.classification import REGISTRY
from restune_sd.datasets.synthetic import PALETTE
from restune_sd.datasets.synthetic_classification import synthetic_classification_names
from restune_sd.errors import UserError

RES = 16
LAYOUTS = ["vtab", "cub", "nabirds", "flowers102", "dogs", "cars", "classfolder"]
# 3 classes x 4 images: per class 2 train, 1 val, 1 test (split_plan); a layout's trainval absorbs its val if it has
# one; the FGVC sets without a val (cub, nabirds, dogs, cars) carve ceil(10%) of their 9 training images out as val
SPLIT_SIZES = {
    "vtab": {"train": 9, "trainval": 9, "train800": 6, "val200": 3, "val": 3, "test": 3},
    "flowers102": {"train": 6, "trnid": 6, "val": 3, "trainval": 9, "test": 3},
    "classfolder": {"train": 6, "val": 3, "test": 3},
}
CARVED_SIZES = {"train": 8, "val": 1, "trainval": 9, "test": 3}
NUM_CLASSES = {"vtab": 4, "flowers102": 102}  # the kitti task's 4 and Flowers-102's 102; the others have the 3 written


def colour_index(pixels: torch.Tensor) -> int:
    """The palette entry nearest the top-left corner (pixels normalised with mean = std = 0.5)."""
    rgb = (pixels[:, :2, :2].mean(dim=(1, 2)) + 1) * 127.5
    return min(range(len(PALETTE)), key=lambda k: sum((float(c) - v) ** 2 for c, v in zip(rgb, PALETTE[k][1])))


def spec(layout, root):
    return f"{layout}:{root}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_its_labels_classes_and_splits(layout, tmp_path):
    root = make_synthetic_classification(layout, tmp_path)
    names = synthetic_classification_names(layout)
    sizes = SPLIT_SIZES.get(layout, CARVED_SIZES)
    assert set(sizes) == set(REGISTRY[layout].splits)
    paths = {}
    for split, size in sizes.items():
        dataset = build_classification_dataset(spec(layout, root), split=split, resolution=RES)
        assert isinstance(dataset, ClassificationDataset) and len(dataset) == size
        assert dataset.num_classes == len(dataset.classes) == NUM_CLASSES.get(layout, 3)
        assert dataset.name == spec(layout, root) and dataset.task == ("kitti" if layout == "vtab" else layout)
        seen = set()
        for index in range(len(dataset)):
            item = dataset[index]
            assert item["pixel_values"].shape == (3, RES, RES) and item["pixel_values"].dtype == torch.float32
            assert item["index"] == index and item["skipped"] == 0 and isinstance(item["label"], int)
            k = colour_index(item["pixel_values"])
            assert dataset.classes[item["label"]] == names[k]
            seen.add(k)
        assert seen == {0, 1, 2} or len(dataset) < 3
        paths[split] = set(dataset.paths)
    assert not paths["train"] & paths["test"] and not paths["val"] & paths["test"]
    if layout == "vtab":  # train is the protocol's train800val200
        assert paths["val"] < paths["train"] == paths["trainval"]
    elif layout == "classfolder":
        assert not paths["val"] & paths["train"]
    else:  # val is never test, and train (for model selection) never holds it
        assert not paths["val"] & paths["train"] and paths["train"] | paths["val"] == paths["trainval"]


def test_train_and_test_labels_agree_well_enough_to_learn(tmp_path):
    """A nearest-class-mean classifier fitted on train pixels gets every test image right in every layout."""
    for layout in LAYOUTS:
        root = make_synthetic_classification(layout, tmp_path / layout, images_per_class=5)
        train = build_classification_dataset(spec(layout, root), split="train", resolution=RES)
        test = build_classification_dataset(spec(layout, root), split="test", resolution=RES)
        sums = {}
        for item in (train[i] for i in range(len(train))):
            total, count = sums.get(item["label"], (0, 0))
            sums[item["label"]] = (total + item["pixel_values"], count + 1)
        means = {label: total / count for label, (total, count) in sums.items()}
        for item in (test[i] for i in range(len(test))):
            nearest = min(means, key=lambda label: float((means[label] - item["pixel_values"]).pow(2).sum()))
            assert nearest == item["label"], layout


def test_vtab_tasks_groups_and_aliases(tmp_path):
    assert len(VTAB_TASKS) == 19
    groups = [group for _, group in VTAB_TASKS.values()]
    assert (groups.count("Natural"), groups.count("Specialized"), groups.count("Structured")) == (7, 4, 8)
    assert VTAB_TASKS["cifar"] == (100, "Natural") and VTAB_TASKS["sun397"] == (397, "Natural")
    assert VTAB_TASKS["patch_camelyon"] == (2, "Specialized") and VTAB_TASKS["smallnorb_ele"] == (9, "Structured")
    assert set(VTAB_ALIASES.values()) == set(VTAB_TASKS) and VTAB_ALIASES["pets"] == "oxford_iiit_pet"
    root = make_synthetic_classification("vtab", tmp_path, num_classes=10, task="svhn")
    dataset = build_classification_dataset(f"vtab:{root}", split="test", resolution=RES)
    assert (dataset.task, dataset.classes) == ("svhn", [str(d) for d in range(10)])
    alias = root.rename(tmp_path / "CIFAR-100")  # an alias, spelt as some exports do
    dataset = build_classification_dataset(f"vtab:{alias}", split="train800", resolution=RES)
    assert (dataset.task, dataset.num_classes, dataset.classes[99]) == ("cifar", 100, "class_99")


def test_normalisation_and_direct_resize_without_crop(tmp_path):
    image = Image.new("RGB", (80, 20), (0, 200, 0))
    image.paste((250, 0, 0), (0, 0, 20, 20))
    image.paste((0, 0, 250), (60, 0, 80, 20))
    for split in ("train", "val", "test"):
        (tmp_path / "sets" / split / "stripes").mkdir(parents=True)
        image.save(tmp_path / "sets" / split / "stripes" / "a.png")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    dataset = build_classification_dataset(f"classfolder:{tmp_path / 'sets'}", split="test", resolution=RES,
                                           mean=mean, std=std)
    pixels = dataset[0]["pixel_values"]
    expected = [(torch.tensor(rgb) / 255 - torch.tensor(mean)) / torch.tensor(std)
                for rgb in ((250.0, 0.0, 0.0), (0.0, 200.0, 0.0), (0.0, 0.0, 250.0))]
    # a centre crop would keep only the green middle; the direct resize squeezes all three stripes in
    for column, want in zip((0, RES // 2, RES - 1), expected):
        assert torch.allclose(pixels[:, RES // 2, column], want, atol=0.05)
    assert dataset.classes == ["stripes"] and dataset[0]["label"] == 0 and not dataset[0]["flipped"]


def test_flips_are_a_function_of_seed_epoch_and_index_only(tmp_path):
    root = make_synthetic_classification("vtab", tmp_path, images_per_class=6)
    options = dict(split="train", resolution=RES, random_flip=True, seed=3)
    first, second = (build_classification_dataset(f"vtab:{root}", **options) for _ in range(2))
    first.set_epoch(2)
    second.set_epoch(2)
    torch.manual_seed(0)
    random.seed(0)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    forward = [first[i] for i in range(len(first))]
    backward = [second[i] for i in reversed(range(len(second)))][::-1]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(forward, backward))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    flips = [item["flipped"] for item in forward]
    assert any(flips) and not all(flips)
    plain = build_classification_dataset(f"vtab:{root}", split="train", resolution=RES)
    for item in forward:
        unflipped = plain[item["index"]]["pixel_values"]
        assert torch.equal(item["pixel_values"], unflipped.flip(-1) if item["flipped"] else unflipped)
    first.set_epoch(3)
    assert [first[i]["flipped"] for i in range(len(first))] != flips
    other_seed = build_classification_dataset(f"vtab:{root}", **{**options, "seed": 4})
    other_seed.set_epoch(2)
    assert [other_seed[i]["flipped"] for i in range(len(other_seed))] != flips
    plain.set_epoch(5)  # without random_flip nothing is drawn
    assert not any(plain[i]["flipped"] for i in range(len(plain)))


@pytest.mark.parametrize("layout", ["vtab", "nabirds", "dogs", "classfolder"])
def test_corrupt_images_are_skipped_counted_and_summarised(layout, tmp_path):
    root = make_synthetic_classification(layout, tmp_path, corrupt=2)
    split = "train" if layout == "classfolder" else "trainval"  # every training image, the corrupt ones included
    dataset = build_classification_dataset(spec(layout, root), split=split, resolution=RES)
    assert dataset.corrupt_summary() is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))] + [dataset[i] for i in range(len(dataset))]
    assert len(caught) == 1 and "corrupt" in str(caught[0].message)
    assert dataset.num_corrupt == 2
    summary = dataset.corrupt_summary()
    assert summary.startswith("skipped 2 corrupt images (first: ") and "\n" not in summary
    substituted = [i for i, item in enumerate(items[: len(dataset)]) if item["index"] != i]
    assert len(substituted) == 2
    for i in substituted:
        returned = items[i]["index"]
        assert returned not in substituted and items[i]["label"] == dataset.labels[returned]
        assert items[i]["skipped"] == (returned - i) % len(dataset) >= 1


def test_a_set_of_only_corrupt_images_is_a_user_error(tmp_path):
    root = make_synthetic_classification("vtab", tmp_path, num_classes=1, images_per_class=3, corrupt=2)
    dataset = build_classification_dataset(f"vtab:{root}", split="train", resolution=RES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="none of the 2 images decodes"):
            dataset[0]


def rewrite(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, words", [
    ("vtab missing split file", ["test.txt", "is missing", "train800val200.txt"]),
    ("vtab label out of range", ["train800.txt line 2", "label 4", "out of range for kitti", "0..3"]),
    ("vtab label not a number", ["val200.txt line 1", "images/<split>/NNNNNN.jpg LABEL"]),
    ("vtab empty split file", ["no images in its val split"]),
    ("vtab missing image", ["1 image file it lists is missing", "000001.jpg"]),
    ("vtab unknown task folder", ["'mytask' is not a VTAB-1K task name", "cifar", "smallnorb_ele"]),
    ("vtab root of all tasks", ["holds VTAB-1K task folders (kitti)", "vtab:"]),
    ("nabirds missing classes.txt", ["nabirds:", "classes.txt", "is missing", "nabirds folder"]),
    ("dogs without split lists", ["test_list.mat", "file_list.mat holds no train/test split"]),
    ("dogs missing Images", ["Images", "is missing", "images.tar"]),
    ("cars missing meta", ["cars_meta.mat", "is missing"]),
    ("classfolder missing val", ["val", "is missing", "ROOT/train, ROOT/val and ROOT/test"]),
    ("classfolder class not in train", ["purple_star", "not among the 3 classes"]),
    ("classfolder no class folders", ["has no class sub-folders"]),
    ("unknown prefix", ["unknown data source", "vtab", "nabirds", "dogs", "classfolder"]),
    ("unknown split", ["no split 'train800'", "train, val, trainval, test"]),
    ("bad resolution", ["resolution must be a positive number"]),
    ("bad std", ["std must be three finite numbers", "each > 0"]),
])
def test_bad_input_raises_a_one_line_user_error(case, words, tmp_path):
    kwargs = {"split": "train"}
    layout = case.split()[0] if case.split()[0] in LAYOUTS else "vtab"
    root = make_synthetic_classification(layout, tmp_path / "data")
    if case == "vtab missing split file":
        (root / "test.txt").unlink()
        kwargs["split"] = "test"
    elif case == "vtab label out of range":
        lines = (root / "train800.txt").read_text().splitlines()
        rewrite(root / "train800.txt", "\n".join([lines[0], lines[1].rsplit(" ", 1)[0] + " 4", *lines[2:]]) + "\n")
        kwargs["split"] = "train800"
    elif case == "vtab label not a number":
        rewrite(root / "val200.txt", "images/val200/000000.jpg cat\n")
        kwargs["split"] = "val"
    elif case == "vtab empty split file":
        rewrite(root / "val200.txt", "\n")
        kwargs["split"] = "val"
    elif case == "vtab missing image":
        (root / "images" / "train800" / "000001.jpg").unlink()
    elif case == "vtab unknown task folder":
        root = root.rename(root.parent / "mytask")
    elif case == "vtab root of all tasks":
        root = root.parent
    elif case == "nabirds missing classes.txt":
        (root / "nabirds" / "classes.txt").unlink()
    elif case == "dogs without split lists":
        (root / "lists" / "test_list.mat").unlink()
        kwargs["split"] = "test"
    elif case == "dogs missing Images":
        shutil.rmtree(root / "Images")
    elif case == "cars missing meta":
        (root / "devkit" / "cars_meta.mat").unlink()
    elif case == "classfolder missing val":
        shutil.rmtree(root / "val")
        kwargs["split"] = "val"
    elif case == "classfolder class not in train":
        shutil.copytree(root / "test" / "red_circle", root / "test" / "purple_star")
        kwargs["split"] = "test"
    elif case == "classfolder no class folders":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif case == "unknown prefix":
        root, layout = tmp_path, "imagenet"
    elif case == "unknown split":
        layout = "cub"
        kwargs["split"] = "train800"
    elif case == "bad resolution":
        kwargs["resolution"] = 0
    elif case == "bad std":
        kwargs["std"] = (0.5, 0.0, 0.5)
    with pytest.raises(UserError) as raised:
        build_classification_dataset(spec(layout, root), **{"resolution": RES, **kwargs})
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_dogs_lists_may_sit_in_root_and_layouts_are_described(tmp_path):
    root = make_synthetic_classification("dogs", tmp_path)
    for name in ("train_list.mat", "test_list.mat", "file_list.mat"):
        (root / "lists" / name).rename(root / name)
    assert len(build_classification_dataset(f"dogs:{root}", split="test", resolution=RES)) == 3
    assert set(CLASSIFICATION_LAYOUTS) == set(LAYOUTS)
    assert all("val = a fixed 10% of the official train (never test)" in CLASSIFICATION_LAYOUTS[prefix]
               for prefix in ("cub", "nabirds", "dogs", "cars"))
