"""The ViT half of `restune-sd bench digits` end to end (a few steps of every preset), and `export --format vit-folder`:
a classifier tuned whole becomes a transformers model folder that from_pretrained and `classify train --model` load."""

import json

import pytest
import torch
from typer.testing import CliRunner

from restune_sd.classify import ClassifyConfig, classify, frozen_vit
from restune_sd.cli.main import app
from restune_sd.config import preset_names
from restune_sd.datasets import make_synthetic_classification
from restune_sd.io import load_tuner
from restune_sd.tiny import write_tiny_vit

runner = CliRunner()
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return str(write_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = make_synthetic_classification("classfolder", tmp_path_factory.mktemp("data") / "shapes", num_classes=3,
                                         images_per_class=6, size=32)
    return f"classfolder:{root}"


def tuned(vit, data, out, tuner="full"):
    classify(ClassifyConfig(model=vit, data=data, output=str(out), tuner=tuner, max_steps=3, batch_size=6,
                            warmup_epochs=0, report_to="none"))
    return out


def test_bench_digits_vit_quick_writes_every_preset_row(tmp_path):
    out = tmp_path / "digits"
    result = runner.invoke(app, ["bench", "digits", "--part", "vit", "--output", str(out), "--seeds", "0,1", "--quick"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].endswith("--part vit --seeds 0,1 --quick")
    rows = {row["preset"]: row for row in saved["parts"]["vit"]["rows"]}
    assert list(rows) == preset_names("vit")
    for name, row in rows.items():
        assert len(row["top1_per_seed"]) == 2 and 0 <= row["top1_mean"] <= 100, name
        assert row["activation_mb"] >= 0 and row["seconds_per_step"] > 0
    assert rows["linear"]["tuner_params"] == 0 and rows["full"]["tuner_params"] > rows["lora"]["tuner_params"] > 0
    assert rows["bypass"]["activation_mb"] < rows["res-tuning"]["activation_mb"]  # the backbone keeps nothing for backward
    table = (out / "results.md").read_text()
    assert all(f"| {name} | " in table for name in rows) and "mean nothing" in table
    backbone = out / "vit" / "backbone"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in backbone.iterdir()}
    again = runner.invoke(app, ["bench", "digits", "--part", "vit", "--output", str(out), "--quick"])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_a_full_classify_run_exports_as_a_vit_folder_with_its_logits(vit, shapes, tmp_path):
    run = tuned(vit, shapes, tmp_path / "run")
    result = runner.invoke(app, ["export", str(run), "--format", "vit-folder", "--output", str(tmp_path / "folder")])
    assert result.exit_code == 0, result.output
    from transformers import ViTForImageClassification

    exported = ViTForImageClassification.from_pretrained(tmp_path / "folder").eval()
    ours = load_tuner(frozen_vit(vit), run).eval()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(pixel_values=pixels).logits, ours(pixel_values=pixels).logits)
    assert exported.config.id2label == ours.config.id2label and exported.config.num_labels == 3
    preprocessor = json.loads((tmp_path / "folder" / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 32, "width": 32} and preprocessor["image_mean"] == [0.5] * 3
    # The exported folder is a backbone the next classify run starts from.
    again = tuned(str(tmp_path / "folder"), shapes, tmp_path / "second", tuner="lora")
    assert json.loads((again / "results.json").read_text())["num_classes"] == 3


def test_vit_folder_export_refuses_tuners_a_plain_vit_cannot_hold_and_existing_folders(vit, shapes, tmp_path):
    lora = tuned(vit, shapes, tmp_path / "lora", tuner="lora")
    result = runner.invoke(app, ["export", str(lora), "--format", "vit-folder", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "full" in result.output and not (tmp_path / "out").exists()
    full = tuned(vit, shapes, tmp_path / "full")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):  # not a model folder: never replaced
        result = runner.invoke(app, ["export", str(full), "--format", "vit-folder", "--output", str(tmp_path / "taken"), *extra])
        assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep"
    result = runner.invoke(app, ["export", str(full / "tuner"), "--format", "vit-folder", "--output", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output  # the run's model is found from its tuner folder too


def test_vit_res_tuning_starts_its_adapters_at_scale_4_and_keeps_the_former_recipe_as_res_tuning_s1():
    from restune_sd.config import preset
    from restune_sd.inject import attach
    from restune_sd.summary import parameter_summary
    from conftest import tiny_vit, vit_inputs

    new, old = preset("res-tuning", "vit"), preset("res-tuning-s1", "vit")
    assert [t.scale for t in new.tuners] == [4.0, None, None] and [t.scale for t in old.tuners] == [None, None, None]
    assert [(t.kind, t.site, t.dim) for t in new.tuners] == [(t.kind, t.site, t.dim) for t in old.tuners]
    frozen = tiny_vit().eval()
    with torch.no_grad():
        expected = frozen.vit(pixel_values=vit_inputs()).last_hidden_state
        tuned = attach(tiny_vit(), new).eval()
        assert torch.allclose(tuned.vit(pixel_values=vit_inputs()).last_hidden_state, expected, atol=1e-6)  # zero branch
    assert parameter_summary(tuned)["tuner_params"] == parameter_summary(attach(tiny_vit(), old))["tuner_params"]
