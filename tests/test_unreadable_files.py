"""Files that exist by name but cannot be read as files (issue 15, the hostile sweep's last tracebacks): a file whose
read fails with an I/O error (/proc/self/mem stands in for a bad disk sector), a folder or a device given where a file
belongs. Every command that reads a file it is given says so in one line and exits 2."""

import os
import shutil
from pathlib import Path

import pytest

from conftest import one_error_line
from restune_sd.train import TrainConfig, train

UNREADABLE = Path("/proc/self/mem")  # a regular file by stat; reading it at offset 0 fails with EIO
pytestmark = pytest.mark.skipif(not UNREADABLE.exists(), reason="needs Linux's /proc")


@pytest.fixture(scope="module")
def tuner(tiny, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    train(TrainConfig(model=tiny, data=data, output=str(run), tuner="res-tuning", max_steps=1, batch_size=2,
                      resolution=32, validation_prompts=[]))
    return run / "tuner"


def linked(tmp_path, name: str, target: Path = UNREADABLE) -> str:
    link = tmp_path / name
    link.symlink_to(target)
    return str(link)


@pytest.mark.parametrize("bad", ["eio", "folder", "device"])
@pytest.mark.parametrize("command", [["train"], ["classify", "train"], ["info", "--model", "MODEL"]])
def test_a_config_that_cannot_be_read_as_a_file_is_one_line(command, bad, tiny, tmp_path):
    path = {"eio": linked(tmp_path, "run.yaml"), "folder": str(tmp_path), "device": "/dev/zero"}[bad]
    command = [tiny if arg == "MODEL" else arg for arg in command]
    message = one_error_line([*command, "--config", path])
    expected = {"eio": "cannot read", "folder": "is a folder", "device": "not a regular file"}[bad]
    assert expected in message and path in message, message


def test_a_tuner_yaml_that_cannot_be_read_is_one_line(tiny, data, tmp_path):
    path = linked(tmp_path, "tuner.yaml")
    message = one_error_line(["train", "--model", tiny, "--data", data, "--output", str(tmp_path / "out"),
                              "--tuner", path, "--max-steps", "1"])
    assert "cannot read" in message and "tuner.yaml" in message, message
    assert not (tmp_path / "out").exists()


def test_prompt_files_that_cannot_be_read_are_one_line(tiny, data, tuner, tmp_path):
    prompts = linked(tmp_path, "prompts.txt")
    message = one_error_line(["sample", "--model", tiny, "--tuner", str(tuner), "--out", str(tmp_path / "images"),
                              "--prompts-file", prompts, "--steps", "1"])
    assert "cannot read" in message and "prompts.txt" in message, message
    assert not (tmp_path / "images").exists()
    message = one_error_line(["train", "--model", tiny, "--data", data, "--output", str(tmp_path / "run"),
                              "--validation-prompts-file", prompts, "--max-steps", "1"])
    assert "cannot read" in message and "prompts.txt" in message, message
    assert not (tmp_path / "run").exists()


def test_a_tuner_whose_config_cannot_be_read_is_one_line(tiny, tuner, tmp_path):
    copy = shutil.copytree(tuner, tmp_path / "tuner")
    os.remove(copy / "tuner_config.json")
    linked(copy, "tuner_config.json")
    for args in (["sample", "--model", tiny, "--tuner", str(copy), "--out", str(tmp_path / "images"), "--prompt", "a",
                  "--steps", "1"],
                 ["export", str(copy), "--output", str(tmp_path / "lora.safetensors")]):
        message = one_error_line(args)
        assert "cannot read" in message and "tuner_config.json" in message, message
    assert not (tmp_path / "images").exists() and not (tmp_path / "lora.safetensors").exists()
