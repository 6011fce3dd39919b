"""`restune-sd train` against hostile or damaged files, changed settings on resume, full disks and bad numbers
(issue 8): every failure is one line, nothing half-written is left under a final name, and no received file runs code."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import RunsCode, poison_weights_after, reseal
from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic
from restune_sd.train import TrainConfig, train

runner = CliRunner()


def cli(tiny, data, run, *extra):
    return runner.invoke(app, ["train", "--model", tiny, "--data", data, "--output", str(run), "--batch-size", "2",
                               "--learning-rate", "1e-3", *extra])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    return lines[0]


def steps_logged(run) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def finished_run(tiny, data, run, **settings):
    settings = {"max_steps": 2, "checkpoint_every": 1, "keep_checkpoints": 3, **settings}
    train(TrainConfig(model=tiny, data=data, tuner="res-tuning", output=str(run), batch_size=2, learning_rate=1e-3, **settings))
    return Path(run)


def test_a_checkpoint_that_would_run_code_is_never_loaded(tiny, data, tmp_path):
    run = finished_run(tiny, data, tmp_path / "run")
    marker, proof = tmp_path / "marker", tmp_path / "proof"
    newest = run / "checkpoints" / "step-00000002.pt"
    state = torch.load(newest, weights_only=True)
    torch.save({**state, "payload": RunsCode(marker)}, newest)
    reseal(newest)
    hostile = tmp_path / "hostile.pt"
    torch.save({**state, "payload": RunsCode(proof)}, hostile)
    torch.load(hostile, weights_only=False)
    assert proof.exists()  # the file is really hostile: an unsafe load runs its code

    result = cli(tiny, data, run, "--max-steps", "3", "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert "could run code" in result.stderr and "resuming from step-00000001.pt" in result.stderr
    assert not marker.exists()
    torch.save({**state, "payload": RunsCode(marker)}, newest)  # the resumed run rewrote it: make it hostile again
    reseal(newest)
    message = one_error_line(cli(tiny, data, run, "--max-steps", "4", "--resume", str(newest)))
    assert "could run code" in message and not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tiny, data, tmp_path, damage):
    run = finished_run(tiny, data, tmp_path / "run")
    newest = run / "checkpoints" / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[: 200 if damage == "truncated" else 0])
    result = cli(tiny, data, run, "--max-steps", "3", "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert "step-00000002.pt is damaged" in result.stderr and "resuming from step-00000001.pt" in result.stderr
    assert steps_logged(run) == [1, 2, 3]


def test_resume_takes_every_setting_from_the_run(tiny, data, tmp_path):
    run = finished_run(tiny, data, tmp_path / "run", checkpoint_every=1, keep_checkpoints=2, noise_offset=0.05)
    (run / "config.json").unlink()  # the checkpoint carries the run's settings by itself
    link = tmp_path / "same-model"
    link.symlink_to(tiny)
    result = runner.invoke(app, ["train", "--model", str(link), "--data", data, "--output", str(run), "--max-steps", "4",
                                 "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == ["step-00000003.pt", "step-00000004.pt"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["noise_offset"] == 0.05 and saved["learning_rate"] == 1e-3 and saved["batch_size"] == 2
    assert saved["max_steps"] == 4


@pytest.mark.parametrize("change", [["--resolution", "128"], ["--random-flip"], ["--no-center-crop"],
                                    ["--caption-template", "a {}"], ["--noise-offset", "0.1"], ["--learning-rate", "5e-4"],
                                    ["--snr-gamma", "5"], ["--tuner", "lora"]])
def test_resume_refuses_a_changed_setting_and_records_nothing(tiny, data, tmp_path, change):
    run = finished_run(tiny, data, tmp_path / "run")
    before = (run / "config.json").read_text()
    (run / "config.json").unlink() if "--learning-rate" in change else None  # refused even without config.json
    message = one_error_line(cli(tiny, data, run, "--max-steps", "3", "--resume", "latest", *change))
    assert "--resume: this run was started with" in message or "not the one this run was started with" in message
    assert not (run / "config.json").exists() or (run / "config.json").read_text() == before
    assert steps_logged(run) == [1, 2]


def test_a_checkpoint_that_cannot_be_written_leaves_no_partial_file(tiny, data, tmp_path, monkeypatch):
    saves = {"n": 0}
    real_save = torch.save

    def disk_fills_up(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] < 2:
            return real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4544 vs 4432")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    message = one_error_line(cli(tiny, data, tmp_path / "run", "--max-steps", "3", "--checkpoint-every", "1"))
    assert "disk is probably full" in message and "step-00000001.pt" in message and "--resume latest" in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000001-tuner", "step-00000001.pt",
                                                                             "step-00000001.pt.sha256"]
    monkeypatch.setattr(torch, "save", real_save)
    assert cli(tiny, data, tmp_path / "run", "--max-steps", "3", "--resume", "latest").exit_code == 0


def test_a_run_that_failed_before_its_first_checkpoint_can_be_retried(tiny, data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_weights_after(monkeypatch, 1, lambda p: torch.full_like(p, float("nan")))  # the next loss is NaN
    failed = runner.invoke(app, ["train", "--model", tiny, "--data", data, "--output", str(run), "--tuner", "full",
                                 "--max-steps", "5", "--checkpoint-every", "4"])
    monkeypatch.undo()
    assert failed.exit_code == 2 and (run / "config.json").is_file()
    retry = cli(tiny, data, run, "--max-steps", "2")
    assert retry.exit_code == 0, retry.output
    assert "starting it over" in retry.stderr and steps_logged(run) == [1, 2]
    assert json.loads((run / "config.json").read_text())["tuner"] == "res-tuning"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert "already holds files" in one_error_line(cli(tiny, data, tmp_path / "mine", "--max-steps", "1"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("flags, expected", [
    (["--resolution", "7"], "--resolution must be >= 8"), (["--resolution", "60"], "multiple of 8"),
    (["--resolution", "0"], "--resolution must be >= 8"), (["--resolution", "100000"], "<= 4096"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"), (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    (["--snr-gamma", "-5"], "--snr-gamma must be > 0"), (["--learning-rate", "-1"], "--learning-rate must be > 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a number"), (["--noise-offset", "inf"], "must be a number"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"), (["--warmup-steps", "-2"], "--warmup-steps must be >= 0"),
])
def test_bad_numbers_are_one_line_and_write_nothing(tiny, data, tmp_path, flags, expected):
    assert expected in one_error_line(cli(tiny, data, tmp_path / "run", "--max-steps", "1", *flags))
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_is_one_line(tiny, data):
    for args in (["train", "--model", tiny, "--data", data, "--output", "/sys/restune-sd-run", "--max-steps", "1"],
                 ["init-tiny", "/sys/restune-sd-tiny"]):
        assert "cannot write" in one_error_line(runner.invoke(app, args))


def test_a_missing_tensorboard_fails_before_anything_is_written(tiny, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert "needs the tensorboard package" in one_error_line(cli(tiny, data, tmp_path / "run", "--max-steps", "1", "--tensorboard"))
    assert not (tmp_path / "run").exists()


def test_damaged_run_records_are_read_with_a_warning(tiny, data, tmp_path):
    run = finished_run(tiny, data, tmp_path / "run")
    (run / "config.json").write_text('{"model": ')
    with (run / "metrics.jsonl").open("a") as log:
        log.write('{"step": 3, "lo')  # a kill in the middle of appending a line
    result = cli(tiny, data, run, "--max-steps", "3", "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert steps_logged(run) == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 3
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".*.tmp"))
    shutil.rmtree(run)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_images_are_summed_up_on_stderr_whatever_the_workers(tiny, tmp_path, workers):
    root = make_synthetic("folder", tmp_path / "data", num_classes=2, images_per_class=3, corrupt=2)
    result = runner.invoke(app, ["train", "--model", tiny, "--data", f"folder:{root}", "--output", str(tmp_path / "run"),
                                 "--max-steps", "3", "--batch-size", "2", "--num-workers", str(workers)])
    assert result.exit_code == 0, result.output
    assert "warning: skipped 2 corrupt images" in result.stderr
    assert json.loads(result.stdout[result.stdout.index("{"):])["steps"] == 3  # stdout holds the JSON alone


@pytest.mark.parametrize("part", ["tokenizer", "vae", "unet"])
def test_an_incomplete_model_folder_names_the_missing_part(tiny, data, tmp_path, part):
    copy = Path(shutil.copytree(tiny, tmp_path / "model"))
    shutil.rmtree(copy / part)
    for command in (["train", "--data", data, "--output", str(tmp_path / "run"), "--max-steps", "1"],
                    ["sample", "--out", str(tmp_path / "out"), "--prompt", "x", "--steps", "1"]):
        message = one_error_line(runner.invoke(app, [*command, "--model", str(copy)]))
        assert f"{part}/" in message and "incomplete" in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
    missing = one_error_line(runner.invoke(app, ["train", "--model", str(tmp_path / "nowhere" / "sd"), "--data", data,
                                                 "--output", str(tmp_path / "run")]))
    assert "does not exist" in missing and "hub" not in missing


def test_cache_works_with_random_flips_and_gives_the_same_run(tiny, data, tmp_path):
    from safetensors.torch import load_file

    settings = dict(max_steps=6, random_flip=True, checkpoint_every=0)
    finished_run(tiny, data, tmp_path / "plain", **settings)
    finished_run(tiny, data, tmp_path / "cached", cache=True, cache_dir="none", **settings)
    a = load_file(str(tmp_path / "plain" / "tuner" / "tuner.safetensors"))
    b = load_file(str(tmp_path / "cached" / "tuner" / "tuner.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    cached = [path.stem for path in (tmp_path / "cached" / "cache" / "latents").glob("*.safetensors")]
    assert {key.split("-")[1] for key in cached} == {"0", "1"}  # flipped and unflipped images each have their own latent
