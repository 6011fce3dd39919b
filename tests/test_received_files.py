"""Files a user receives (issue 15, items 15, 18 and 20): a tuner config checked whole against its schema and its
checksum, damaged model folders refused in one line, folders saved by the installed libraries accepted, and saved
folders with the umask's permissions."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import RunsCode, one_error_line, perturb, tiny_unet
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from typer.testing import CliRunner

from restune_sd import attach, load_tuner, preset, save_tuner
from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic_classification
from restune_sd.errors import UserError
from restune_sd.images import write_validation_folder
from restune_sd.schema import MAX_LABELS
from restune_sd.tiny import write_tiny_vit

runner = CliRunner()


def test_saved_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tuner = save_tuner(attach(tiny_unet(), preset("lora-r4", "unet")), tmp_path / "tuner")
        validation = write_validation_folder([[Image.new("RGB", (8, 8))]], ["a prompt"], tmp_path / "validation")
    finally:
        os.umask(old)
    for folder in (tuner, validation):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


# --- tuner_config.json: checked whole against its schema and its checksum -------------------------------------------

def copy_with_config(folder, where, edit, keep_checksum: bool = False) -> str:
    """A copy of the tuner `folder` at `where` whose config `edit` changed; without its checksum unless `keep_checksum`
    (as a tuner saved before the checksum existed, or one whose editor removed it)."""
    shutil.copytree(folder, where)
    meta = json.loads((where / "tuner_config.json").read_text())
    edit(meta)
    if not keep_checksum:
        meta.pop("config_sha256", None)
    (where / "tuner_config.json").write_text(json.dumps(meta))
    return str(where)


@pytest.fixture(scope="module")
def lora_tuner(tiny, tmp_path_factory):
    """A LoRA tuner that fits the tiny pipeline's UNet."""
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    tuned = attach(unet, preset("lora-r4", "unet"))
    perturb(tuned)
    return save_tuner(tuned, tmp_path_factory.mktemp("tuners") / "lora")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny ViT folder, a class-folder data set and a classify run on it: (model, data, run)."""
    root = tmp_path_factory.mktemp("classify")
    vit = str(write_tiny_vit(root / "vit", num_labels=2))
    data = f"classfolder:{make_synthetic_classification('classfolder', root / 'classes', num_classes=2, images_per_class=2, size=32)}"
    run = root / "run"
    result = runner.invoke(app, ["classify", "train", "--model", vit, "--data", data, "--output", str(run), "--tuner",
                                 "linear", "--max-steps", "1", "--batch-size", "2", "--warmup-epochs", "0", "--report-to", "none"])
    assert result.exit_code == 0, result.output
    return vit, data, run


def drop(*path):
    def edit(meta):
        for key in path[:-1]:
            meta = meta[key]
        del meta[path[-1]]
    return edit


def put(value, *path):
    def edit(meta):
        for key in path[:-1]:
            meta = meta[key]
        meta[path[-1]] = value
    return edit


UNET_EDITS = {
    "no backbone": (drop("backbone"), "has no backbone"),
    "no tuning": (drop("tuning"), "has no tuning"),
    "a list signature": (put([1, 2], "backbone", "signature"), "backbone.signature must be"),
    "a signature key missing": (drop("backbone", "signature", "in_channels"), "backbone.signature must be"),
    "another backbone kind": (put("vae", "backbone", "kind"), "backbone.kind must be one of unet, vit"),
    "a huge LoRA rank": (put(10**9, "tuning", "lora", "rank"), "rank must be between 1 and 1024"),
    "a tuning of the wrong type": (put("lora", "tuning"), "expected a mapping"),
    "an unknown prediction type": (put("x0", "prediction_type"), "prediction_type must be one of epsilon"),
    "a negative step count": (put(-1, "trained_steps"), "trained_steps must be"),
    "a head on a UNet": (put({"num_labels": 2, "id2label": {"0": "a", "1": "b"}}, "head"), "has no classification head"),
    "an unknown field": (put(1, "surprise"), "unknown field(s) ['surprise']"),
    "a backbone that is no mapping": (put([], "backbone"), "backbone must be a mapping"),
}


@pytest.mark.parametrize("command", ["sample", "export"])
@pytest.mark.parametrize("case", UNET_EDITS)
def test_an_edited_unet_tuner_config_is_one_line(tiny, lora_tuner, tmp_path, command, case):
    edit, expected = UNET_EDITS[case]
    tuner = copy_with_config(lora_tuner, tmp_path / "edited", edit)
    args = {"sample": ["sample", "--model", tiny, "--tuner", tuner, "--out", str(tmp_path / "out"), "--prompt", "x",
                       "--steps", "1"],
            "export": ["export", tuner, "--output", str(tmp_path / "out.safetensors")]}[command]
    assert expected in one_error_line(args)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


def test_an_edit_under_the_checksum_is_refused_and_an_unchanged_copy_loads(tiny, lora_tuner, tmp_path):
    edited = copy_with_config(lora_tuner, tmp_path / "edited", put(1e-3, "tuning", "lora", "alpha"), keep_checksum=True)
    assert "does not match its config_sha256" in one_error_line(["export", edited, "--output", str(tmp_path / "a.safetensors")])
    unchanged = copy_with_config(lora_tuner, tmp_path / "unchanged", lambda meta: None, keep_checksum=True)
    result = runner.invoke(app, ["export", unchanged, "--output", str(tmp_path / "b.safetensors")])
    assert result.exit_code == 0, result.output


def test_a_tuner_saved_before_the_config_checksum_still_loads(tiny, lora_tuner, tmp_path):
    older = copy_with_config(lora_tuner, tmp_path / "older", lambda meta: None)
    assert "config_sha256" not in json.loads((tmp_path / "older" / "tuner_config.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    assert load_tuner(unet, older).restune.config.lora.rank == 4
    result = runner.invoke(app, ["export", older, "--output", str(tmp_path / "older.safetensors")])
    assert result.exit_code == 0, result.output


def test_a_config_too_deep_or_too_big_is_one_line(lora_tuner, tmp_path):
    deep = tmp_path / "deep"
    shutil.copytree(lora_tuner, deep)
    (deep / "tuner_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in one_error_line(["export", str(deep), "--output", str(tmp_path / "a.safetensors")])
    big = copy_with_config(lora_tuner, tmp_path / "big", put("x" * 40 * 2**20, "data"))
    assert "bytes, more than any tuner's" in one_error_line(["export", big, "--output", str(tmp_path / "b.safetensors")])


def test_training_extras_are_accepted(tiny, lora_tuner, tmp_path):
    extras = {"trained_steps": 4, "data": "folder:/data", "prediction_type": "v_prediction"}
    unet = attach(UNet2DConditionModel.from_pretrained(tiny, subfolder="unet"), preset("lora-r4", "unet"))
    folder = save_tuner(unet, tmp_path / "tuner", extra=extras)
    assert load_tuner(UNet2DConditionModel.from_pretrained(tiny, subfolder="unet"), folder).restune is not None
    with pytest.raises(UserError, match="unknown field"):
        save_tuner(unet, tmp_path / "another", extra={"surprise": 1})
    assert not (tmp_path / "another").exists()


VIT_EDITS = {
    "a label without a name": (drop("head", "id2label", "1"), "head.id2label must be a name for each label 0 to 1"),
    "a negative class count": (put(-3, "head", "num_labels"), "head.num_labels must be a whole number from 1"),
    # Just past the bounds: a regression allocates megabytes, not the gigabytes of the 60000 px a user tried.
    "a huge class count": (put(MAX_LABELS + 1, "head", "num_labels"), "head.num_labels must be a whole number from 1"),
    "a huge resolution": (put(4104, "resolution"), "resolution must be a whole number of pixels from 1 to 4096"),
    "another resolution": (put(64, "resolution"), "resolution must be the ViT's image size 32"),
    "a zero std": (put([0, 0, 0], "image_std"), "image_std must be three numbers"),
    "a NaN mean": (put([float("nan")] * 3, "image_mean"), "image_mean must be three numbers"),
    "no head fields": (put([], "head"), "head must be a mapping of num_labels and id2label"),
}


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("case", VIT_EDITS)
def test_an_edited_classifier_config_is_one_line(classifier, tmp_path, command, case):
    vit, data, run = classifier
    edit, expected = VIT_EDITS[case]
    tuner = copy_with_config(run / "tuner", tmp_path / "edited", edit)
    image = next(Path(data.removeprefix("classfolder:")).rglob("*.png"))
    args = {"eval": ["classify", "eval", "--model", vit, "--tuner", tuner, "--data", data, "--split", "train"],
            "predict": ["classify", "predict", str(image), "--model", vit, "--tuner", tuner]}[command]
    assert expected in one_error_line(args)


def test_an_untouched_classifier_scores(classifier):
    vit, data, run = classifier
    result = runner.invoke(app, ["classify", "eval", "--model", vit, "--tuner", str(run), "--data", data, "--split", "train"])
    assert result.exit_code == 0, result.output


# --- model folders: what the libraries cannot load is one line naming the part ---------------------------------------

def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_key(key):
    def edit(path):
        config = json.loads(path.read_text())
        del config[key]
        path.write_text(json.dumps(config))
    return edit


def pickled_bin_only(name):
    """Replace a part's safetensors weights with a pickle that would write a file if it were unpickled unsafely."""
    def edit(path):
        marker = path.parent / "code-ran"
        torch.save({"weight": RunsCode(marker)}, path.with_name(name))
        path.unlink()
    return edit


PIPELINE_DAMAGES = {
    "a truncated unet config": ("unet/config.json", truncate, "unet"),
    "a truncated vae config": ("vae/config.json", truncate, "vae"),
    "a truncated model_index.json": ("model_index.json", truncate, "model_index.json"),
    "no sample_size": ("unet/config.json", drop_key("sample_size"), "sample_size"),
    "a truncated text encoder": ("text_encoder/model.safetensors", truncate, "text_encoder"),
    "a truncated unet": ("unet/diffusion_pytorch_model.safetensors", truncate, "unet"),
    "only a pickled .bin": ("text_encoder/model.safetensors", pickled_bin_only("pytorch_model.bin"), "text_encoder"),
    "a truncated tokenizer": ("tokenizer/tokenizer.json", truncate, "tokenizer"),
}


@pytest.mark.parametrize("command", ["train", "sample"])
@pytest.mark.parametrize("case", PIPELINE_DAMAGES)
def test_a_damaged_pipeline_folder_is_one_line(tiny, data, tmp_path, command, case):
    name, damage, part = PIPELINE_DAMAGES[case]
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    if case == "a truncated tokenizer":  # the files an older library wrote beside tokenizer.json would still load
        for older in ("vocab.json", "merges.txt"):
            (model / "tokenizer" / older).unlink()
    damage(model / name)
    out = tmp_path / "out"
    args = {"train": ["train", "--model", str(model), "--data", data, "--output", str(out), "--max-steps", "1",
                      "--report-to", "none"],
            "sample": ["sample", "--model", str(model), "--out", str(out), "--prompt", "x", "--steps", "1"]}[command]
    message = one_error_line(args)
    assert part in message and str(model) in message
    assert not out.exists() and not list(model.rglob("code-ran"))


VIT_DAMAGES = {
    "a truncated config": ("config.json", truncate, "config.json"),
    "a truncated preprocessor config": ("preprocessor_config.json", truncate, "preprocessor_config.json"),
    "a preprocessor config with a zero std": ("preprocessor_config.json",
                                              lambda path: path.write_text('{"image_std": [0, 0, 0]}'), "image_std"),
    "a huge image size": ("config.json", lambda path: path.write_text(json.dumps(
        {**json.loads(path.read_text()), "image_size": 4104})), "image_size"),
    "a truncated model": ("model.safetensors", truncate, "model.safetensors"),
    "only a pickled .bin": ("model.safetensors", pickled_bin_only("pytorch_model.bin"), "pytorch_model.bin"),
}


@pytest.mark.parametrize("case", VIT_DAMAGES)
def test_a_damaged_vit_folder_is_one_line(classifier, tmp_path, case):
    vit, data, run = classifier
    name, damage, expected = VIT_DAMAGES[case]
    model = tmp_path / "vit"
    shutil.copytree(vit, model)
    damage(model / name)
    out = tmp_path / "out"
    message = one_error_line(["classify", "train", "--model", str(model), "--data", data, "--output", str(out),
                              "--tuner", "linear", "--max-steps", "1", "--report-to", "none"])
    assert expected in message and str(model) in message
    assert not out.exists() and not list(model.rglob("code-ran"))
    assert expected in one_error_line(["classify", "eval", "--model", str(model), "--tuner", str(run), "--data", data])


@pytest.fixture(scope="module")
def resaved(tiny, tmp_path_factory):
    """The tiny pipeline as the installed diffusers and transformers save it, with no vocab.json (newer transformers
    write only tokenizer.json)."""
    folder = tmp_path_factory.mktemp("resaved") / "pipeline"
    StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None).save_pretrained(folder)
    for older in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / older).unlink(missing_ok=True)
    return folder


def test_a_pipeline_saved_by_the_installed_libraries_trains_and_samples(resaved, data, tmp_path):
    assert not (resaved / "tokenizer" / "vocab.json").exists()
    result = runner.invoke(app, ["train", "--model", str(resaved), "--data", data, "--output", str(tmp_path / "run"),
                                 "--tuner", "lora-r4", "--max-steps", "1", "--report-to", "none"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sample", "--model", str(resaved), "--tuner", str(tmp_path / "run"), "--out",
                                 str(tmp_path / "images"), "--prompt", "a red square", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "images" / "00000.png").is_file()
