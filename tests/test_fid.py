"""FID/KID on torch-fidelity's Inception with seeded random weights: the figure against independent arithmetic,
saved statistics, the COCO reference's resize, each bad input as one UserError line, and the `fid` command."""

import dataclasses
import json
import shutil
import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from typer.testing import CliRunner

from restune_sd.cli.main import app
from restune_sd.errors import UserError
from restune_sd.evaluation.fid import (compute_fid, extract_features, image_paths, inception, load_statistics,
                                       save_statistics, write_random_inception_weights)


def smooth_images(folder, count, seed, size=(32, 32), suffix=".png"):
    """`count` images of bicubically upsampled 4x4 noise: smooth like photos, so the random Inception separates them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC).save(
            folder / f"{i:03d}{suffix}")
    return folder


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    generated = smooth_images(root / "generated", 8, seed=1)
    return {"generated": generated, "copy": shutil.copytree(generated, root / "copy"),
            "reference": smooth_images(root / "reference", 8, seed=2)}


@pytest.fixture(scope="module")
def features(images, weights):
    """Pool features of both sets, extracted once: the tests do their own arithmetic on them."""
    extractor = inception(weights, "cpu")
    return {side: extract_features(extractor, image_paths(images[side], side), 50, side).astype(np.float64)
            for side in ("generated", "reference")}


@pytest.fixture(scope="module")
def generated_vs_reference(images, weights, tmp_path_factory):
    """One FID+KID run that also saves the reference's statistics (with features, as --kid keeps them)."""
    stats = tmp_path_factory.mktemp("stats") / "reference.npz"
    result = compute_fid(images["generated"], images["reference"], kid=True, inception_weights=weights,
                         device="cpu", save_stats=stats)
    return result, stats


def test_identical_sets_give_zero(images, weights, features):
    result = compute_fid(images["generated"], images["copy"], inception_weights=weights)
    assert (result["num_generated"], result["num_reference"]) == (8, 8)
    trace = np.trace(np.cov(features["generated"], rowvar=False))
    assert trace > 1.0  # the random features do spread, so zero is not the trivial answer
    # FID scales with the features; float64 round-off in Tr sqrt(S S) over 2048 dims sits far below 1e-6 of Tr S.
    assert abs(result["fid"]) <= 1e-6 * trace, (result["fid"], trace)


def test_fid_matches_an_independent_computation(generated_vs_reference, features):
    x, y = features["generated"], features["reference"]
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # 8 images: rank-7 covariances, a singular product
        covmean = scipy.linalg.sqrtm(cov_x @ cov_y).real
    textbook = ((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * covmean)
    # With n < d, Tr sqrt(S_x S_y) is exactly the nuclear norm of X_c Y_c^T / sqrt((n_x - 1)(n_y - 1)).
    centred = (x - mu_x) @ (y - mu_y).T
    exact = (((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y)
             - 2 * np.linalg.svd(centred, compute_uv=False).sum() / np.sqrt((len(x) - 1) * (len(y) - 1)))
    fid = generated_vs_reference[0]["fid"]
    assert fid > 1.0
    assert abs(fid - exact) < 1e-3, (fid, exact)
    # sqrtm of a singular 2048x2048 product carries its own round-off (5.6e-4 here), so it gets a relative margin too.
    assert fid == pytest.approx(textbook, rel=1e-5, abs=1e-3)


def test_saved_statistics_give_the_same_figure(generated_vs_reference, images, weights):
    result, stats_path = generated_vs_reference
    stats = load_statistics(stats_path)
    assert stats.num_images == 8 and stats.mu.shape == (2048,) and stats.features.shape == (8, 2048)
    again = compute_fid(images["generated"], stats_path, kid=True, inception_weights=weights)
    assert again == pytest.approx(result, rel=1e-9, abs=1e-12)


def test_save_stats_refuses_to_overwrite(generated_vs_reference, images, weights):
    stats_path = generated_vs_reference[1]
    before = stats_path.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        compute_fid(images["generated"], images["reference"], inception_weights=weights, save_stats=stats_path)
    with pytest.raises(UserError, match="already exists"):
        save_statistics(stats_path, load_statistics(stats_path))
    assert stats_path.read_bytes() == before


def test_kid_returns_mean_and_std(generated_vs_reference):
    result = generated_vs_reference[0]
    assert set(result) == {"fid", "num_generated", "num_reference", "kid_mean", "kid_std"}
    assert np.isfinite(result["kid_mean"]) and result["kid_std"] >= 0.0


def test_kid_needs_the_features_in_a_statistics_file(generated_vs_reference, images, weights, tmp_path):
    bare = save_statistics(tmp_path / "bare.npz", dataclasses.replace(load_statistics(generated_vs_reference[1]),
                                                                      features=None))
    with pytest.raises(UserError, match="no features"):
        compute_fid(images["generated"], bare, kid=True, inception_weights=weights)


def test_coco_reference_is_resized_and_centre_cropped(images, weights, tmp_path):
    val = tmp_path / "coco" / "val2017"
    sizes = [(48, 40), (40, 56), (64, 48)]
    for i, size in enumerate(sizes):
        smooth_images(val, 1, seed=10 + i, size=size, suffix=f"-{i}.jpg")
    # The protocol done by hand: bicubic resize of the shorter side to 32, then the centred 32x32 square.
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    for path in sorted(val.iterdir()):
        image = Image.open(path).convert("RGB")
        scale = 32 / min(image.size)
        image = image.resize((max(32, round(image.width * scale)), max(32, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        left, top = (image.width - 32) // 2, (image.height - 32) // 2
        image.crop((left, top, left + 32, top + 32)).save(by_hand / f"{path.stem}.png")
    coco = compute_fid(images["generated"], f"coco:{tmp_path / 'coco'}", inception_weights=weights)
    assert coco["num_reference"] == 3
    assert coco == pytest.approx(compute_fid(images["generated"], by_hand, inception_weights=weights))


def bad_inputs(tmp_path, images):
    """(arguments, a phrase the error must name) for each kind of bad input."""
    one = smooth_images(tmp_path / "one", 1, seed=3)
    broken = shutil.copytree(images["generated"], tmp_path / "broken")
    (broken / "zz-broken.png").write_bytes(b"not a png")
    mixed = smooth_images(smooth_images(tmp_path / "mixed", 2, seed=4), 1, seed=5, size=(16, 24), suffix="-small.png")
    generated, reference = images["generated"], images["reference"]
    return [
        (dict(generated=one, reference=reference), "1 image(s)"),
        (dict(generated=generated, reference=one), "1 image(s)"),
        (dict(generated=broken, reference=reference), "zz-broken.png"),
        (dict(generated=generated, reference=broken), "zz-broken.png"),
        (dict(generated=mixed, reference=reference), "16x24, 32x32"),
        (dict(generated=tmp_path / "nowhere", reference=reference), "does not exist"),
        (dict(generated=generated, reference=tmp_path / "nowhere"), "does not exist"),
        (dict(generated=generated, reference=f"coco:{tmp_path}"), "no val2017 folder"),
        (dict(generated=generated, reference=broken / "zz-broken.png"), "not a .npz"),
        (dict(generated=generated, reference=reference, save_stats=tmp_path / "stats.txt"), "must end in .npz"),
        (dict(generated=generated, reference=reference, device="nowhere"), "cannot use device 'nowhere'"),
    ]


def test_each_bad_input_is_one_clear_user_error(tmp_path, images, weights):
    for arguments, phrase in bad_inputs(tmp_path, images):
        with pytest.raises(UserError) as caught:
            compute_fid(**arguments, inception_weights=weights)
        assert phrase in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_missing_or_undownloadable_inception_weights(images, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        compute_fid(images["generated"], images["reference"], inception_weights=tmp_path / "no.pth")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="--inception-weights FILE"):
        compute_fid(images["generated"], images["reference"])


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(weights, tmp_path):
    rng_before = torch.random.get_rng_state()
    again = torch.load(write_random_inception_weights(tmp_path / "again.pth", seed=0))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    first = torch.load(weights)
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)


runner = CliRunner()


def test_cli_json(generated_vs_reference, images, weights):
    result, stats_path = generated_vs_reference
    ran = runner.invoke(app, ["fid", str(images["generated"]), str(stats_path), "--json",
                              "--inception-weights", str(weights), "--batch-size", "4"])
    assert ran.exit_code == 0, ran.output
    printed = json.loads(ran.stdout)
    assert set(printed) == {"fid", "num_generated", "num_reference"}
    assert printed["fid"] == pytest.approx(result["fid"], rel=1e-6)
    # fewer images than the protocol's 5,000 is said in one line, on stderr, never in the JSON
    said = [line for line in ran.stderr.splitlines() if "FID protocol" in line]
    assert len(said) == 1 and f"{printed['num_generated']:,} images generated, fewer than the 5,000" in said[0]


def test_cli_bad_input_is_one_line_and_exit_2(images, weights, tmp_path):
    for args in ([str(tmp_path / "nowhere"), str(images["reference"])],
                 [str(images["generated"]), str(images["reference"]), "--save-stats", str(tmp_path / "stats.txt")]):
        ran = runner.invoke(app, ["fid", *args, "--inception-weights", str(weights)])
        assert ran.exit_code == 2, ran.output
        lines = ran.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert "Traceback" not in ran.output


def test_a_sample_folder_is_read_through_its_samples_jsonl(images, weights, generated_vs_reference, tmp_path):
    folder = shutil.copytree(images["generated"], tmp_path / "samples")
    names = sorted(p.name for p in folder.iterdir())
    (folder / "samples.jsonl").write_text("".join(json.dumps({"file": n, "prompt": "x"}) + "\n" for n in names))
    Image.new("RGB", (96, 96)).save(folder / "grid.png")  # the contact sheet, of another size
    result = compute_fid(folder, images["reference"], inception_weights=weights, device="cpu")
    assert result["num_generated"] == len(names)
    assert result["fid"] == pytest.approx(generated_vs_reference[0]["fid"], abs=1e-6)


def pytorch_fid_file(path, stats):
    """Statistics as pytorch-fid's `--save-stats` writes them: mu and sigma alone, compressed."""
    np.savez_compressed(path, mu=stats.mu, sigma=stats.sigma)
    return path


def test_pytorch_fid_statistics_serve_either_side(generated_vs_reference, images, weights, tmp_path):
    result, ours = generated_vs_reference
    theirs = pytorch_fid_file(tmp_path / "pytorch-fid.npz", load_statistics(ours))
    as_reference = compute_fid(images["generated"], theirs, inception_weights=weights)
    assert as_reference["fid"] == pytest.approx(result["fid"], rel=1e-9)
    assert (as_reference["num_generated"], as_reference["num_reference"]) == (8, None)
    # FID is symmetric, so statistics on the generated side give the figure with the sides swapped.
    swapped = compute_fid(theirs, images["generated"], inception_weights=weights, resolution=32)
    assert swapped["fid"] == pytest.approx(result["fid"], rel=1e-6) and swapped["num_generated"] is None
    ran = runner.invoke(app, ["fid", str(images["generated"]), str(theirs), "--inception-weights", str(weights)])
    assert ran.exit_code == 0 and "an unknown number of reference images" in ran.stdout, ran.output


def test_statistics_on_the_generated_side_need_the_reference_size(generated_vs_reference, images, weights, tmp_path):
    theirs = pytorch_fid_file(tmp_path / "pytorch-fid.npz", load_statistics(generated_vs_reference[1]))
    with pytest.raises(UserError, match="pass --resolution"):
        compute_fid(theirs, images["reference"], inception_weights=weights)
    # Ours record the size their images were brought to, which the reference images are then brought to.
    ours = compute_fid(generated_vs_reference[1], images["reference"], inception_weights=weights)
    assert ours["num_reference"] == 8 and abs(ours["fid"]) < 1e-6 * generated_vs_reference[0]["fid"]


def resized_copy(folder, target, size):
    target.mkdir()
    for path in sorted(folder.iterdir()):
        Image.open(path).resize((size, size), Image.Resampling.BICUBIC).save(target / path.name)
    return target


def test_clean_resize_is_a_pil_bicubic_resize_to_299_before_inception(images, weights, tmp_path):
    clean = compute_fid(images["generated"], images["reference"], inception_weights=weights, resize="clean")
    # By hand: PIL bicubic to 299x299, after which Inception's own resize to 299x299 leaves the pixels as they are.
    by_hand = compute_fid(resized_copy(images["generated"], tmp_path / "generated", 299),
                          resized_copy(images["reference"], tmp_path / "reference", 299), inception_weights=weights)
    assert clean["fid"] == pytest.approx(by_hand["fid"], rel=1e-6)
    legacy = compute_fid(images["generated"], images["reference"], inception_weights=weights)
    assert abs(clean["fid"] - legacy["fid"]) > 1e-3 * legacy["fid"]  # the two modes do differ on 32x32 images


def test_statistics_remember_their_resize_mode(images, weights, tmp_path):
    stats = tmp_path / "clean.npz"
    compute_fid(images["generated"], images["reference"], inception_weights=weights, resize="clean", save_stats=stats)
    assert load_statistics(stats).resize == "clean"
    with pytest.raises(UserError, match="--resize clean"):
        compute_fid(images["generated"], stats, inception_weights=weights)
    with pytest.raises(UserError, match="--resize must be one of legacy-tensorflow, clean"):
        compute_fid(images["generated"], images["reference"], inception_weights=weights, resize="bilinear")
