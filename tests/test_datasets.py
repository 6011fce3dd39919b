"""restune_sd.datasets on tiny synthetic data sets written in each distributor's layout."""

import json
import random
import warnings

import pytest
import torch
from PIL import Image

from restune_sd.datasets import LAYOUTS, build_dataset, coco_val_items, make_synthetic, resize_center_crop
from restune_sd.datasets.finegrained import clean_class_name
from restune_sd.datasets.synthetic import PALETTE, synthetic_class_names
from restune_sd.errors import UserError

RES = 32
CLASS_LAYOUTS = ["cub", "flowers102", "cars", "aircraft", "food101", "classfolder"]
# make_synthetic with 3 classes x 4 images puts 1 image per class in test and 1 in val, which train absorbs
SPLIT_SIZES = {"train": 9, "test": 3, "val": 3}


def colour_of(pixels: torch.Tensor) -> str:
    """The palette colour nearest to the top-left corner, which the centred shape never reaches."""
    rgb = (pixels[:, :2, :2].mean(dim=(1, 2)) + 1) * 127.5
    return min(PALETTE, key=lambda entry: sum((float(c) - v) ** 2 for c, v in zip(rgb, entry[1])))[0]


def check_item(item: dict, dataset, index: int) -> None:
    pixels = item["pixel_values"]
    assert pixels.shape == (3, RES, RES) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    assert item["index"] == index and item["caption"] in dataset.captions_of(index)


@pytest.mark.parametrize("layout", CLASS_LAYOUTS)
def test_class_layouts_caption_each_image_with_its_class(layout, tmp_path):
    root = make_synthetic(layout, tmp_path)
    names = synthetic_class_names(layout)
    splits = ["train"] if layout == "classfolder" else ["train", "test", "val"]
    for split in splits:
        dataset = build_dataset(f"{layout}:{root}", split=split, resolution=RES, caption_template="a photo of a {}")
        assert len(dataset) == (12 if layout == "classfolder" else SPLIT_SIZES[split])
        seen = set()
        for index in range(len(dataset)):
            item = dataset[index]
            check_item(item, dataset, index)
            assert dataset.captions_of(index) == [item["caption"]]
            class_index = [p[0] for p in PALETTE].index(colour_of(item["pixel_values"]))
            assert item["caption"] == f"a photo of a {names[class_index]}"
            seen.add(class_index)
        assert seen == {0, 1, 2}


def test_nested_roots_and_pretty_names(tmp_path):
    assert clean_class_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert clean_class_name("707-320") == "707-320"
    for layout, inner in [("cub", "CUB_200_2011"), ("aircraft", "fgvc-aircraft-2013b"), ("food101", "food-101")]:
        root = make_synthetic(layout, tmp_path / layout, num_classes=2, images_per_class=2)
        assert len(build_dataset(f"{layout}:{root / inner}", resolution=RES)) == 2
    assert synthetic_class_names("food101")[0] == "Red circle"  # meta/labels.txt, not classes.txt's red_circle
    assert len(LAYOUTS) == 10 and all(isinstance(v, str) and v for v in LAYOUTS.values())


def test_coco_draws_one_of_the_image_captions_reproducibly(tmp_path):
    root = make_synthetic("coco", tmp_path)
    dataset = build_dataset(f"coco:{root}", resolution=RES, seed=7)
    assert len(dataset) == 6 and len(build_dataset(f"coco:{root}", split="val", resolution=RES)) == 6
    for index in range(len(dataset)):
        item = dataset[index]
        check_item(item, dataset, index)
        assert len(dataset.captions_of(index)) == 5
        assert all(colour_of(item["pixel_values"]) in caption for caption in dataset.captions_of(index))

    def captions(epoch, seed=7):
        fresh = build_dataset(f"coco:{root}", resolution=RES, seed=seed)
        fresh.set_epoch(epoch)
        return [fresh[i]["caption"] for i in reversed(range(len(fresh)))]

    assert captions(0) == captions(0) == [dataset[i]["caption"] for i in reversed(range(len(dataset)))]
    assert captions(0) != captions(1) and captions(1) == captions(1)
    assert captions(0, seed=8) != captions(0)


def test_coco_val_items_are_the_first_images_by_id(tmp_path):
    root = make_synthetic("coco", tmp_path)
    items = coco_val_items(root, 3, seed=1)
    data = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    first = sorted(data["images"], key=lambda image: image["id"])[:3]
    assert [name for name, _ in items] == [image["file_name"] for image in first]
    for image, (_, caption) in zip(first, items):
        assert caption in {a["caption"] for a in data["annotations"] if a["image_id"] == image["id"]}
    assert coco_val_items(root, 3, seed=1) == items
    assert {c for s in range(6) for _, c in coco_val_items(root, 3, seed=s)} != {c for _, c in items}
    with pytest.raises(UserError, match="only 6"):
        coco_val_items(root, 7)


def test_folder_reads_text_and_caption_keys(tmp_path):
    root = make_synthetic("folder", tmp_path)
    dataset = build_dataset(f"folder:{root}", resolution=RES)
    assert len(dataset) == 12
    for index in range(len(dataset)):
        item = dataset[index]
        check_item(item, dataset, index)
        assert colour_of(item["pixel_values"]) in item["caption"]


def test_random_crop_and_flip_depend_only_on_seed_epoch_index(tmp_path):
    root = make_synthetic("classfolder", tmp_path, size=64)
    options = dict(resolution=RES, center_crop=False, random_flip=True, seed=3)
    first, second = build_dataset(f"classfolder:{root}", **options), build_dataset(f"classfolder:{root}", **options)
    first.set_epoch(2)
    second.set_epoch(2)
    torch.manual_seed(0)
    random.seed(0)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    forward = [first[i]["pixel_values"] for i in range(len(first))]
    backward = [second[i]["pixel_values"] for i in reversed(range(len(second)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    first.set_epoch(3)
    assert any(not torch.equal(first[i]["pixel_values"], forward[i]) for i in range(len(first)))


def test_resize_center_crop_keeps_the_middle():
    image = Image.new("RGB", (90, 30), (0, 0, 255))
    image.paste((255, 0, 0), (30, 0, 60, 30))
    cropped = resize_center_crop(image, 20)
    assert cropped.size == (20, 20) and cropped.getpixel((0, 10))[0] > 200 and cropped.getpixel((19, 10))[0] > 200


def test_corrupt_images_are_skipped_counted_and_warned_once(tmp_path):
    root = make_synthetic("cub", tmp_path, corrupt=2)
    dataset = build_dataset(f"cub:{root}", resolution=RES)
    assert dataset.corrupt_summary() is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))] + [dataset[i] for i in range(len(dataset))]
    assert len(caught) == 1 and "corrupt" in str(caught[0].message)
    assert dataset.num_corrupt == 2
    assert dataset.corrupt_summary().startswith("skipped 2 corrupt images (first: ")
    substituted = [i for i, item in enumerate(items[: len(dataset)]) if item["index"] != i]
    assert len(substituted) == 2
    for i in substituted:
        assert items[i]["index"] not in substituted and items[i]["index"] == next(
            j % len(dataset) for j in range(i + 1, i + len(dataset)) if j % len(dataset) not in substituted)


def rewrite(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, words", [
    ("missing root", ["does not exist"]),
    ("root is a file", ["is a file, not a folder"]),
    ("missing coco annotations", ["captions_train2017.json", "is missing", "annotations_trainval2017.zip"]),
    ("coco json is a list", ["not a COCO captions file", "top level is a list"]),
    ("coco instances file", ["not a COCO captions file", "'caption'"]),
    ("missing cub classes.txt", ["classes.txt", "is missing", "CUB_200_2011"]),
    ("missing flowers setid.mat", ["setid.mat", "is missing"]),
    ("missing cars test labels", ["cars_test_annos_withlabels.mat", "ROOT/devkit"]),
    ("missing image", ["1 image file it lists is missing", "image_00001.jpg"]),
    ("empty class folder", ["empty_class", "has no images"]),
    ("malformed metadata line", ["metadata.jsonl line 2", "not valid JSON"]),
    ("metadata without text", ["line 1", '"text"']),
    ("unknown prefix", ["unknown data source", "coco", "classfolder", "folder"]),
    ("no prefix", ["PREFIX:ROOT"]),
    ("unknown split", ["no split 'dev'", "train, val, test"]),
    ("template without braces", ["has no {}"]),
])
def test_bad_input_raises_a_helpful_user_error(case, words, tmp_path):
    kwargs = {}
    if case == "missing root":
        spec = f"cub:{tmp_path / 'nowhere'}"
    elif case == "root is a file":
        spec = f"food101:{rewrite(tmp_path / 'file.txt', 'x')}"
    elif case.startswith("missing coco") or case.startswith("coco"):
        root = make_synthetic("coco", tmp_path, num_classes=1, images_per_class=2)
        annotations = root / "annotations" / "captions_train2017.json"
        if case == "missing coco annotations":
            annotations.unlink()
        elif case == "coco json is a list":
            rewrite(annotations, "[]")
        else:
            rewrite(annotations, json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                             "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}))
        spec = f"coco:{root}"
    elif case == "missing cub classes.txt":
        root = make_synthetic("cub", tmp_path, num_classes=1, images_per_class=2)
        (root / "CUB_200_2011" / "classes.txt").unlink()
        spec = f"cub:{root}"
    elif case in ("missing flowers setid.mat", "missing image"):
        root = make_synthetic("flowers102", tmp_path, num_classes=1, images_per_class=2)
        (root / ("setid.mat" if case == "missing flowers setid.mat" else "jpg/image_00001.jpg")).unlink()
        spec = f"flowers102:{root}"
    elif case == "missing cars test labels":
        root = make_synthetic("cars", tmp_path, num_classes=1, images_per_class=2)
        (root / "cars_test_annos_withlabels.mat").unlink()
        spec, kwargs = f"cars:{root}", {"split": "test"}
    elif case == "empty class folder":
        root = make_synthetic("classfolder", tmp_path, num_classes=1, images_per_class=2)
        (root / "empty_class").mkdir()
        spec = f"classfolder:{root}"
    elif case in ("malformed metadata line", "metadata without text"):
        root = make_synthetic("folder", tmp_path, num_classes=1, images_per_class=2)
        first = json.dumps({"file_name": "img_0000.png"}) if case == "metadata without text" else \
            json.dumps({"file_name": "img_0000.png", "text": "a"})
        rewrite(root / "metadata.jsonl", first + '\n{"file_name": "img_0001.png", "text": \n')
        spec = f"folder:{root}"
    elif case == "unknown prefix":
        spec = f"imagenet:{tmp_path}"
    elif case == "no prefix":
        spec = str(tmp_path)
    elif case == "unknown split":
        spec, kwargs = f"coco:{tmp_path}", {"split": "dev"}
    else:
        spec, kwargs = f"classfolder:{tmp_path}", {"caption_template": "a photo"}
    with pytest.raises(UserError) as raised:
        build_dataset(spec, resolution=RES, **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
