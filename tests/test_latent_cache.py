"""The latent cache shared by runs (--cache-dir): a second run on the same images encodes nothing and trains the same
weights; another VAE, a changed image or a bad entry is never matched to a stored latent; kohya's repeated images are
encoded once; runs writing one folder at once leave only whole entries; a bad --cache-dir is one line."""

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import launched_in_two_processes, one_error_line
from restune_sd.datasets import make_synthetic
from restune_sd.latent_cache import RunLatents, SharedLatents, latent_store, vae_identity
from restune_sd.train import TrainConfig, train


def config(tiny, data, output, **overrides):
    return TrainConfig(model=tiny, data=data, tuner="res-tuning", output=str(output),
                       **{"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "report_to": "none", **overrides})


@pytest.fixture
def vae_images(monkeypatch) -> list[int]:
    """Counts the images the VAE encodes, whoever calls it."""
    counted, original = [], AutoencoderKL.encode

    def encode(self, x, *args, **kwargs):
        counted.append(len(x))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    return counted


def tuner(run) -> dict:
    return load_file(str(Path(run) / "tuner" / "tuner.safetensors"))


def entries(folder) -> list[Path]:
    return sorted(Path(folder).rglob("*.safetensors"))


def results(run) -> dict:
    return json.loads((Path(run) / "results.json").read_text())


@pytest.mark.parametrize("kept", [dict(encode_ahead="yes"), dict(cache=True, encode_ahead="no")], ids=["ahead", "cache"])
def test_a_second_run_encodes_nothing_and_trains_the_same_weights(tiny, tmp_path, vae_images, kept):
    data = f"folder:{make_synthetic('folder', tmp_path / 'data', num_classes=2, images_per_class=2)}"
    shared = tmp_path / "shared"
    first = train(config(tiny, data, tmp_path / "first", random_flip=True, cache_dir=str(shared), **kept))
    encoded = sum(vae_images)
    assert first["latents_encoded"] == encoded == len(entries(shared)) > 0
    assert first["latent_cache"].startswith(str(shared)) and not (tmp_path / "first" / "cache" / "latents").exists()
    vae_images.clear()
    second = train(config(tiny, data, tmp_path / "second", random_flip=True, cache_dir=str(shared), **kept))
    assert vae_images == [] and second["latents_encoded"] == 0 and second["latents_from_cache"] >= encoded
    a, b = tuner(tmp_path / "first"), tuner(tmp_path / "second")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(entries(shared)) == encoded


def test_the_default_folder_is_the_users_cache_and_none_keeps_latents_in_the_run(tiny, data, tmp_path, monkeypatch,
                                                                                  vae_images):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    train(config(tiny, data, tmp_path / "first"))  # 8 samples of 4 images: encoded ahead
    assert [p.parent.parent for p in entries(tmp_path / "xdg")] == [tmp_path / "xdg" / "restune-sd" / "latents"] * 4
    assert json.loads((tmp_path / "first" / "config.json").read_text())["cache_dir"] == "auto"
    vae_images.clear()
    alone = train(config(tiny, data, tmp_path / "alone", cache_dir="none"))
    assert alone["latents_encoded"] == sum(vae_images) == 4 and alone["latent_cache"] == str(tmp_path / "alone" / "cache" / "latents")
    assert len(entries(tmp_path / "alone" / "cache" / "latents")) == 4 and len(entries(tmp_path / "xdg")) == 4


def test_a_different_vae_or_dtype_gives_other_keys_and_a_copied_model_the_same(tiny, tmp_path):
    vae = AutoencoderKL.from_pretrained(tiny, subfolder="vae")
    shutil.copytree(tiny, tmp_path / "copy")
    copied = AutoencoderKL.from_pretrained(tmp_path / "copy", subfolder="vae")
    other = AutoencoderKL.from_pretrained(tiny, subfolder="vae")
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keys = {name: SharedLatents(tmp_path / "shared", model, dtype).keys(pixels, ["0", "1"])
            for name, model, dtype in [("vae", vae, torch.float32), ("copy", copied, torch.float32),
                                       ("other", other, torch.float32), ("bf16", vae, torch.bfloat16)]}
    assert keys["vae"] == keys["copy"]  # where the model was loaded from is no part of the key
    assert len({tuple(k) for k in keys.values()}) == 3 and len(set(keys["vae"])) == 2
    assert vae_identity(vae, torch.float32) != vae_identity(other, torch.float32)
    assert SharedLatents(tmp_path, vae, torch.float32).folder != SharedLatents(tmp_path, other, torch.float32).folder


def test_a_changed_image_under_the_same_name_is_encoded_again(tiny, tmp_path, vae_images):
    root = make_synthetic("folder", tmp_path / "data", num_classes=2, images_per_class=2)
    data, shared = f"folder:{root}", tmp_path / "shared"
    train(config(tiny, data, tmp_path / "first", cache_dir=str(shared)))
    changed = sorted(root.glob("*.png"))[1]
    with Image.open(changed) as image:
        pixels = 255 - np.asarray(image.convert("RGB"))
    Image.fromarray(pixels).save(changed)  # same name, other bytes and pixels
    vae_images.clear()
    second = train(config(tiny, data, tmp_path / "second", cache_dir=str(shared)))
    assert second["latents_encoded"] == sum(vae_images) == 1 and len(entries(shared)) == 5


def kohya_folder(root: Path, repeats: int, images: int) -> str:
    folder = root / f"{repeats}_dog"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of dog {i}")
    return f"kohya:{root}"


@pytest.mark.parametrize("kept", [dict(encode_ahead="yes"), dict(cache=True, encode_ahead="no")], ids=["ahead", "cache"])
def test_kohya_repeats_are_encoded_once_per_image(tiny, tmp_path, vae_images, kept):
    data = kohya_folder(tmp_path / "data", repeats=3, images=2)  # 6 samples a pass, 2 distinct images
    shared = train(config(tiny, data, tmp_path / "shared", max_steps=3, cache_dir=str(tmp_path / "cache"), **kept))
    assert shared["latents_encoded"] == sum(vae_images) == 2 and len(entries(tmp_path / "cache")) == 2
    vae_images.clear()  # the run's own folder keys latents by sample: each repeat is one of its own
    alone = train(config(tiny, data, tmp_path / "alone", max_steps=3, cache_dir="none", **kept))
    assert alone["latents_encoded"] == sum(vae_images) == 6


def test_a_wrong_entry_is_never_used_but_encoded_again(tiny, tmp_path, vae_images):
    root = make_synthetic("folder", tmp_path / "data", num_classes=2, images_per_class=2)
    data, shared = f"folder:{root}", tmp_path / "shared"
    train(config(tiny, data, tmp_path / "first", cache_dir=str(shared)))
    # Cloned: save_file and write_bytes below rewrite the files in place, under load_file's memory map.
    good = {path: {k: t.clone() for k, t in load_file(path).items()} for path in entries(shared)}
    wrong, nan, other, broken = good
    mean = good[wrong]["mean"]
    save_file({"mean": mean[:, :2].contiguous(), "std": good[wrong]["std"][:, :2].contiguous()}, wrong)  # another shape
    save_file({"mean": torch.full_like(mean, float("nan")), "std": good[nan]["std"]}, nan)
    save_file({"latent": mean}, other)  # another writer's format
    broken.write_bytes(b"\x80\x04not a safetensors file")
    vae_images.clear()
    second = train(config(tiny, data, tmp_path / "second", cache_dir=str(shared)))
    assert second["latents_encoded"] == sum(vae_images) == 4
    for path, tensors in good.items():
        again = load_file(path)
        assert again.keys() == {"mean", "std"} and all(torch.allclose(again[k], tensors[k], atol=1e-6) for k in again)


def writer(model: str, folder: str, rounds: int, torn, start) -> None:
    """One of two processes writing and reading the same keys at once; counts reads that were not whole and right."""
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    store = SharedLatents(Path(folder), vae, torch.float32)
    pixels = writers_pixels()
    keys = store.keys(pixels, [str(i) for i in range(len(pixels))])
    with torch.no_grad():
        dists = [vae.encode(image[None]).latent_dist for image in pixels]
    start.wait()  # both processes loaded: from here they write and read at once
    for _ in range(rounds):
        for key, dist in zip(keys, dists):
            store.put(key, {"mean": dist.mean[0], "std": dist.std[0]})
            read = store.get(key)
            if read is not None and not (torch.equal(read["mean"], dist.mean[0]) and torch.equal(read["std"], dist.std[0])):
                with torn.get_lock():
                    torn.value += 1


def writers_pixels() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_two_processes_writing_the_same_keys_at_once_leave_whole_right_entries(tiny, tmp_path):
    # A spawned process imports its target by module name: pytest's importlib mode names this file
    # tests.test_latent_cache, which does not import, so the writer comes from it under its top-level name.
    from test_latent_cache import writer as importable

    spawn = multiprocessing.get_context("spawn")
    torn, start = spawn.Value("i", 0), spawn.Barrier(2)
    workers = [spawn.Process(target=importable, args=(tiny, str(tmp_path / "shared"), 25, torn, start)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0, 0] and torn.value == 0
    vae = AutoencoderKL.from_pretrained(tiny, subfolder="vae")
    store, pixels = SharedLatents(tmp_path / "shared", vae, torch.float32), writers_pixels()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            fresh = [vae.encode(image[None]).latent_dist for image in pixels]
    finally:
        torch.set_num_threads(threads)
    keys = store.keys(pixels, [str(i) for i in range(len(pixels))])
    assert sorted(p.name for p in store.folder.iterdir()) == sorted(f"{key}.safetensors" for key in keys)  # no temp files
    for key, dist in zip(keys, fresh):
        entry = store.get(key)
        assert torch.equal(entry["mean"], dist.mean[0]) and torch.equal(entry["std"], dist.std[0])


def test_two_processes_share_the_encoding_and_sum_their_counts(tiny, data, tmp_path):
    args = ["train", "--model", tiny, "--data", data, "--max-steps", "2", "--encode-ahead", "yes", "--report-to", "none",
            "--cache-dir", str(tmp_path / "shared")]
    launched_in_two_processes(args, tmp_path / "two", batch_size=1)
    assert results(tmp_path / "two")["latents_encoded"] == 4 == len(entries(tmp_path / "shared"))
    launched_in_two_processes(args, tmp_path / "again", batch_size=1)
    assert results(tmp_path / "again")["latents_encoded"] == 0


@pytest.mark.parametrize("where", ["a file", "inside a file", "empty"])
def test_a_bad_cache_dir_is_one_line(tiny, data, tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    value = {"a file": str(tmp_path / "file"), "inside a file": str(tmp_path / "file" / "latents"), "empty": " "}[where]
    message = one_error_line(["train", "--model", tiny, "--data", data, "--output", str(tmp_path / "run"),
                              "--cache-dir", value])
    assert "--cache-dir" in message and not (tmp_path / "run").exists()
    if where != "empty":
        assert "is a file, not a folder" in message


def test_an_unwritable_default_folder_is_a_warning_and_the_run_keeps_its_own(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    vae = AutoencoderKL.from_pretrained(tiny, subfolder="vae")
    store = latent_store("auto", tmp_path / "run" / "cache" / "latents", vae, torch.float32)
    assert isinstance(store, RunLatents) and store.folder == tmp_path / "run" / "cache" / "latents"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "cannot be used" in warning[0] and "--cache-dir" in warning[0]
