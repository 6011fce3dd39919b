"""`restune-sd export` never writes over the tuner it reads, fails in one line where it cannot write (leaving nothing
behind), and creates a new diffusers output folder."""

import os

import pytest
from conftest import one_error_line
from safetensors import safe_open
from typer.testing import CliRunner

from restune_sd.cli.main import app
from test_lora_interop import trained_lora


@pytest.fixture
def run(tiny, tmp_path):
    """A run directory holding a LoRA tuner in tuner/, and the bytes of every file in that tuner folder."""
    tuner = trained_lora(tiny, tmp_path / "run" / "tuner")
    return tmp_path / "run", {path.name: path.read_bytes() for path in tuner.iterdir()}


def unchanged(run_dir, files) -> bool:
    tuner = run_dir / "tuner"
    return {path.name: path.read_bytes() for path in tuner.iterdir()} == files


@pytest.mark.parametrize("output", [
    ["--output", "run/tuner/tuner.safetensors"],
    ["--output", "run/tuner/pytorch_lora_weights.safetensors"],
    ["--output", "run/tuner/new.safetensors"],
    ["--output", "run/tuner/deeper/new.safetensors"],
    ["--format", "diffusers", "--output", "run/tuner"],
    ["--format", "diffusers", "--output", "run/tuner/tuner.safetensors"],
    ["--output", "alias/tuner.safetensors"],          # alias -> run/tuner
    ["--output", "link.safetensors"],                 # link.safetensors -> run/tuner/tuner.safetensors
    ["--format", "diffusers", "--output", "alias"],
])
def test_an_output_in_the_tuner_folder_or_on_its_files_is_refused(run, tmp_path, output, monkeypatch):
    run_dir, files = run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alias").symlink_to(run_dir / "tuner", target_is_directory=True)
    (tmp_path / "link.safetensors").symlink_to(run_dir / "tuner" / "tuner.safetensors")
    message = one_error_line(["export", str(run_dir), *output, "--overwrite"])
    assert "tuner folder" in message and "outside it" in message, message
    assert unchanged(run_dir, files)
    assert not (run_dir / "tuner" / "deeper").exists()


def test_an_output_beside_the_tuner_folder_in_the_run_is_written(run):
    run_dir, files = run
    result = CliRunner().invoke(app, ["export", str(run_dir), "--output", str(run_dir / "style.safetensors")])
    assert result.exit_code == 0, result.output
    assert (run_dir / "style.safetensors").is_file() and unchanged(run_dir, files)


@pytest.mark.parametrize("output", [
    ["--output", "/proc/restune-export.safetensors"],
    ["--format", "diffusers", "--output", "/proc"],
    ["--format", "diffusers", "--output", "/proc/restune-export.safetensors"],
    ["--format", "diffusers", "--output", "/proc/restune-export"],
])
def test_a_place_nobody_can_write_is_one_line(run, output):
    """/proc takes no new file even from root, where a chmod would not stop the write."""
    message = one_error_line(["export", str(run[0]), *output])
    assert "cannot write" in message or "cannot create" in message, message


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_a_write_whose_cleanup_fails_too_is_one_line_and_leaves_nothing(run, tmp_path, fmt):
    """A name at the length limit: the output itself could exist, but not its temporary sibling, whose removal then
    fails as well (as it does on a read-only file system): the error handler must not raise in its turn."""
    out = tmp_path / "out"
    out.mkdir()
    name = "x" * (255 - len(".safetensors")) + ".safetensors"
    message = one_error_line(["export", str(run[0]), "--format", fmt, "--output", str(out / name)])
    assert "cannot write" in message, message
    assert list(out.iterdir()) == []


def test_a_diffusers_export_creates_a_new_folder_and_its_parents(run, tmp_path):
    folder = tmp_path / "exports" / "new-style"
    result = CliRunner().invoke(app, ["export", str(run[0]), "--format", "diffusers", "--output", f"{folder}/"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in folder.iterdir()] == ["pytorch_lora_weights.safetensors"]
    with safe_open(folder / "pytorch_lora_weights.safetensors", "pt") as f:
        assert any("lora" in key for key in f.keys())


def test_a_diffusers_folder_holding_a_lora_is_replaced_only_with_overwrite(run, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"keep me")
    (folder / "notes.txt").write_text("mine")
    message = one_error_line(["export", str(run[0]), "--format", "diffusers", "--output", str(folder)])
    assert "--overwrite" in message
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == b"keep me"
    result = CliRunner().invoke(app, ["export", str(run[0]), "--format", "diffusers", "--output", str(folder), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(folder)) == ["notes.txt", "pytorch_lora_weights.safetensors"]


def test_a_kohya_output_in_a_new_folder_is_written_and_a_failed_one_leaves_no_folder(run, tmp_path):
    result = CliRunner().invoke(app, ["export", str(run[0]), "--output", str(tmp_path / "a" / "b" / "style.safetensors")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "b" / "style.safetensors").is_file()
    name = "x" * (255 - len(".safetensors")) + ".safetensors"
    one_error_line(["export", str(run[0]), "--output", str(tmp_path / "c" / "d" / name)])
    assert not (tmp_path / "c").exists()
