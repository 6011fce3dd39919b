"""`restune-sd sample` and tuner files against reuse by another job, damaged tuners, a full disk and bad numbers
(issue 8): a different job never relabels old images, and every failure is one line with nothing half-written."""

import errno
import json
import shutil
from pathlib import Path

import pytest
from conftest import perturb
from diffusers import StableDiffusionPipeline
from PIL import Image
from typer.testing import CliRunner

import restune_sd
from restune_sd.cli.main import app
from restune_sd.errors import UserError

runner = CliRunner()
STEPS = ["--steps", "2", "--guidance", "5"]


@pytest.fixture(scope="module")
def tuners(tiny, tmp_path_factory):
    """Two different tuners saved in folders of the same name."""
    root = tmp_path_factory.mktemp("tuners")
    saved = []
    for seed in (1, 2):
        pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
        restune_sd.attach(pipe, restune_sd.preset("res-tuning", "unet"))
        perturb(pipe.unet, seed=seed, std=0.2)
        saved.append(str(restune_sd.save_tuner(pipe, root / f"copy{seed}" / "mine")))
    return saved


def one_error_line(args) -> str:
    result = runner.invoke(app, ["sample", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if "error" in line]  # progress bars may come before it
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    return lines[0]


def sample(*args):
    result = runner.invoke(app, ["sample", *args])
    assert result.exit_code == 0, result.output
    return result


def test_another_tuner_or_other_prompts_never_reuse_the_images(tiny, tuners, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    out = tmp_path / "out"
    sample("--model", tiny, "--tuner", tuners[0], "--out", str(out), "--prompts-file", str(prompts), *STEPS)
    image = (out / "00000.png").read_bytes()
    sample("--model", tiny, "--tuner", tuners[0], "--out", str(out), "--prompts-file", str(prompts), *STEPS)  # same job

    assert "another job" in one_error_line(["--model", tiny, "--tuner", tuners[1], "--out", str(out), "--prompts-file",
                                            str(prompts), *STEPS])
    prompts.write_text("a blue circle\n")
    assert "another job" in one_error_line(["--model", tiny, "--tuner", tuners[0], "--out", str(out), "--prompts-file",
                                            str(prompts), *STEPS])
    assert (out / "00000.png").read_bytes() == image
    assert json.loads((out / "samples.jsonl").read_text())["prompt"] == "a red square"

    both = ["--model", tiny, "--tuner", tuners[0], "--tuner", tuners[1], "--out", str(tmp_path / "both"), "--prompt", "x"]
    assert "two tuners would sample into" in one_error_line(both)


def test_a_damaged_tuner_is_refused(tiny, tuners, tmp_path):
    truncated, flipped = tmp_path / "truncated", tmp_path / "flipped"
    for copy in (truncated, flipped):
        shutil.copytree(tuners[0], copy)
    weights = (truncated / "tuner.safetensors").read_bytes()
    (truncated / "tuner.safetensors").write_bytes(weights[: len(weights) // 2])
    data = bytearray((flipped / "tuner.safetensors").read_bytes())
    data[-7] ^= 0x10  # one bit of one weight
    (flipped / "tuner.safetensors").write_bytes(bytes(data))
    for damaged in (truncated, flipped):
        message = one_error_line(["--model", tiny, "--tuner", str(damaged), "--out", str(tmp_path / damaged.name / "out"),
                                  "--prompt", "x", *STEPS])
        assert "is damaged" in message and "checksum" in message
        with pytest.raises(UserError, match="checksum"):
            restune_sd.load_tuner(StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None), damaged)
    (flipped / "tuner_config.json").write_text('{"format": ')
    assert "is damaged" in one_error_line(["--model", tiny, "--tuner", str(flipped), "--out", str(tmp_path / "c"), "--prompt", "x"])


def test_a_full_disk_keeps_the_finished_images_and_leaves_no_partial_one(tiny, tmp_path, monkeypatch):
    saves = {"n": 0}
    real_save = Image.Image.save

    def disk_fills_up(self, fp, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            Path(fp).write_bytes(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_fills_up)
    out = tmp_path / "out"
    message = one_error_line(["--model", tiny, "--out", str(out), "--prompt", "one", "--prompt", "two", *STEPS])
    assert "no space left on device" in message and "run the same command again" in message
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "sample_config.json"]
    monkeypatch.setattr(Image.Image, "save", real_save)
    sample("--model", tiny, "--out", str(out), "--prompt", "one", "--prompt", "two", *STEPS)
    assert Image.open(out / "00001.png").size == (64, 64)


@pytest.mark.parametrize("flags, expected", [
    (["--prompt", "x", "--num-images", "0"], "--num-images must be >= 1"),
    (["--prompt", "x", "--num-images", "-3"], "--num-images must be >= 1"),
    (["--prompt", "x", "--guidance", "nan"], "--guidance must be a number"),
    (["--prompt", "x", "--steps", "0"], "--steps must be >= 1"),
    (["--prompt", "x", "--resolution", "60"], "multiple of 8"),
    (["--prompt", "x", "--resolution", "100000"], "<= 4096"),
])
def test_bad_sampling_numbers_are_one_line(tiny, tmp_path, flags, expected):
    assert expected in one_error_line(["--model", tiny, "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_a_damaged_job_record_is_one_line(tiny, tmp_path):
    out = tmp_path / "out"
    sample("--model", tiny, "--out", str(out), "--prompt", "x", *STEPS)
    (out / "sample_config.json").write_text('{"settings": {')
    assert "is damaged" in one_error_line(["--model", tiny, "--out", str(out), "--prompt", "x", *STEPS])


def test_an_unwritable_out_is_one_line(tiny):
    assert "cannot write" in one_error_line(["--model", tiny, "--out", "/sys/restune-sd-samples", "--prompt", "x", *STEPS])
