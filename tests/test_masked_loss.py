"""--masked-loss: each image's mask goes through exactly its image's resize, crop, bucket and flip; the loss is the mean
of mask * squared error (kohya's), composes with Min-SNR and v-prediction, and an all-white mask changes nothing; mask
files are never training images; bad masks are one line."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import one_error_line
from PIL import Image
from safetensors.torch import load_file

from restune_sd.datasets import build_dataset
from restune_sd.datasets.buckets import bucket_sizes
from restune_sd.datasets.finegrained import read_class_folders
from restune_sd.datasets.kohya import read_kohya_folder
from restune_sd.masked_loss import per_sample_mse
from restune_sd.train import Encoders, TrainConfig, diffusion_loss, load_components, train

RES = 32


def pattern(width: int, height: int, seed: int) -> np.ndarray:
    """White 4-pixel blocks on black, at random: no symmetry a flip or a crop could hide."""
    rng = np.random.default_rng(seed)
    blocks = rng.random(((height + 3) // 4, (width + 3) // 4)) < 0.5
    return (np.kron(blocks, np.ones((4, 4))) * 255).astype(np.uint8)[:height, :width]


def write_image(path, grey: np.ndarray, mask: np.ndarray | None = None, mask_path=None) -> None:
    """The grey pattern as an RGB image at `path`; `mask` (default the pattern itself) as a greyscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(path)
    if mask_path is not None:
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey if mask is None else mask).save(mask_path)


def kohya_set(root, count: int = 1, size=(80, 48), mask=lambda grey: grey) -> str:
    """A kohya folder of `count` patterned images, each with `<stem>.mask.png` = mask(pattern) (None: no mask)."""
    for i in range(count):
        grey = pattern(*size, seed=i)
        image = root / "1_thing" / f"img{i}.png"
        chosen = mask(grey)
        write_image(image, grey, chosen, None if chosen is None else image.with_name(f"img{i}.mask.png"))
        image.with_suffix(".txt").write_text("a red circle")
    return f"kohya:{root}"


def image_and_mask(item) -> tuple[torch.Tensor, torch.Tensor]:
    """The item's image brought back to [0, 1] (one channel: all three are equal) and its mask."""
    return (item["pixel_values"][0] + 1) / 2, item["mask"][0]


def assert_aligned(item) -> None:
    image, mask = image_and_mask(item)
    assert image.shape == mask.shape
    assert torch.allclose(image, mask, atol=1e-5)  # the same values, not only the same shape
    assert torch.equal(image > 0.5, mask > 0.5)


TRANSFORMS = {
    "centre crop": dict(center_crop=True),
    "random crop": dict(center_crop=False),
    "flip": dict(center_crop=True, random_flip=True),
    "random crop and flip": dict(center_crop=False, random_flip=True),
    "bucket resize": dict(bucket_sizes=bucket_sizes(RES, 8)),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_each_mask_is_resized_cropped_and_flipped_as_its_image(tmp_path, name):
    spec = kohya_set(tmp_path / "data", size=(83, 47))  # resized, then cropped on both axes' rounding
    masked = build_dataset(spec, resolution=RES, masked_loss=True, **TRANSFORMS[name])
    plain = build_dataset(spec, resolution=RES, **TRANSFORMS[name])
    seen = set()
    for epoch in range(12):
        masked.set_epoch(epoch)
        plain.set_epoch(epoch)
        item, unmasked = masked[0], plain[0]
        assert_aligned(item)
        assert torch.equal(item["pixel_values"], unmasked["pixel_values"])  # masks change no random draw
        assert item["flipped"] == unmasked["flipped"]
        seen.add((bool(item["flipped"]), item["pixel_values"].numpy().tobytes()))
    crops = {pixels for _, pixels in seen}
    flips = {flipped for flipped, _ in seen}
    assert len(crops) > 1 if "random" in name or "flip" in name else len(crops) == 1
    assert flips == ({False, True} if "flip" in name else {False})
    if name == "bucket resize":
        assert masked[0]["mask"].shape == (1, 24, 40)  # 83x47 (about 5:3) lands in the 40x24 bucket
    else:
        assert masked[0]["mask"].shape == (1, RES, RES)


def test_mask_dir_masks_are_found_by_stem_and_aligned(tmp_path):
    grey = pattern(80, 48, seed=3)
    write_image(tmp_path / "data" / "2_thing" / "photo.bmp", grey, mask_path=tmp_path / "masks" / "photo.png")
    dataset = build_dataset(f"kohya:{tmp_path / 'data'}", resolution=RES, random_flip=True, masked_loss=True,
                            mask_dir=str(tmp_path / "masks"))
    assert len(dataset) == 2  # the image twice (2_ repeats), its mask once
    flips = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(2):
            assert_aligned(item := dataset[index])
            flips.add(bool(item["flipped"]))
    assert flips == {False, True}


def test_mask_files_are_never_training_images(tmp_path, capsys):
    kohya_set(tmp_path / "kohya", count=3)
    (tmp_path / "kohya" / "1_thing" / "img2.mask.png").unlink()
    names = [path.name for path, _ in read_kohya_folder(tmp_path / "kohya", "train")]
    assert names == ["img0.png", "img1.png", "img2.png"]
    cat = tmp_path / "classes" / "cat"
    write_image(cat / "a.png", pattern(40, 24, 0), mask_path=cat / "a.mask.png")
    assert [path.name for path, _ in read_class_folders(tmp_path / "classes", "train")] == ["a.png"]
    capsys.readouterr()
    dataset = build_dataset(f"kohya:{tmp_path / 'kohya'}", resolution=RES, masked_loss=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(dataset) == 3
    assert len(lines) == 1 and "1 image of 3 without a mask" in lines[0] and "img2.png" in lines[0], lines
    assert torch.equal(dataset[2]["mask"], torch.ones(1, RES, RES))  # no mask: the whole image trains, as kohya


def test_all_ones_mask_is_the_plain_loss_and_a_half_mask_is_the_masked_mse():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    ones = torch.ones(2, 1, 32, 32)
    assert torch.allclose(per_sample_mse(prediction, target, ones), per_sample_mse(prediction, target))
    half = ones.clone()
    half[0, :, :, 16:] = 0  # sample 0 keeps its left half (latent columns 0-1), sample 1 all of it
    squared = (prediction - target) ** 2
    expected = torch.stack([squared[0, :, :, :2].sum() / squared[0].numel(), squared[1].mean()])
    assert torch.allclose(per_sample_mse(prediction, target, half), expected)
    soft = ones.clone()
    soft[0, :, :, 4:16] = 0  # latent column 0 (image columns 0-7) half covered: weight 0.5 (area average)
    weights = torch.tensor([0.5, 0.0, 1.0, 1.0]).view(1, 1, 4)
    assert torch.allclose(per_sample_mse(prediction, target, soft)[0], (squared[0] * weights).mean())


@pytest.fixture(scope="module")
def comps(tiny):
    return load_components(tiny, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("settings", [dict(), dict(snr_gamma=5.0, prediction_type="v_prediction")],
                         ids=["epsilon", "v-prediction and Min-SNR"])
def test_the_masked_diffusion_loss_is_linear_in_the_mask(tiny, comps, tmp_path, settings):
    """Min-SNR and v-prediction weigh each sample by one number, so the loss under a mask plus the loss under its
    complement is the unmasked loss, with the same noise, timesteps and target."""
    cfg = TrainConfig(model=tiny, data="kohya:x", tuner="res-tuning", output=str(tmp_path), masked_loss=True,
                      **settings)
    comps.noise_scheduler.register_to_config(prediction_type=settings.get("prediction_type", "epsilon"))
    encoders = Encoders(comps, torch.float32)
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "caption": ["a red circle", "a red circle"],
             "index": torch.tensor([0, 1]), "flipped": torch.tensor([False, False]), "position": torch.tensor([0, 1])}
    left = torch.zeros(2, 1, 64, 64)
    left[:, :, :, :24] = 1
    with torch.no_grad():
        loss = lambda mask: diffusion_loss(comps.unet, encoders, {**batch, "mask": mask}, cfg, 3, "cpu")  # noqa: E731
        whole, part, rest = loss(torch.ones_like(left)), loss(left), loss(1 - left)
        unmasked = diffusion_loss(comps.unet, encoders, {**batch, "mask": left},
                                  dataclasses.replace(cfg, masked_loss=False), 3, "cpu")
    assert 0 < part < whole and 0 < rest < whole
    assert torch.allclose(part + rest, whole, rtol=1e-5)
    assert torch.allclose(whole, unmasked, rtol=1e-6)  # all ones is the plain loss; without the option no mask is read
    comps.noise_scheduler.register_to_config(prediction_type="epsilon")


def left_half_white(grey: np.ndarray) -> np.ndarray:
    mask = np.zeros_like(grey)
    mask[:, :grey.shape[1] // 2] = 255
    return mask


def run_config(tiny, data, output, **overrides):
    return TrainConfig(model=tiny, data=data, tuner="res-tuning", output=str(output), max_steps=2, batch_size=2,
                       learning_rate=1e-3, snr_gamma=5.0, prediction_type="v_prediction", **overrides)


def test_a_masked_run_trains_end_to_end_and_all_white_masks_change_nothing(tiny, tmp_path):
    white = kohya_set(tmp_path / "white", count=4, size=(64, 64), mask=lambda grey: np.full_like(grey, 255))
    half = kohya_set(tmp_path / "half", count=4, size=(64, 64), mask=left_half_white)
    train(run_config(tiny, white, tmp_path / "plain"))
    train(run_config(tiny, white, tmp_path / "white-run", masked_loss=True))
    results = train(run_config(tiny, half, tmp_path / "half-run", masked_loss=True))
    recorded = json.loads((tmp_path / "white-run" / "config.json").read_text())
    assert recorded["masked_loss"] is True and recorded["mask_dir"] is None
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["masked_loss"] is False
    runs = ("plain", "white-run", "half-run")
    tuners = {run: load_file(str(tmp_path / run / "tuner" / "tuner.safetensors")) for run in runs}
    assert all(torch.allclose(tuners["plain"][k], tuners["white-run"][k], atol=1e-6) for k in tuners["plain"])
    assert any(not torch.allclose(tuners["plain"][k], tuners["half-run"][k], atol=1e-6) for k in tuners["plain"])
    assert results["steps"] == 2 and results["final_loss"] > 0


def test_bad_masks_are_one_line(tiny, tmp_path):
    spec = kohya_set(tmp_path / "data", count=2)
    base = ["train", "--model", tiny, "--data", spec, "--max-steps", "1"]
    missing = tmp_path / "no-such-masks"
    line = one_error_line([*base, "--output", str(tmp_path / "a"), "--masked-loss", "--mask-dir", str(missing)])
    assert "--mask-dir" in line and "is not a folder" in line
    assert "add --masked-loss" in one_error_line([*base, "--output", str(tmp_path / "b"), "--mask-dir", str(tmp_path)])
    empty = tmp_path / "masks"
    empty.mkdir()
    assert "none of the 2 images" in one_error_line([*base, "--output", str(tmp_path / "c"), "--masked-loss",
                                                     "--mask-dir", str(empty)])
    wrong = tmp_path / "data" / "1_thing" / "img1.mask.png"
    Image.new("L", (40, 40), 255).save(wrong)
    line = one_error_line([*base, "--output", str(tmp_path / "d"), "--masked-loss"])
    assert str(wrong) in line and "40x40" in line and "80x48" in line
