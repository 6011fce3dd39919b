"""DreamBooth prior preservation (`train --class-data DIR --class-prompt P`, issue 17 item 4) on the tiny model: the
missing class images are what the frozen base pipeline draws, a user's images are kept and counted, a killed
generation leaves whole images and a rerun completes the set; each instance sample is paired with a class sample,
the loss is the instance loss + w x the prior loss, resume is exact, and each bad input is one line."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import launched_in_two_processes, one_error_line
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

from restune_sd.datasets import build_dataset, make_synthetic
from restune_sd.datasets.prior import PriorPairs
from restune_sd.prior import class_dataset, prior_loss
from restune_sd.streams import SampleStream
from restune_sd.train import Encoders, TrainConfig, denoising_losses, diffusion_loss, load_components, train

PROMPT = "a photo of a dog"
SEED = 7


def config(tiny, data, output, **overrides) -> TrainConfig:
    return TrainConfig(model=tiny, data=data, tuner="res-tuning", output=str(output), report_to="none",
                       **{"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "seed": SEED, **overrides})


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def stock(tiny):
    """Image `seed` of the prompt as a stock diffusers pipeline of the base model draws it with 25 DDIM steps."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def image(seed: int) -> np.ndarray:
        drawn = pipe(PROMPT, num_inference_steps=25, guidance_scale=7.5, height=64, width=64,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        return np.asarray(drawn).astype(int)

    return image


def user_images(folder: Path, names: list[str]) -> dict[str, bytes]:
    """Images a user put in the class folder (odd sizes, one under a name of the tool's pattern); their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        Image.new("RGB", (40 + 8 * n, 56), (30 * n, 120, 200)).save(folder / name)
    return {name: (folder / name).read_bytes() for name in names}


def tuner(run: Path) -> dict:
    return load_file(str(run / "tuner" / "tuner.safetensors"))


def test_missing_class_images_are_generated_as_the_frozen_base_pipeline_draws_them_and_the_users_are_kept(
        tiny, data, tmp_path, capsys, stock):
    folder = tmp_path / "class"
    mine = user_images(folder, ["mine.jpg", "class-00001.png"])
    results = train(config(tiny, data, tmp_path / "run", class_data=str(folder), class_prompt=PROMPT, num_class_images=5))
    assert results["class_images_generated"] == 3 and results["class_images"] == 5
    assert sorted(p.name for p in folder.iterdir()) == [
        "class-00000.png", "class-00001.png", "class-00002.png", "class-00003.png", "mine.jpg"]
    assert all((folder / name).read_bytes() == content for name, content in mine.items())
    for k in (0, 2, 3):  # image k from seed SEED + k; the user's class-00001.png is skipped, never overwritten
        assert np.array_equal(pixels(folder / f"class-{k:05d}.png"), stock(SEED + k)), k
    progress = capsys.readouterr().err
    assert "class images" in progress and "2/5" in progress and "5/5" in progress  # starts at the 2 found
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: recorded[k] for k in ("class_data", "class_prompt", "num_class_images", "prior_loss_weight",
                                     "class_images_generated")} == {
        "class_data": str(folder), "class_prompt": PROMPT, "num_class_images": 5, "prior_loss_weight": 1.0,
        "class_images_generated": 3}

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    again = train(config(tiny, data, tmp_path / "again", class_data=str(folder), class_prompt=PROMPT, num_class_images=5))
    assert again["class_images_generated"] == 0 and again["class_images"] == 5
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_killed_generation_leaves_only_whole_images_and_a_rerun_completes_the_set(tiny, data, tmp_path, monkeypatch,
                                                                                    stock):
    folder = tmp_path / "class"
    settings = dict(class_data=str(folder), class_prompt=PROMPT, num_class_images=4)
    real_save, saves = Image.Image.save, []

    def killed_on_the_third(image, target, *args, **kwargs):
        saves.append(target)
        if len(saves) == 3:  # the kill lands half-way through writing image 2
            Path(target).write_bytes(b"\x89PNG\r\n\x1a\n half an image")
            raise KeyboardInterrupt
        return real_save(image, target, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny, data, tmp_path / "run", **settings))
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["class-00000.png", "class-00001.png"]
    for path in folder.iterdir():
        with Image.open(path) as image:
            image.load()  # whole: a truncated PNG raises here
    # A SIGKILL gives the write no time to clean up: its hidden temporary file stays, and is neither counted nor kept.
    (folder / ".class-00002.png.tmp").write_bytes(b"\x89PNG half")

    results = train(config(tiny, data, tmp_path / "run", **settings))  # the same command again
    assert results["class_images_generated"] == 2 and results["class_images"] == 4
    assert sorted(p.name for p in folder.iterdir()) == [f"class-{k:05d}.png" for k in range(4)]
    for k in range(4):  # as an uninterrupted run draws them
        assert np.array_equal(pixels(folder / f"class-{k:05d}.png"), stock(SEED + k)), k


def test_each_instance_sample_is_paired_with_a_class_sample_as_a_pure_function_of_seed_epoch_and_index(tmp_path):
    instance = build_dataset(f"folder:{make_synthetic('folder', tmp_path / 'data', num_classes=2, images_per_class=2)}",
                             resolution=32, center_crop=False, random_flip=True, seed=SEED)
    folder = tmp_path / "class"
    user_images(folder, ["a.png", "b.png", "c.png"])
    cfg = TrainConfig(model="unused", data="unused", tuner="res-tuning", output=str(tmp_path / "run"), resolution=32,
                      center_crop=False, random_flip=True, seed=SEED, class_data=str(folder), class_prompt=PROMPT,
                      num_class_images=3)

    def pairs_of(epochs):
        pairs = PriorPairs(instance, class_dataset(cfg), SEED)
        items = {}
        for epoch in epochs:
            pairs.set_epoch(epoch)
            items.update({(epoch, index): pairs[index] for index in range(len(pairs))})
        return items

    items = pairs_of(range(3))
    # Along the class stream (epoch * 4 + index) every class image is used once before any is used again.
    order = [items[divmod(j, 4)]["class_index"] for j in range(12)]
    assert all(sorted(order[j:j + 3]) == [0, 1, 2] for j in range(0, 12, 3)), order
    assert all(item["class_pixel_values"].shape == item["pixel_values"].shape for item in items.values())
    assert {item["class_flipped"] for item in items.values()} == {False, True}
    later = pairs_of([2, 0])  # another order, other copies: the same pairs, crops and flips
    for key, item in later.items():
        assert item["class_index"] == items[key]["class_index"] and item["class_flipped"] == items[key]["class_flipped"]
        assert torch.equal(item["class_pixel_values"], items[key]["class_pixel_values"])
        assert torch.equal(item["pixel_values"], items[key]["pixel_values"])


def test_the_loss_is_the_instance_loss_plus_the_weight_times_the_prior_loss(tiny, data, tmp_path):
    folder = tmp_path / "class"
    user_images(folder, ["a.png", "b.png"])
    cfg = config(tiny, data, tmp_path / "run", resolution=64, class_data=str(folder), class_prompt=PROMPT,
                 num_class_images=2, prior_loss_weight=0.5)
    comps = load_components(tiny, torch.device("cpu"), torch.float32)
    encoders = Encoders(comps, torch.float32)
    instance = build_dataset(data, resolution=64, seed=SEED)
    stream = SampleStream(PriorPairs(instance, class_dataset(cfg), SEED), SEED)
    batch = default_collate([stream[p] for p in (5, 6)])  # the second epoch
    with torch.no_grad():
        loss = prior_loss(comps.unet, encoders, batch, cfg, 3, "cpu").item()
        instance_loss = diffusion_loss(comps.unet, encoders, batch, cfg, 3, "cpu").item()  # its own draws, unchanged
        class_batch = {"pixel_values": batch["class_pixel_values"], "caption": [PROMPT, PROMPT],
                       "index": batch["class_index"], "flipped": batch["class_flipped"],
                       "latent_keys": ["class-a", "class-b"], "draws": [(5, 1), (6, 1)]}
        class_loss = denoising_losses(comps.unet, encoders, class_batch, cfg, 3, "cpu").mean().item()
        other_draws = denoising_losses(comps.unet, encoders, {**class_batch, "draws": [(5,), (6,)]}, cfg, 3, "cpu")
        masked_out = {**batch, "mask": torch.zeros(2, 1, 64, 64)}  # --masked-loss masks instance images, not class ones
        masked = prior_loss(comps.unet, encoders, masked_out, dataclasses.replace(cfg, masked_loss=True), 3, "cpu").item()
    assert loss == pytest.approx(instance_loss + 0.5 * class_loss, rel=1e-5)
    assert masked == pytest.approx(0.5 * class_loss, rel=1e-5)
    assert abs(other_draws.mean().item() - class_loss) > 1e-3  # the class half draws apart from its instance half


def test_a_zero_prior_weight_learns_what_a_run_without_prior_preservation_learns(tiny, data, tmp_path):
    folder = tmp_path / "class"
    user_images(folder, ["a.png", "b.png"])
    prior = dict(class_data=str(folder), class_prompt=PROMPT, num_class_images=2)
    train(config(tiny, data, tmp_path / "plain", max_steps=3))
    train(config(tiny, data, tmp_path / "zero", max_steps=3, prior_loss_weight=0.0, **prior))
    train(config(tiny, data, tmp_path / "one", max_steps=3, **prior))
    plain, zero, one = (tuner(tmp_path / run) for run in ("plain", "zero", "one"))
    # The same instance samples and draws; the concatenated batch rounds the UNet's sums a little differently, and
    # Adam's normalised steps carry that rounding into the weights (about 1e-5 here, against 6e-3 for weight 1).
    assert max((plain[k] - zero[k]).abs().max().item() for k in plain) < 1e-4
    assert max((plain[k] - one[k]).abs().max().item() for k in plain) > 1e-3  # the weight does count
    losses = {run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("plain", "zero", "one")}
    assert losses["zero"] == pytest.approx(losses["plain"], rel=1e-5)
    assert all(one > 1.5 * plain for one, plain in zip(losses["one"], losses["plain"]))  # the class half's loss added


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tiny, data, tmp_path):
    settings = dict(max_steps=4, checkpoint_every=2, keep_checkpoints=5, center_crop=False, random_flip=True,
                    class_data=str(tmp_path / "class"), class_prompt=PROMPT, num_class_images=3)
    train(config(tiny, data, tmp_path / "straight", **settings))
    interrupted = tmp_path / "interrupted"
    assert train(config(tiny, data, interrupted, **settings))["class_images_generated"] == 0
    (interrupted / "checkpoints" / "step-00000004.pt").unlink()  # killed just after its step-2 checkpoint
    shutil.rmtree(interrupted / "tuner")
    (interrupted / "results.json").unlink()
    train(config(tiny, data, interrupted, resume="latest", **settings))
    a, b = tuner(tmp_path / "straight"), tuner(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one_process_and_only_the_main_one_generates(tiny, data, tmp_path):
    folder = tmp_path / "class"
    args = ["train", "--model", tiny, "--data", data, "--tuner", "res-tuning", "--max-steps", "2", "--learning-rate",
            "1e-3", "--seed", str(SEED), "--report-to", "none", "--class-data", str(folder), "--class-prompt", PROMPT,
            "--num-class-images", "2"]
    a = launched_in_two_processes(args, tmp_path / "two", batch_size=1)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["class_images_generated"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["class-00000.png", "class-00001.png"]
    train(config(tiny, data, tmp_path / "one", class_data=str(folder), class_prompt=PROMPT, num_class_images=2))
    b = tuner(tmp_path / "one")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


def test_bad_prior_preservation_settings_are_one_line_and_write_nothing(tiny, data, tmp_path):
    folder, output = tmp_path / "class", tmp_path / "run"
    a_file = tmp_path / "a-file.png"
    a_file.write_bytes(b"not a folder")
    base = ["train", "--model", tiny, "--data", data, "--output", str(output), "--max-steps", "1"]
    with_prompt = ["--class-data", str(folder), "--class-prompt", PROMPT]
    cases = [
        ([*with_prompt, "--num-class-images", "0"], "--num-class-images must be >= 1"),
        ([*with_prompt, "--prior-loss-weight", "-1"], "--prior-loss-weight must be >= 0"),
        ([*with_prompt, "--prior-loss-weight", "nan"], "--prior-loss-weight must be a number"),
        (["--class-data", str(a_file), "--class-prompt", PROMPT], "is a file, not a folder"),
        (["--class-data", str(folder)], "--class-data needs --class-prompt"),
        (["--class-data", str(folder), "--class-prompt", " "], "--class-data needs --class-prompt"),
        (["--class-prompt", PROMPT], "--class-prompt is a prior preservation setting and goes with --class-data"),
        (["--num-class-images", "5"], "--num-class-images is a prior preservation setting"),
        (["--prior-loss-weight", "0.5"], "--prior-loss-weight is a prior preservation setting"),
        (["--class-data", str(output / "class"), "--class-prompt", PROMPT], "lies inside --output"),
    ]
    for flags, expected in cases:
        assert expected in one_error_line([*base, *flags]), flags
        assert not output.exists() and not folder.exists(), flags
    assert a_file.read_bytes() == b"not a folder"
