"""`restune-sd sample`: determinism, equality with a stock pipeline + load_tuner, resume, several tuners."""

import json

import numpy as np
import pytest
import torch
from conftest import perturb
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from typer.testing import CliRunner

import restune_sd
from restune_sd.cli.main import app

runner = CliRunner()
STEPS = ["--steps", "4", "--guidance", "5"]


def saved_tuner(tiny, folder, name, seed):
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    restune_sd.attach(pipe, restune_sd.preset(name, "unet"))
    perturb(pipe.unet, seed=seed, std=0.2)  # a tuner that changes the images, as a trained one would
    return str(restune_sd.save_tuner(pipe, folder))


@pytest.fixture(scope="module")
def tuners(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuners")
    return {name: saved_tuner(tiny, root / name, name, seed) for seed, name in enumerate(["res-tuning", "bypass"])}


def pixels(path):
    return np.asarray(Image.open(path))


def invoke(*args):
    result = runner.invoke(app, ["sample", *args])
    assert result.exit_code == 0, result.output
    return result


def test_one_image_equals_a_stock_pipeline_with_load_tuner(tiny, tuners, tmp_path):
    invoke("--model", tiny, "--tuner", tuners["res-tuning"], "--out", str(tmp_path / "out"), "--prompt", "a photo of a dog",
           "--seed", "42", *STEPS)
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    restune_sd.load_tuner(pipe, tuners["res-tuning"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    stock = pipe("a photo of a dog", num_inference_steps=4, guidance_scale=5,
                 generator=torch.Generator("cpu").manual_seed(42)).images[0]
    assert np.array_equal(pixels(tmp_path / "out" / "00000.png"), np.asarray(stock))
    assert stock.size == (64, 64)  # the model's own resolution by default

    plain = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    base = plain("a photo of a dog", num_inference_steps=4, guidance_scale=5, generator=torch.Generator("cpu").manual_seed(42)).images[0]
    assert not np.array_equal(np.asarray(base), np.asarray(stock))  # the tuner does change the image


def test_same_seed_same_images_and_batching_changes_only_rounding(tiny, tmp_path):
    prompts = ["a red square", "a blue circle", "a green dog"]
    args = ["--model", tiny, *sum((["--prompt", p] for p in prompts), []), *STEPS, "--seed", "7"]
    invoke(*args, "--out", str(tmp_path / "a"), "--batch-size", "1")
    invoke(*args, "--out", str(tmp_path / "again"), "--batch-size", "1")
    invoke(*args, "--out", str(tmp_path / "b"), "--batch-size", "2")
    for i in range(3):
        a = pixels(tmp_path / "a" / f"{i:05d}.png").astype(int)
        assert np.array_equal(a, pixels(tmp_path / "again" / f"{i:05d}.png"))
        # Each image has its own generator; batched kernels differ from single ones only in float rounding.
        assert np.abs(a - pixels(tmp_path / "b" / f"{i:05d}.png")).max() <= 2
    records = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["seed"]) for r in records] == [(f"{i:05d}.png", p, 7 + i) for i, p in enumerate(prompts)]
    assert (tmp_path / "a" / "grid.png").is_file()


def test_an_interrupted_job_picks_up_where_it_stopped(tiny, tmp_path, monkeypatch):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("one cat\ntwo cats\nthree cats\nfour cats\n")
    args = ["--model", tiny, "--prompts-file", str(prompts_file), *STEPS]
    invoke(*args, "--out", str(tmp_path / "straight"))

    calls = {"n": 0}
    original = StableDiffusionPipeline.__call__

    def dies_on_third_call(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, *a, **k)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", dies_on_third_call)
    result = runner.invoke(app, ["sample", *args, "--out", str(tmp_path / "resumed")])
    assert result.exit_code != 0
    done = sorted(p.name for p in (tmp_path / "resumed").glob("*.png"))
    assert done == ["00000.png", "00001.png"]
    first_written = (tmp_path / "resumed" / "00000.png").stat().st_mtime_ns

    calls["n"] = -100
    invoke(*args, "--out", str(tmp_path / "resumed"))
    assert calls["n"] == -98  # only the two missing images were generated
    assert (tmp_path / "resumed" / "00000.png").stat().st_mtime_ns == first_written
    for i in range(4):
        assert np.array_equal(pixels(tmp_path / "straight" / f"{i:05d}.png"), pixels(tmp_path / "resumed" / f"{i:05d}.png"))


def test_several_tuners_sample_into_their_own_folders(tiny, tuners, tmp_path):
    invoke("--model", tiny, "--tuner", tuners["res-tuning"], "--tuner", tuners["bypass"], "--out", str(tmp_path / "out"),
           "--prompt", "a bird", *STEPS)
    a, b = pixels(tmp_path / "out" / "res-tuning" / "00000.png"), pixels(tmp_path / "out" / "bypass" / "00000.png")
    assert not np.array_equal(a, b)
    single = tmp_path / "single"
    invoke("--model", tiny, "--tuner", tuners["bypass"], "--out", str(single), "--prompt", "a bird", *STEPS)
    assert np.array_equal(b, pixels(single / "00000.png"))


def test_bad_sampling_input_is_one_line(tiny, tuners, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.png").write_bytes(b"x")
    cases = [
        (["--model", tiny, "--out", str(taken), "--prompt", "x"], "already holds files"),
        (["--model", tiny, "--tuner", tuners["bypass"], "--out", str(taken), "--prompt", "x"], "already holds files"),
        (["--model", tiny, "--out", str(tmp_path / "a")], "give prompts one way"),
        (["--model", tiny, "--out", str(tmp_path / "b"), "--prompt", "x", "--scheduler", "magic"], "unknown --scheduler"),
        (["--model", tiny, "--out", str(tmp_path / "c"), "--prompt", "x", "--tuner", str(tmp_path)], "not a tuner folder"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["sample", *args])
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (taken / "keep.png").read_bytes() == b"x"


def test_coco_captions_are_chosen_reproducibly_and_written_alongside(tiny, tmp_path):
    from restune_sd.datasets import make_synthetic

    root = make_synthetic("coco", tmp_path / "coco", num_classes=2, images_per_class=3)
    for out in ("a", "b"):
        invoke("--model", tiny, "--coco", str(root), "--num-images", "3", "--out", str(tmp_path / out), *STEPS)
    chosen = [json.loads(line) for line in (tmp_path / "a" / "coco_captions.jsonl").read_text().splitlines()]
    assert len(chosen) == 3 and chosen == [json.loads(line) for line in (tmp_path / "b" / "coco_captions.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [c["caption"] for c in chosen]


def test_coco_without_num_images_samples_the_protocols_count_and_says_when_fewer(tiny, tmp_path):
    from restune_sd.datasets import make_synthetic
    from restune_sd.evaluation.fid import FID_PROTOCOL_IMAGES

    assert FID_PROTOCOL_IMAGES == 5000  # docs/method.md §4: every COCO2017 val image, FID-5k
    root = make_synthetic("coco", tmp_path / "coco", num_classes=2, images_per_class=3)
    result = invoke("--model", tiny, "--coco", str(root), "--out", str(tmp_path / "out"), "--steps", "1")
    chosen = (tmp_path / "out" / "coco_captions.jsonl").read_text().splitlines()
    said = [line for line in result.stderr.splitlines() if "FID protocol" in line]
    assert len(said) == 1 and f"{len(chosen)} images sampled from COCO2017 val, fewer than the 5,000" in said[0]
    assert json.loads(result.stdout)["base"]["num_images"] == len(chosen) >= 1  # every captioned val image there is


def test_two_processes_split_the_images_and_give_the_same_ones(tiny, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = ["sample", "--model", tiny, *sum((["--prompt", f"shape {i}"] for i in range(4)), []), *STEPS]
    bin_dir = Path(sys.executable).parent
    launch = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(bin_dir / "restune-sd"), *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(launch, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    invoke(*args[1:], "--out", str(tmp_path / "one"))
    for i in range(4):
        # Launched processes run with OMP_NUM_THREADS=1: other reduction orders, so equal up to float rounding.
        diff = np.abs(pixels(tmp_path / "two" / f"{i:05d}.png").astype(int) - pixels(tmp_path / "one" / f"{i:05d}.png"))
        assert diff.max() <= 2, diff.max()
    assert len((tmp_path / "two" / "samples.jsonl").read_text().splitlines()) == 4
