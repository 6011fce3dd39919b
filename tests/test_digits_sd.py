"""The SD half of `restune-sd bench digits` end to end (a few steps of everything), the digit scorer, and `export
--format pipeline`: a UNet trained whole becomes a diffusers pipeline folder that stock diffusers and `train` load."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from restune_sd.cli.main import app
from restune_sd.config import preset_names
from restune_sd.train import TrainConfig, train

runner = CliRunner()
pytest.importorskip("sklearn")


def test_bench_digits_sd_quick_writes_every_preset_row_grid_and_bounds(tmp_path):
    out = tmp_path / "digits"
    result = runner.invoke(app, ["bench", "digits", "--part", "sd", "--output", str(out), "--seeds", "0", "--quick"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].endswith("--part sd --seeds 0 --quick")
    part = saved["parts"]["sd"]
    rows = [row for row in part["rows"] if row["tuner"] in preset_names("unet")]
    assert [row["tuner"] for row in rows] == preset_names("unet")
    for row in rows:
        assert row["digits"] == "5-9" and set(row["per_digit"]) == {"5", "6", "7", "8", "9"}
        assert 0 <= row["accuracy"] <= 100 and np.isfinite(row["frechet"]) and row["trainable_params"] > 0
    assert {(r["tuner"], r["digits"]) for r in part["rows"]} >= {("pretrained (no tuning)", "0-4"),
                                                                  ("pretrained (no tuning)", "5-9")}
    # The judge is real whatever --quick does: it reads real test digits far above chance (10%).
    for group in ("0-4", "5-9"):
        assert part["reference"][group]["real_test_accuracy"] > 85
    table = (out / "results.md").read_text()
    assert all(f"| {name} | " in table for name in preset_names("unet")) and "mean nothing" in table
    for name in [*preset_names("unet"), "pretrained"]:
        grid = out / "sd" / "grids" / f"{name}.png"
        assert grid.is_file() and f"(sd/grids/{name}.png)" in table
    assert (out / "sd" / "pretrained" / "model_index.json").is_file()
    again = runner.invoke(app, ["bench", "digits", "--part", "sd", "--output", str(out), "--quick", "--seeds", "0"])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_bench_digits_sd_refuses_a_tuner_that_is_no_unet_preset(tmp_path):
    result = runner.invoke(app, ["bench", "digits", "--part", "sd", "--output", str(tmp_path / "d"), "--quick",
                                 "--tuners", "linear"])
    assert result.exit_code == 2 and "not a UNet preset" in result.output


def test_scorer_reads_real_digits_and_frechet_separates_digit_sets():
    from restune_sd.evaluation import digits_data
    from restune_sd.evaluation.digits_scorer import DigitScorer, Splits, rendered

    splits = Splits.make(digits_data.load())
    assert not set(map(bytes, splits.train.images)) & set(map(bytes, splits.test.images)) - {bytes(64)}
    scorer = DigitScorer(splits.train, 32)
    high = splits.test_of(digits_data.TRANSFER_DIGITS)
    assert scorer.real_accuracy(high) > 0.9
    same = scorer.frechet(rendered(splits.train.subset(np.isin(splits.train.labels, digits_data.TRANSFER_DIGITS)), 32),
                          rendered(high, 32))
    other = scorer.frechet(rendered(splits.test_of(digits_data.PRETRAIN_DIGITS), 32), rendered(high, 32))
    assert 0 <= same < other / 3


def test_a_full_train_run_exports_as_a_pipeline_that_stock_diffusers_loads(tiny, data, tmp_path):
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from restune_sd.io import load_tuner
    from restune_sd.models import load_unet

    run = tmp_path / "run"
    train(TrainConfig(model=tiny, data=data, tuner="full", output=str(run), max_steps=2, batch_size=2,
                      learning_rate=1e-2, report_to="none"))
    result = runner.invoke(app, ["export", str(run), "--format", "pipeline", "--output", str(tmp_path / "pipe")])
    assert result.exit_code == 0, result.output
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    ours = load_tuner(load_unet(tiny), run)
    base = load_unet(tiny)
    trained = dict(ours.named_parameters())
    for name, tensor in exported.unet.named_parameters():
        assert torch.equal(tensor, trained[name]), name
    assert any(not torch.equal(p, trained[n]) for n, p in base.named_parameters())  # training moved the weights
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):  # every other part is the base's, byte for byte
        for file in (Path(tiny) / part).iterdir():
            assert (tmp_path / "pipe" / part / file.name).read_bytes() == file.read_bytes(), file
    # The exported folder is a pipeline the next train run starts from.
    again = train(TrainConfig(model=str(tmp_path / "pipe"), data=data, tuner="lora-r4", output=str(tmp_path / "next"),
                              max_steps=1, batch_size=2, report_to="none"))
    assert again["steps"] == 1


def test_pipeline_export_refuses_other_tuners_and_folders_that_are_not_its_own(tiny, data, tmp_path):
    lora = tmp_path / "lora"
    train(TrainConfig(model=tiny, data=data, tuner="lora-r4", output=str(lora), max_steps=1, batch_size=2,
                      report_to="none"))
    result = runner.invoke(app, ["export", str(lora), "--format", "pipeline", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "full" in result.output and not (tmp_path / "out").exists()
    full = tmp_path / "full"
    train(TrainConfig(model=tiny, data=data, tuner="full", output=str(full), max_steps=1, batch_size=2,
                      report_to="none"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):  # not a pipeline folder: never replaced
        result = runner.invoke(app, ["export", str(full), "--format", "pipeline", "--output", str(tmp_path / "taken"), *extra])
        assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep"
    result = runner.invoke(app, ["export", str(full), "--format", "pipeline", "--output", str(tmp_path / "x"),
                                 "--model", str(data.partition(":")[2])])
    assert result.exit_code == 2 and "not a local diffusers pipeline" in result.output
    result = runner.invoke(app, ["export", str(full), "--format", "pipeline", "--output", str(tmp_path / "x"),
                                 "--model", tiny])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["export", str(full), "--format", "pipeline", "--output", str(tmp_path / "x"), "--overwrite"])
    assert again.exit_code == 0, again.output  # a pipeline exported before is replaced on request
