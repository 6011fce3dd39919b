"""The life of a run folder (issue 15): the lock two commands cannot share, take-over only of what restune-sd proves it
wrote, resume only of this run's checkpoints, checksums, rotation that keeps usable checkpoints, the weights check
before every save, and a run killed while ending that resume finishes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import poison_weights_after
from restune_sd.cli.main import app
from restune_sd.checkpoints import checksum_path
from restune_sd.runfolder import LOCK, MARKER, FolderLock
from restune_sd.train import TrainConfig, train

runner = CliRunner()


def cli(tiny, data, run, *extra):
    return runner.invoke(app, ["train", "--model", tiny, "--data", data, "--output", str(run), "--batch-size", "2",
                               "--learning-rate", "1e-3", "--report-to", "none", *extra])


def failed_with(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    return lines[0]


def finished_run(tiny, data, run, **settings):
    settings = {"max_steps": 2, "checkpoint_every": 1, "keep_checkpoints": 3, "report_to": "none", **settings}
    train(TrainConfig(model=tiny, data=data, tuner="res-tuning", output=str(run), batch_size=2, learning_rate=1e-3,
                      **settings))
    return Path(run)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_logged(run) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_a_checkpoint_of_another_run_is_never_resumed_into_this_one(tiny, data, tmp_path):
    finished, other = finished_run(tiny, data, tmp_path / "a"), finished_run(tiny, data, tmp_path / "b", seed=5)
    before = snapshot(finished)
    message = failed_with(cli(tiny, data, finished, "--max-steps", "3", "--resume",
                              str(other / "checkpoints" / "step-00000002.pt")))
    assert "is not a checkpoint of --output" in message and snapshot(finished) == before
    # Copied into this run's folder, it is still another run's: its run id says so.
    for suffix in ("", ".sha256"):
        (finished / "checkpoints" / f"step-00000005.pt{suffix}").write_bytes(
            (other / "checkpoints" / f"step-00000002.pt{suffix}").read_bytes())
    message = failed_with(cli(tiny, data, finished, "--max-steps", "6", "--resume",
                              str(finished / "checkpoints" / "step-00000005.pt")))
    assert "belongs to another run" in message
    (finished / "checkpoints" / "step-00000005.pt").unlink()
    (finished / "checkpoints" / "step-00000005.pt.sha256").unlink()
    assert snapshot(finished) == before


@pytest.mark.parametrize("extra", ["checkpoints", "cache"])
def test_a_users_folder_that_looks_like_an_early_attempt_is_never_taken_over(tiny, data, tmp_path, extra):
    mine = tmp_path / "mine"
    (mine / extra).mkdir(parents=True)
    (mine / extra / "keep.txt").write_text("mine")
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(mine)
    assert "already holds files" in failed_with(cli(tiny, data, mine, "--max-steps", "1"))
    assert snapshot(mine) == before and not (mine / LOCK).exists()


@pytest.mark.parametrize("left", ["marker and early files", "marker alone"])
def test_an_attempt_this_tool_marked_is_taken_over(tiny, data, tmp_path, left):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"tool": "restune-sd", "run_id": "0" * 32, "created": "then"}))
    if left == "marker and early files":
        (run / "config.json").write_text("{}")
        (run / "checkpoints").mkdir()
    retry = cli(tiny, data, run, "--max-steps", "1", "--checkpoint-every", "1")
    assert retry.exit_code == 0, retry.output
    assert "starting it over" in retry.stderr and steps_logged(run) == [1]
    assert json.loads((run / MARKER).read_text())["run_id"] != "0" * 32
    resumed = cli(tiny, data, run, "--max-steps", "2", "--resume", "latest")  # its checkpoints are the marker's run's
    assert resumed.exit_code == 0, resumed.output


def test_a_failure_before_the_first_write_leaves_no_folder(tiny, data, tmp_path):
    run = tmp_path / "new" / "run"
    failed_with(cli(tiny, data, run, "--max-steps", "1", "--tuner", "no-such-preset"))
    assert not (tmp_path / "new").exists()


def test_a_folder_held_by_a_live_command_is_refused_untouched(tiny, data, tmp_path):
    run = finished_run(tiny, data, tmp_path / "run", max_steps=1)
    before = snapshot(run)
    with FolderLock(run, "--output"):
        message = failed_with(cli(tiny, data, run, "--max-steps", "2", "--resume", "latest"))
        assert f"is in use by restune-sd process {os.getpid()}" in message
        fresh = tmp_path / "fresh"
        with FolderLock(fresh, "--output"):
            assert "in use" in failed_with(cli(tiny, data, fresh, "--max-steps", "1"))
    assert {k: v for k, v in snapshot(run).items() if k != LOCK} == before


def test_a_dead_commands_lock_is_taken_over_with_a_line(tiny, data, tmp_path):
    run = finished_run(tiny, data, tmp_path / "run", max_steps=1)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    (run / LOCK).write_text(json.dumps({"pid": pid, "host": "here", "started": "earlier"}))
    result = cli(tiny, data, run, "--max-steps", "2", "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert f"locked by process {pid}" in result.stderr and "taking it over" in result.stderr
    assert steps_logged(run) == [1, 2] and not (run / LOCK).exists()


def test_two_runs_started_together_into_one_folder_one_is_refused(tiny, data, tmp_path):
    run = tmp_path / "run"
    command = [str(Path(sys.executable).with_name("restune-sd")), "train", "--model", tiny, "--data", data, "--output",
               str(run), "--batch-size", "2", "--max-steps", "2", "--report-to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command + ["--seed", "1"], env=env, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command + ["--seed", "2"], env=env, stderr=subprocess.PIPE, text=True)
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in (first, second)]
    assert sorted(code for code, _ in outcomes) == [0, 2], outcomes
    winner, loser = (0, 1) if outcomes[0][0] == 0 else (1, 0)
    assert "is in use by restune-sd process" in outcomes[loser][1]
    assert json.loads((run / "config.json").read_text())["seed"] == winner + 1
    assert json.loads((run / "results.json").read_text())["steps"] == 2 and steps_logged(run) == [1, 2]


def test_a_flipped_byte_is_caught_by_the_checksum_and_resume_falls_back(tiny, data, tmp_path):
    run = finished_run(tiny, data, tmp_path / "run")
    newest = run / "checkpoints" / "step-00000002.pt"
    assert checksum_path(newest).is_file()
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    newest.write_bytes(bytes(raw))
    result = cli(tiny, data, run, "--max-steps", "3", "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert "SHA-256 does not match" in result.stderr and "resuming from step-00000001.pt" in result.stderr
    assert steps_logged(run) == [1, 2, 3]


def test_rotation_keeps_the_newest_usable_checkpoints(tiny, data, tmp_path):
    run = finished_run(tiny, data, tmp_path / "run")
    junk = run / "checkpoints" / "step-00000009.pt"
    junk.write_bytes(b"not a checkpoint")
    result = cli(tiny, data, run, "--max-steps", "3", "--resume", "latest", "--keep-checkpoints", "1")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-00000003-tuner", "step-00000003.pt", "step-00000003.pt.sha256", "step-00000009.pt"]
    again = cli(tiny, data, run, "--max-steps", "4", "--resume", str(run / "checkpoints" / "step-00000003.pt"))
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("poison", [lambda p: torch.full_like(p, float("nan")), lambda p: p * 0 + 3e37],
                         ids=["nan", "huge-but-finite"])
def test_diverged_weights_are_never_saved(tiny, data, tmp_path, monkeypatch, poison):
    poison_weights_after(monkeypatch, 3, poison)
    run = tmp_path / "run"
    message = failed_with(cli(tiny, data, run, "--max-steps", "3", "--checkpoint-every", "1"))
    assert "diverged by step 3" in message and "step-00000002.pt" in message
    assert not (run / "tuner").exists() and not (run / "results.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == ["step-00000001.pt", "step-00000002.pt"]


def test_a_run_killed_while_ending_is_finished_by_resume(tiny, data, tmp_path):
    run = finished_run(tiny, data, tmp_path / "run", max_steps=2, checkpoint_every=2)
    finished = json.loads((run / "results.json").read_text())
    tuner = load_file(str(run / "tuner" / "tuner.safetensors"))
    # As a kill during the final validation leaves it: the last checkpoint written, nothing after it.
    (run / "results.json").unlink()
    (run / "loss.png").unlink()
    import shutil

    shutil.rmtree(run / "tuner")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")
    result = cli(tiny, data, run, "--resume", "latest")
    assert result.exit_code == 0, result.output
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["steps"] == 2 and resumed["final_loss"] == finished["final_loss"]
    assert steps_logged(run) == [1, 2]
    again = load_file(str(run / "tuner" / "tuner.safetensors"))
    assert all(torch.equal(again[k], tuner[k]) for k in tuner)
    assert "already finished at step 2 of 2" in failed_with(cli(tiny, data, run, "--resume", "latest"))


@pytest.mark.parametrize("flags, expected", [
    (["--seed", str(2**64)], "--seed must be >= 0 and <= 9223372036854775807"),
    (["--learning-rate", "1e39"], "--learning-rate must be > 0 and <= 10.0"),
    (["--learning-rate", "1e37"], "--learning-rate must be > 0 and <= 10.0"),
    (["--batch-size", str(10**12)], "--batch-size must be >= 1 and <= 65536"),
    (["--max-steps", str(10**12)], "--max-steps must be >= 1 and <= 1000000000"),
    (["--tensorboard", "--report-to", "none"], "--tensorboard asks for TensorBoard logs and --report-to none"),
])
def test_numbers_past_any_real_run_are_one_line(tiny, data, tmp_path, flags, expected):
    run = tmp_path / "run"
    assert expected in failed_with(runner.invoke(app, ["train", "--model", tiny, "--data", data, "--output", str(run),
                                                       *flags]))
    assert not run.exists()


def test_adam_epsilon_that_is_zero_in_fp32_is_refused(tiny, data, tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("adam_epsilon: 1.0e-300\n")
    message = failed_with(runner.invoke(app, ["train", "--model", tiny, "--data", data, "--output",
                                              str(tmp_path / "run"), "--config", str(settings)]))
    assert "adam-epsilon must be >= 1e-30" in message


def test_the_logged_learning_rate_is_the_one_the_step_used(tiny, data, tmp_path):
    run = tmp_path / "run"
    result = cli(tiny, data, run, "--max-steps", "3", "--lr-scheduler", "linear", "--warmup-steps", "2")
    assert result.exit_code == 0, result.output
    rates = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([0.0, 0.5e-3, 1e-3])


def test_a_sample_folder_held_by_a_live_command_is_refused(tiny, tmp_path):
    out = tmp_path / "samples"
    args = ["sample", "--model", tiny, "--out", str(out), "--prompt", "a cat", "--steps", "2"]
    with FolderLock(out, "--out"):
        assert "is in use by restune-sd process" in failed_with(runner.invoke(app, args))
    assert list(out.iterdir()) == []  # the refused command wrote nothing
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "00000.png").is_file() and not (out / LOCK).exists()
