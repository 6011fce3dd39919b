"""`classify train --cache-taps`: bypass and linear runs on taps computed once end where runs of the backbone at every
step end (weights, top-1, losses; in memory or from files, bf16, resumed, two processes), and the cases where the taps
change from step to step are refused or named in one line."""

import json
from pathlib import Path

import pytest
from conftest import launched_in_two_processes, one_error_line
from safetensors.torch import load_file

from restune_sd import taps
from restune_sd.classify import ClassifyConfig, classify, score_tuner
from restune_sd.datasets import build_classification_dataset, make_synthetic_classification
from restune_sd.errors import UserError
from restune_sd.tiny import write_tiny_vit


@pytest.fixture(scope="module")
def vit(vit_folder):  # the model folder (conftest's `vit` is a model object)
    return vit_folder


def run(vit, data, out, **overrides) -> dict:
    settings = dict(model=vit, data=data, output=str(out), tuner="bypass", max_steps=8, batch_size=8, warmup_epochs=0,
                    eval_batch_size=16, report_to="none")
    return classify(ClassifyConfig(**{**settings, **overrides}))


def weights(out) -> dict:
    return load_file(str(Path(out) / "tuner" / "tuner.safetensors"))


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(cached: Path, uncached: Path, tolerance: float = 1e-6) -> None:
    a, b = weights(cached), weights(uncached)
    assert a.keys() == b.keys() and any(k.startswith("classifier.") for k in a)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= tolerance
    assert losses(cached) == pytest.approx(losses(uncached), abs=1e-5)


@pytest.mark.parametrize("tuner", ["bypass", "linear"])
def test_cached_taps_end_where_the_backbone_at_every_step_ends(vit, shapes, tuner, tmp_path):
    uncached = run(vit, shapes, tmp_path / "uncached", tuner=tuner, max_steps=20, cache_taps="no")
    cached = run(vit, shapes, tmp_path / "cached", tuner=tuner, max_steps=20, cache_taps="yes")
    assert cached["cached_taps"] and not uncached["cached_taps"]
    assert_same_run(tmp_path / "cached", tmp_path / "uncached")
    assert cached["top1"] == uncached["top1"]
    assert not (tmp_path / "cached" / taps.FOLDER).exists()  # held in memory: the files were removed
    # `classify eval` reads the cached run's tuner as any other and scores what the run reported.
    scored = score_tuner(vit, str(tmp_path / "cached"), shapes, "test", 16)
    assert scored["top1"] == cached["top1"]


def test_the_backbone_is_not_run_while_training_on_cached_taps(vit, shapes, tmp_path, monkeypatch):
    from transformers.models.vit.modeling_vit import ViTModel

    calls = []
    forward = ViTModel.forward
    monkeypatch.setattr(ViTModel, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    results = run(vit, shapes, tmp_path / "run", max_steps=12, cache_taps="auto")  # 96 draws, more than the images
    assert results["cached_taps"]
    train_images = json.loads((tmp_path / "run" / "config.json").read_text())["dataset_size"]
    # Taps once per training image (batches of 16), the final top-1 on the test split; nothing per step.
    test_batches = -(-len(build_classification_dataset(shapes, split="test", resolution=32)) // 16)
    assert len(calls) == -(-train_images // 16) + test_batches


def test_taps_read_from_their_files_when_too_large_for_memory(vit, shapes, tmp_path, monkeypatch):
    held = []
    load = taps.CachedTaps.load

    def spied(self, world):
        load(self, world)
        held.append((self.taps is None, sorted(p.name for p in self.folder.iterdir())))

    monkeypatch.setattr(taps, "MEMORY_LIMIT", 0)
    monkeypatch.setattr(taps.CachedTaps, "load", spied)
    run(vit, shapes, tmp_path / "files", cache_taps="yes")
    run(vit, shapes, tmp_path / "uncached", cache_taps="no")
    assert held == [(True, ["process-0.safetensors"])]
    assert_same_run(tmp_path / "files", tmp_path / "uncached")
    assert not (tmp_path / "files" / taps.FOLDER).exists()  # removed when the run ends


def test_cached_taps_in_bf16_match_the_bf16_run(vit, shapes, tmp_path):
    cached = run(vit, shapes, tmp_path / "cached", mixed_precision="bf16", cache_taps="yes")
    uncached = run(vit, shapes, tmp_path / "uncached", mixed_precision="bf16", cache_taps="no")
    assert_same_run(tmp_path / "cached", tmp_path / "uncached")
    assert cached["top1"] == uncached["top1"]


def test_a_resumed_cached_run_ends_where_an_uninterrupted_uncached_run_does(vit, shapes, tmp_path):
    settings = dict(lr_scheduler="constant")  # --max-steps changes on resume: a cosine's shape would follow it
    run(vit, shapes, tmp_path / "whole", max_steps=6, cache_taps="no", **settings)
    run(vit, shapes, tmp_path / "parts", max_steps=3, checkpoint_every=3, cache_taps="no", **settings)
    # --cache-taps may change on resume: the second part goes on from the checkpoint on cached taps.
    resumed = run(vit, shapes, tmp_path / "parts", max_steps=6, resume="latest", cache_taps="yes", **settings)
    assert resumed["cached_taps"]
    assert_same_run(tmp_path / "parts", tmp_path / "whole")


def test_two_processes_on_cached_taps_match_one_process_with_the_combined_batch(vit, shapes, tmp_path):
    args = ["classify", "train", "--model", vit, "--data", shapes, "--tuner", "bypass", "--max-steps", "4",
            "--warmup-epochs", "0", "--cache-taps", "yes", "--report-to", "none"]
    two = launched_in_two_processes(args, tmp_path / "two", batch_size=4)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["cached_taps"]
    run(vit, shapes, tmp_path / "one", max_steps=4, cache_taps="no")
    one = weights(tmp_path / "one")
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-4


def test_random_flips_crops_and_dropout_run_the_backbone_and_refuse_yes(vit, shapes, tmp_path, capsys):
    flipped = run(vit, shapes, tmp_path / "flip", max_steps=12, random_flip=True)
    assert not flipped["cached_taps"]
    assert "runs at every step (taps not cached): --random-flip flips" in capsys.readouterr().err
    line = one_error_line(["classify", "train", "--model", vit, "--data", shapes, "--output", str(tmp_path / "no"),
                           "--tuner", "bypass", "--random-flip", "--cache-taps", "yes"])
    assert "--cache-taps yes: --random-flip" in line and not (tmp_path / "no").exists()

    cub = make_synthetic_classification("cub", tmp_path / "cub", num_classes=2, images_per_class=4, size=32)
    cropped = run(vit, f"cub:{cub}", tmp_path / "cub-run", max_steps=4, batch_size=2, random_flip=False)
    assert not cropped["cached_taps"] and "random crop" in capsys.readouterr().err

    dropout = Path(write_tiny_vit(tmp_path / "dropout-vit"))
    config = json.loads((dropout / "config.json").read_text())
    (dropout / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.1}))
    with pytest.raises(UserError, match="has dropout"):
        run(str(dropout), shapes, tmp_path / "dropout", cache_taps="yes")
    assert not run(str(dropout), shapes, tmp_path / "dropout-auto", max_steps=12)["cached_taps"]
    assert "hidden_dropout_prob 0.1" in capsys.readouterr().err


def test_other_tuners_and_short_runs(vit, shapes, tmp_path, capsys):
    line = one_error_line(["classify", "train", "--model", vit, "--data", shapes, "--output", str(tmp_path / "lora"),
                           "--tuner", "lora", "--cache-taps", "yes"])
    assert "tuner 'lora' works inside the frozen ViT" in line
    assert not run(vit, shapes, tmp_path / "adapter", tuner="adapter", max_steps=12)["cached_taps"]
    assert "taps" not in capsys.readouterr().err  # nothing to say: the backbone runs anyway
    train_images = len(build_classification_dataset(shapes, split="train", resolution=32))
    assert not run(vit, shapes, tmp_path / "short", max_steps=2)["cached_taps"]  # 16 draws
    assert f"the run draws 16 images, fewer than the {train_images} training images" in capsys.readouterr().err
    assert run(vit, shapes, tmp_path / "forced", max_steps=2, cache_taps="yes")["cached_taps"]
    line = one_error_line(["classify", "train", "--model", vit, "--data", shapes, "--output", str(tmp_path / "bad"),
                           "--cache-taps", "maybe"])
    assert "unknown --cache-taps 'maybe'" in line


def test_vtab_all_trains_on_cached_taps_and_reuses_its_runs(vit, tmp_path):
    from typer.testing import CliRunner

    from restune_sd.cli.main import app

    for task, classes in (("eurosat", 3), ("dmlab", 2)):
        make_synthetic_classification("vtab", tmp_path / "vtab", num_classes=classes, images_per_class=4, size=32, task=task)
    args = ["classify", "eval", "--model", vit, "--vtab-all", str(tmp_path / "vtab"), "--output", str(tmp_path / "out"),
            "--preset", "bypass", "--epochs", "3", "--batch-size", "4"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    for task in ("eurosat", "dmlab"):
        assert json.loads((tmp_path / "out" / task / "results.json").read_text())["cached_taps"]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["tasks"] == json.loads(first.stdout)["tasks"]


def test_the_whole_task_bench_times_cached_taps_whole_and_extrapolates_the_others(vit, tmp_path, monkeypatch):
    from restune_sd.evaluation import bench_vit_task as bench

    monkeypatch.setattr(bench, "TASK", dict(images=24, classes=3, epochs=2, batch=8, resolution=32))
    result = bench.run_task_bench(bench.TaskBenchConfig(output=tmp_path / "bench", steps=2, warmup=1, micro_batch=4,
                                                        model=vit))
    rows = {row["contender"]: row for row in result["rows"]}
    cached, lora = rows["bypass, cached taps"], rows["lora"]
    assert cached["measured"] == "whole task" and cached["steps_timed"] == 6 and cached["taps_seconds"] > 0
    assert lora["extrapolated"] and lora["steps_timed"] == 2
    assert lora["task_seconds"] == pytest.approx(lora["seconds_per_step"] * 6) and lora["ratio_to_lora"] == 1
    assert cached["ratio_to_lora"] == pytest.approx(cached["task_seconds"] / lora["task_seconds"])
    runs = tmp_path / "bench" / "runs"
    assert json.loads((runs / "lora" / "config.json").read_text())["gradient_accumulation"] == 2  # 4 x 2 = the batch
    assert "extrapolated" in (tmp_path / "bench" / "results.md").read_text()


def test_whole_task_bench_options_are_checked(tmp_path):
    base = ["bench", "vit", "--output", str(tmp_path / "b")]
    assert "--micro-batch 48 does not divide" in one_error_line([*base, "--task", "--micro-batch", "48"])
    assert "go together as `bench vit --task`" in one_error_line(["bench", "sd", "--output", str(tmp_path), "--whole"])
    assert "go together" in one_error_line([*base, "--task", "--tuners", "lora"])
