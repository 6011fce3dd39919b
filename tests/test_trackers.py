"""Trackers through accelerate (issue 10): --report-to tensorboard (the default), wandb, all or none, read back
through TensorBoard's own reader, for `train` and `classify train`; a missing tracker package is one line, before
anything is written."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from restune_sd.classify import ClassifyConfig
from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic_classification
from restune_sd.errors import UserError
from restune_sd.tiny import write_tiny_vit
from restune_sd.train import TrainConfig, train

runner = CliRunner()


def events(run) -> EventAccumulator:
    return EventAccumulator(str(Path(run) / "tensorboard" / "restune-sd"), size_guidance={"images": 0, "scalars": 0}).Reload()


def test_tensorboard_holds_loss_lr_validation_loss_and_the_validation_images(tiny, data, tmp_path):
    run = tmp_path / "run"
    settings = dict(model=tiny, data=data, tuner="res-tuning", output=str(run), batch_size=2, learning_rate=1e-3,
                    checkpoint_every=1, validation_prompts=["a red circle", "a blue dog"], validation_images=2,
                    validation_steps=1, validation_data=data, validation_samples=2)
    train(TrainConfig(**settings, max_steps=1, report_to="none"))
    assert not (run / "tensorboard").exists()
    resumed = TrainConfig(**settings, max_steps=2, resume="latest", report_to="tensorboard")
    train(resumed, given={"max_steps", "resume", "report_to"})  # what is recorded may change on resume

    logged = events(run)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "validation_loss"):
        assert [(e.step, e.value) for e in logged.Scalars(key)] == [(2, pytest.approx(metrics[1][key], rel=1e-6))]
    folder = run / "validation" / "step-00000002"
    for p in range(2):
        (shown,) = logged.Images(f"validation/prompt-{p:03d}")
        side_by_side = np.hstack([np.asarray(Image.open(folder / f"prompt-{p:03d}-image-{i:02d}.png")) for i in range(2)])
        assert shown.step == 2
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(shown.encoded_image_string)).convert("RGB")), side_by_side)


def test_classify_train_reports_to_tensorboard_or_to_nothing(tmp_path):
    vit = write_tiny_vit(tmp_path / "vit")
    root = make_synthetic_classification("classfolder", tmp_path / "data", num_classes=2, images_per_class=2, size=32)
    base = ["classify", "train", "--model", str(vit), "--data", f"classfolder:{root}", "--eval-split", "train",
            "--max-steps", "2", "--batch-size", "2"]
    assert runner.invoke(app, [*base, "--output", str(tmp_path / "quiet"), "--report-to", "none"]).exit_code == 0
    assert (tmp_path / "quiet" / "results.json").is_file() and not (tmp_path / "quiet" / "tensorboard").exists()
    result = runner.invoke(app, [*base, "--output", str(tmp_path / "watched")])
    assert result.exit_code == 0, result.output
    assert [e.step for e in events(tmp_path / "watched").Scalars("loss")] == [1, 2]


def test_a_missing_tracker_package_is_one_line_before_anything_is_written(tiny, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed (it cannot reach its server here anyway)
    run = tmp_path / "run"
    train_args = ["train", "--model", tiny, "--data", data, "--output", str(run), "--max-steps", "1"]
    for choice in ("wandb", "all"):
        message = one_error_line([*train_args, "--report-to", choice])
        assert f"--report-to {choice} needs the wandb package: pip install wandb" in message
    classify_args = ["classify", "train", "--model", "vit-b16", "--data", f"classfolder:{tmp_path}", "--output", str(run)]
    assert "needs the wandb package" in one_error_line([*classify_args, "--report-to", "wandb"])
    assert "unknown --report-to 'mlflow'" in one_error_line([*train_args, "--report-to", "mlflow"])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert "pip install tensorboard (or --report-to none)" in one_error_line(train_args)  # the default needs it
    assert not run.exists()


def test_the_tensorboard_flag_is_an_alias_of_report_to_tensorboard():
    def report_to(**settings):
        return TrainConfig(model="m", data="d", tuner="t", output="o", tensorboard=True, **settings).report_to

    assert report_to() == "tensorboard" and report_to(report_to="wandb") == "all"
    for contradiction in (lambda: report_to(report_to="none"),
                          lambda: ClassifyConfig(model="m", data="d", output="o", tensorboard=True, report_to="none")):
        with pytest.raises(UserError, match="--report-to none"):  # it asked for no logs: it never logs silently
            contradiction()
    assert not TrainConfig(model="m", data="d", tuner="t", output="o", tensorboard=True).tensorboard  # recorded once
