"""`--config FILE`: every setting from a YAML/JSON file, flags override it, and a run's config.json repeats the run."""

import json

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic_classification
from restune_sd.tiny import write_tiny_vit

runner = CliRunner()


def settings(path):
    return json.loads((path / "config.json").read_text())


def test_a_yaml_file_sets_every_option_and_flags_override_it(tiny, data, tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"model": tiny, "data": data, "output": str(tmp_path / "from-file"),
                                        "tuner": "bypass", "max-steps": 2, "batch_size": 2, "learning_rate": 1e-3,
                                        "lr_scheduler": "linear", "adam_betas": [0.8, 0.99], "report_to": "none"}))
    result = runner.invoke(app, ["train", "--config", str(run_file), "--learning-rate", "2e-3",
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    recorded = settings(tmp_path / "run")
    assert recorded["tuner"] == "bypass" and recorded["max_steps"] == 2 and recorded["lr_scheduler"] == "linear"
    assert recorded["learning_rate"] == 2e-3 and recorded["adam_betas"] == [0.8, 0.99]
    assert not (tmp_path / "from-file").exists()


def test_a_runs_config_json_repeats_the_run(tiny, data, tmp_path):
    first = tmp_path / "first"
    result = runner.invoke(app, ["train", "--model", tiny, "--data", data, "--output", str(first), "--tuner", "adapter",
                                 "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-2", "--seed", "7",
                                 "--report-to", "none"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["train", "--config", str(first / "config.json"), "--output", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert {**settings(first), "output": None} == {**settings(tmp_path / "again"), "output": None}
    weights = [load_file(run / "tuner" / "tuner.safetensors") for run in (first, tmp_path / "again")]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert any(weights[0][k].abs().sum() > 0 for k in weights[0] if ".up." in k)  # it trained, not two untouched inits


@pytest.mark.parametrize("content, message", [
    ({"model": "m", "learning_rat": 1e-3}, "learning_rat is not a setting"),
    ("- a\n- list\n", "holds a list"),
    ("model: [unclosed\n", "is not valid YAML"),
    ("", "is empty"),
])
def test_a_bad_config_file_is_one_line_and_writes_nothing(tmp_path, content, message):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    result = runner.invoke(app, ["train", "--config", str(run_file), "--data", "folder:x", "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_missing_config_file_is_one_line(tmp_path):
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "nope.json"), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_classify_train_reads_a_config_file_too(tmp_path):
    vit = str(write_tiny_vit(tmp_path / "vit", num_labels=2))
    data = make_synthetic_classification("classfolder", tmp_path / "classes", num_classes=2, images_per_class=2, size=32)
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"model": vit, "data": f"classfolder:{data}", "output": str(tmp_path / "run"),
                                    "tuner": "linear", "max_steps": 1, "batch_size": 2, "warmup_epochs": 0,
                                    "report_to": "none"}))
    result = runner.invoke(app, ["classify", "train", "--config", str(run_file)])
    assert result.exit_code == 0, result.output
    assert settings(tmp_path / "run")["tuner"] == "linear" and settings(tmp_path / "run")["max_steps"] == 1
