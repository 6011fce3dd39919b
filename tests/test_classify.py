"""`restune-sd classify`: every tuner trains and learns on the tiny ViT, resume and two processes match one run,
eval and the VTAB table, multi-task predict, and bad input in one line."""

import json
from pathlib import Path

import pytest
import torch
from conftest import launched_in_two_processes
from safetensors.torch import load_file
from typer.testing import CliRunner

from restune_sd.classify import ClassifyConfig, classify
from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic_classification
from restune_sd.tiny import write_tiny_vit

runner = CliRunner()
TUNERS = ["res-tuning", "bypass", "adapter", "prefix", "prompt", "lora", "linear", "full"]


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return str(write_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit"))


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """Six classes of coloured shapes, 16 images each: a task a tuned tiny ViT can learn in a hundred steps."""
    root = make_synthetic_classification("classfolder", tmp_path_factory.mktemp("data") / "shapes", num_classes=6,
                                         images_per_class=16, size=32)
    return f"classfolder:{root}"


def config(vit, data, out, **overrides) -> ClassifyConfig:
    settings = dict(model=vit, data=data, output=str(out), tuner="bypass", max_steps=4, batch_size=8, warmup_epochs=0,
                    eval_batch_size=16)
    return ClassifyConfig(**{**settings, **overrides})


@pytest.mark.parametrize("layout", ["vtab", "cub", "nabirds", "flowers102", "dogs", "cars", "classfolder"])
def test_every_layout_trains_and_scores(vit, layout, tmp_path):
    root = make_synthetic_classification(layout, tmp_path / "data", num_classes=3, images_per_class=4, size=32)
    results = classify(config(vit, f"{layout}:{root}", tmp_path / "run", max_steps=2))
    assert results["steps"] == 2 and 0 <= results["top1"] <= 1
    saved = json.loads((tmp_path / "run" / "tuner" / "tuner_config.json").read_text())
    assert saved["head"]["num_labels"] == results["num_classes"] and saved["resolution"] == 32
    for name in ("config.json", "metrics.jsonl", "loss.png", "results.json"):
        assert (tmp_path / "run" / name).is_file()


@pytest.mark.parametrize("tuner", TUNERS)
def test_every_tuner_learns_well_above_chance(vit, learnable, tuner, tmp_path):
    results = classify(config(vit, learnable, tmp_path / "run", tuner=tuner, max_steps=120, batch_size=16,
                              lr_scheduler="constant"))
    assert results["num_classes"] == 6
    assert results["top1"] >= 0.8, results  # chance is 1/6
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_resume_ends_bit_equal_to_an_uninterrupted_run(vit, learnable, tmp_path):
    # A constant rate: a cosine schedule's shape depends on --max-steps, which the second part raises.
    settings = dict(tuner="res-tuning", lr_scheduler="constant")
    classify(config(vit, learnable, tmp_path / "whole", max_steps=6, **settings))
    classify(config(vit, learnable, tmp_path / "parts", max_steps=3, checkpoint_every=3, **settings))
    classify(config(vit, learnable, tmp_path / "parts", max_steps=6, resume="latest", **settings))
    whole = load_file(str(tmp_path / "whole" / "tuner" / "tuner.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "tuner" / "tuner.safetensors"))
    assert whole.keys() == parts.keys() and any(k.startswith("classifier.") for k in whole)
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_two_processes_match_one_process_with_the_combined_batch(vit, learnable, tmp_path):
    args = ["classify", "train", "--model", vit, "--data", learnable, "--tuner", "bypass", "--max-steps", "3",
            "--warmup-epochs", "0"]
    a = launched_in_two_processes(args, tmp_path / "two", batch_size=4)
    classify(config(vit, learnable, tmp_path / "one", max_steps=3, batch_size=8))
    b = load_file(str(tmp_path / "one" / "tuner" / "tuner.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_eval_scores_a_trained_tuner_and_refuses_another_class_count(vit, learnable, tmp_path):
    results = classify(config(vit, learnable, tmp_path / "run", max_steps=2))
    scored = runner.invoke(app, ["classify", "eval", "--model", vit, "--tuner", str(tmp_path / "run"), "--data", learnable])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["top1"] == results["top1"]  # the final model, scored the same way
    other = make_synthetic_classification("classfolder", tmp_path / "three", num_classes=3, images_per_class=4, size=32)
    refused = runner.invoke(app, ["classify", "eval", "--model", vit, "--tuner", str(tmp_path / "run"),
                                  "--data", f"classfolder:{other}"])
    assert refused.exit_code == 2 and "trained for 6 classes" in refused.stderr


def test_vtab_all_trains_each_task_and_writes_the_table(vit, tmp_path):
    for task, classes in (("kitti", 4), ("eurosat", 5), ("dmlab", 3)):
        make_synthetic_classification("vtab", tmp_path / "vtab", num_classes=classes, images_per_class=4, size=32, task=task)
    result = runner.invoke(app, ["classify", "eval", "--model", vit, "--vtab-all", str(tmp_path / "vtab"), "--output",
                                 str(tmp_path / "out"), "--preset", "bypass", "--max-steps", "2", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "out" / "vtab.json").read_text())
    assert list(table["tasks"]) == ["eurosat", "dmlab", "kitti"]  # the paper's order
    assert set(table["group_means"]) == {"Specialized", "Structured"}
    structured = (table["tasks"]["dmlab"] + table["tasks"]["kitti"]) / 2
    assert table["group_means"]["Structured"] == pytest.approx(structured)
    assert table["mean_of_group_means"] == pytest.approx((structured + table["tasks"]["eurosat"]) / 2)
    markdown = (tmp_path / "out" / "vtab.md").read_text()
    assert "| bypass |" in markdown and "group mean" in markdown


def test_predict_shares_one_forward_and_names_the_fallback(vit, learnable, tmp_path):
    for name, tuner in (("shapes-a", "bypass"), ("shapes-b", "bypass"), ("shapes-lora", "lora")):
        classify(config(vit, learnable, tmp_path / name, tuner=tuner, max_steps=2, seed=len(name)))
    images = Path(learnable.partition(":")[2]) / "test"
    args = ["classify", "predict", str(images), "--model", vit, "--top-k", "2"]
    both = runner.invoke(app, [*args, "--tuner", str(tmp_path / "shapes-a"), "--tuner", str(tmp_path / "shapes-b"),
                               "--tuner", str(tmp_path / "shapes-lora")])
    assert both.exit_code == 0, both.output
    lines = [json.loads(line) for line in both.stdout.splitlines()]
    assert len(lines) == 3 * len(list(images.rglob("*.*")))
    assert "shapes-lora" in both.stderr and both.stderr.count("own backbone pass") == 1
    alone = runner.invoke(app, [*args, "--tuner", str(tmp_path / "shapes-b")])
    expected = [json.loads(line) for line in alone.stdout.splitlines()]
    assert [line for line in lines if line["task"] == "shapes-b"] == expected
    assert len(expected[0]["top_k"]) == 2 and expected[0]["class"] == expected[0]["top_k"][0]["class"]


def test_bad_predict_input_is_one_line(vit, learnable, tmp_path):
    classify(config(vit, learnable, tmp_path / "task", max_steps=1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    for name in ("a.png", "b.jpg"):  # images by name only: nothing to predict is an error, not an empty success
        (tmp_path / "broken" / name).write_bytes(b"not an image at all")
    for extra in ([str(tmp_path / "empty")], [str(tmp_path / "missing.png")], [str(tmp_path / "broken")]):
        result = runner.invoke(app, ["classify", "predict", *extra, "--model", vit, "--tuner", str(tmp_path / "task")])
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
        assert result.stdout == ""


def test_a_resolution_the_vit_cannot_take_is_one_line_and_writes_nothing(vit, learnable, tmp_path):
    result = runner.invoke(app, ["classify", "train", "--model", vit, "--data", learnable, "--output", str(tmp_path / "run"),
                                 "--resolution", "48", "--max-steps", "1"])
    assert result.exit_code == 2 and "takes 32 px images" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_warm_up_as_long_as_the_run_is_named(vit, learnable, tmp_path, capsys):
    classify(config(vit, learnable, tmp_path / "warm", max_steps=3, warmup_epochs=1))  # an epoch is more than 3 steps
    assert "never reaches --learning-rate" in capsys.readouterr().err
    classify(config(vit, learnable, tmp_path / "short", max_steps=3, warmup_steps=1))
    assert "never reaches" not in capsys.readouterr().err
