"""`--config` and `--tuner` files as people write them (issue 15, items 16 and 19): option names as `--help` prints
them, a classify run's own config.json, and YAML whose aliases would expand without end."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import one_error_line
from typer.testing import CliRunner

from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic_classification
from restune_sd.tiny import write_tiny_vit

runner = CliRunner()
# Far above what the command needs (about 1.3 GB), far below what expanding the aliases would take: a regression
# fails with a MemoryError instead of exhausting the machine.
MEMORY_LIMIT = 6 * 2**30


def billion_laughs(key: str, levels: int = 8) -> str:
    """A YAML mapping of one `key` whose value is ~330 bytes of nested aliases that expand to 10**levels strings."""
    parts = ["&a [" + ",".join(["lol"] * 10) + "]"]
    parts += [f"&{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 10) + "]" for i in range(1, levels)]
    return f"{key}: [{', '.join(parts)}]\n"


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cli_process(args: list[str]) -> subprocess.CompletedProcess:
    """`restune-sd ARGS` in its own process, its memory bounded, stopped after two minutes (a regression fails, never hangs)."""
    cli = str(Path(sys.executable).with_name("restune-sd"))
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=120, preexec_fn=limit_memory)


@pytest.mark.parametrize("command, key", [
    (["train", "--data", "folder:x", "--model", "sd15", "--output", "{tmp}/run", "--config"], "learning_rate"),
    (["info", "--model", "sd15", "--config"], "name"),
], ids=["run config", "tuner config"])
def test_a_billion_laughs_yaml_is_one_line(tmp_path, command, key):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs(key))
    assert len(bomb.read_bytes()) < 450
    done = run_cli_process([arg.format(tmp=tmp_path) for arg in command] + [str(bomb)])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert "aliases" in lines[0] and len(lines[0]) < 400
    assert not (tmp_path / "run").exists()


def test_anchors_used_a_few_times_still_work(tmp_path):
    config = tmp_path / "tuner.yaml"
    config.write_text("tuners:\n  - &adapter {kind: res-adapter, site: ffn, dim: 8, blocks: 'down_blocks\\..*'}\n"
                      "  - {<<: *adapter, blocks: 'up_blocks\\..*'}\n")
    result = runner.invoke(app, ["info", "--model", "sd15", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tuner_params"] > 0


def test_a_self_referring_yaml_is_one_line(tmp_path):
    config = tmp_path / "tuner.yaml"
    config.write_text("name: &loop [*loop]\n")
    assert "refers to itself" in one_error_line(["info", "--model", "sd15", "--config", str(config)])


def test_deeply_nested_yaml_or_json_is_one_line(tmp_path):
    for suffix, text in ((".yaml", "name: " + "[" * 5000 + "]" * 5000), (".json", '{"name": ' + "[" * 100000 + "]" * 100000 + "}")):
        config = tmp_path / f"tuner{suffix}"
        config.write_text(text)
        assert "nested too deeply" in one_error_line(["info", "--model", "sd15", "--config", str(config)])


def test_option_names_as_help_prints_them_are_accepted(tiny, data, tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"model": tiny, "data": data, "output": str(tmp_path / "run"), "tuner": "lora-r4",
                                        "max-steps": 1, "batch-size": 2, "validation-prompt": "a red square",
                                        "validation-steps": 1, "no-center-crop": True, "report-to": "none"}))
    result = runner.invoke(app, ["train", "--config", str(run_file)])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["validation_prompts"] == ["a red square"] and recorded["center_crop"] is False
    assert (tmp_path / "run" / "validation").is_dir()


def test_one_setting_given_twice_is_one_line(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("validation-prompt: [a]\nvalidation_prompts: [b]\n")
    message = one_error_line(["train", "--config", str(run_file), "--output", str(tmp_path / "run")])
    assert "validation_prompts" in message and "twice" in message


@pytest.mark.parametrize("command", [["train"], ["classify", "train"]])
def test_a_boolean_where_a_number_belongs_is_one_line(tmp_path, command):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("batch-size: true\n")  # Click alone would take it for a batch of 1
    message = one_error_line([*command, "--config", str(run_file), "--output", str(tmp_path / "run")])
    assert "batch_size must be a number, not true" in message, message
    assert not (tmp_path / "run").exists()


def test_classify_train_repeats_its_own_run_from_its_config_json(tmp_path):
    vit = str(write_tiny_vit(tmp_path / "vit", num_labels=2))
    data = make_synthetic_classification("classfolder", tmp_path / "classes", num_classes=2, images_per_class=2, size=32)
    first = tmp_path / "first"
    result = runner.invoke(app, ["classify", "train", "--model", vit, "--data", f"classfolder:{data}", "--output", str(first),
                                 "--tuner", "linear", "--max-steps", "1", "--batch-size", "2", "--warmup-epochs", "0",
                                 "--report-to", "none"])
    assert result.exit_code == 0, result.output
    again = tmp_path / "again"
    result = runner.invoke(app, ["classify", "train", "--config", str(first / "config.json"), "--output", str(again)])
    assert result.exit_code == 0, result.output
    recorded = [json.loads((run / "config.json").read_text()) for run in (first, again)]
    assert {**recorded[0], "output": None} == {**recorded[1], "output": None}
