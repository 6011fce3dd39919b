"""VPT's FGVC protocol: a fixed validation split carved out of train (never test), train = train minus val, trainval
= every training image; random crops and flips to train, centre crops to evaluate, ImageNet's normalisation."""

import json
import shutil

import pytest
import torch
from PIL import Image

from restune_sd.classify import ClassifyConfig, classify, trained_preprocessing
from restune_sd.datasets import ClassificationTransform, build_classification_dataset, make_synthetic_classification
from restune_sd.datasets.classification import IMAGENET_NORMALISATION, crop_source, val_carve
from restune_sd.tiny import write_tiny_vit

CARVED = ["cub", "nabirds", "dogs", "cars"]


@pytest.mark.parametrize("layout", CARVED)
def test_val_is_a_fixed_tenth_of_train_and_never_test(layout, tmp_path):
    root = make_synthetic_classification(layout, tmp_path / "a", images_per_class=12, size=8)
    paths = {split: build_classification_dataset(f"{layout}:{root}", split=split, resolution=8).paths
             for split in ("train", "val", "trainval", "test")}
    assert len(paths["trainval"]) == 33 and len(paths["val"]) == 4  # ceil(33 / 10)
    assert set(paths["train"]) | set(paths["val"]) == set(paths["trainval"])
    assert not set(paths["train"]) & set(paths["val"]) and not set(paths["val"]) & set(paths["test"])
    # the same images wherever the set lies and whichever folder ROOT names (the set itself or its parent)
    moved = tmp_path / "b" / "elsewhere"
    shutil.copytree(tmp_path / "a", moved)
    again = build_classification_dataset(f"{layout}:{moved / root.relative_to(tmp_path / 'a')}", split="val",
                                         resolution=8).paths
    assert [p.parts[-2:] for p in again] == [p.parts[-2:] for p in paths["val"]]


def test_the_carve_matches_vpts_split_sizes_and_ignores_listing_order():
    for total, val in ((5994, 600), (23929, 2393), (12000, 1200), (8144, 815)):  # CUB, NABirds, Dogs, Cars in VPT
        items = [(f"images/class_{i % 7}/{i:06d}.jpg", i % 7) for i in range(total)]
        chosen = val_carve(items)
        assert len(chosen) == val and val_carve(items[::-1]) == chosen


def test_flowers_keeps_its_official_validation_split(tmp_path):
    root = make_synthetic_classification("flowers102", tmp_path, images_per_class=4, size=8)
    sizes = {split: len(build_classification_dataset(f"flowers102:{root}", split=split, resolution=8))
             for split in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 6, "val": 3, "trainval": 9, "test": 3}


def test_crop_protocol_resizes_the_shorter_side_then_crops():
    assert [crop_source(r) for r in (224, 384, 448)] == [256, 438, 512]  # VPT's resize for each crop size
    image = Image.new("RGB", (42, 21))
    image.paste((255, 0, 0), (0, 0, 21, 21))  # left half red, right half blue
    image.paste((0, 0, 255), (21, 0, 42, 21))
    evaluate = ClassificationTransform(14, crop=True)
    pixels = evaluate(image)
    assert pixels.shape == (3, 14, 14)
    assert pixels[0, :, 0].mean() > 0.9 and pixels[2, :, -1].mean() > 0.9  # the centre crop straddles both halves
    train = ClassificationTransform(14, crop=True, train=True)
    import random

    crops = {tuple(train(image, random.Random(seed)).flatten().tolist()) for seed in range(8)}
    assert len(crops) > 1  # a random offset, drawn from the item's rng
    assert torch.equal(train(image), pixels)  # without an rng, the centre crop


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return str(write_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit"))


def test_fgvc_trains_with_vpts_normalisation_crops_and_flips_unless_told(vit, tmp_path):
    root = make_synthetic_classification("cub", tmp_path / "cub", images_per_class=4, size=40)
    settings = dict(model=vit, data=f"cub:{root}", tuner="linear", max_steps=1, batch_size=4, warmup_epochs=0,
                    report_to="none")
    classify(ClassifyConfig(output=str(tmp_path / "run"), **settings))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert [saved["image_mean"], saved["image_std"]] == [list(v) for v in IMAGENET_NORMALISATION]
    assert saved["resize_crop"] is True and saved["random_flip"] is True and saved["split"] == "train"
    assert trained_preprocessing(vit, str(tmp_path / "run" / "tuner"))["resize_crop"] is True
    classify(ClassifyConfig(output=str(tmp_path / "plain"), random_flip=False, **settings))
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["random_flip"] is False


def test_vtab_keeps_the_direct_resize_and_the_models_normalisation(vit, tmp_path):
    root = make_synthetic_classification("vtab", tmp_path / "vtab", num_classes=4, images_per_class=4, size=32)
    classify(ClassifyConfig(model=vit, data=f"vtab:{root}", output=str(tmp_path / "run"), tuner="linear", max_steps=1,
                            batch_size=4, warmup_epochs=0, report_to="none"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["resize_crop"] is False and saved["random_flip"] is False and saved["image_mean"] == [0.5, 0.5, 0.5]
