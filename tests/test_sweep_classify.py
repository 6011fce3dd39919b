"""`classify train --sweep`: K ViT bypass (and linear) variants on one frozen forward a step, or on taps cached once,
each with its own head: equal to the same settings trained alone, scored per variant, resumed exactly, read back by
`classify eval`, and each bad input refused in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import one_error_line
from safetensors.torch import load_file
from typer.testing import CliRunner

from restune_sd.classify import ClassifyConfig, classify
from restune_sd.cli.main import app

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def vit(vit_folder):  # the model folder (conftest's `vit` is a model object)
    return vit_folder


@pytest.fixture(scope="module")
def paper_form(tmp_path_factory):
    """A ViT bypass of the paper's form with another bottleneck: another ladder than the preset's."""
    path = tmp_path_factory.mktemp("tuners") / "paper.yaml"
    path.write_text("bypass:\n  form: paper\n  bottleneck: 4\n  groups: 2\n")
    return str(path)


@pytest.fixture
def backbone_forwards(monkeypatch):
    """Counts the frozen ViT's forwards (ViTModel.forward: the backbone under the head)."""
    from transformers.models.vit.modeling_vit import ViTModel

    calls = {"n": 0}
    forward = ViTModel.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ViTModel, "forward", counting)
    return calls


def run(vit, data, out, **overrides) -> dict:
    settings = dict(model=vit, data=data, output=str(out), tuner="bypass", max_steps=6, batch_size=8, warmup_epochs=0,
                    eval_batch_size=16, report_to="none")
    return classify(ClassifyConfig(**{**settings, **overrides}))


def tensors(folder) -> dict:
    return load_file(str(Path(folder) / "tuner.safetensors"))


def assert_close(a: dict, b: dict, tolerance: float = TOLERANCE) -> None:
    assert a.keys() == b.keys() and any(k.startswith("classifier.") for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tolerance, worst


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def scored(vit, tuner, data) -> float:
    """`classify eval --tuner TUNER`'s top-1, through the CLI."""
    result = CliRunner().invoke(app, ["classify", "eval", "--model", vit, "--tuner", str(tuner), "--data", data,
                                      "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["top1"]


@pytest.mark.parametrize("cache_taps", ["no", "yes"])
def test_each_bypass_variant_equals_its_run_alone_on_one_frozen_forward(vit, shapes, tmp_path, cache_taps,
                                                                        backbone_forwards):
    # max_grad_norm 1e-2 clips every step: a norm shared by the variants would give other weights than alone.
    settings = dict(max_grad_norm=1e-2, lr_scheduler="cosine", warmup_steps=1, cache_taps=cache_taps)
    results = run(vit, shapes, tmp_path / "sweep", sweep=["learning_rate=1e-3,3e-3,1e-2"], **settings)
    swept_forwards, backbone_forwards["n"] = backbone_forwards["n"], 0
    alone = run(vit, shapes, tmp_path / "alone", learning_rate=3e-3, **settings)
    # As many backbone forwards as one run alone: per step uncached, none per step on cached taps.
    assert swept_forwards == backbone_forwards["n"]
    assert results["cached_taps"] == alone["cached_taps"] == (cache_taps == "yes")

    names = ["learning_rate=1e-3", "learning_rate=3e-3", "learning_rate=1e-2"]
    assert list(results["variants"]) == names
    variant = tmp_path / "sweep" / "tuner" / "learning_rate=3e-3"
    mine, theirs = tensors(variant), tensors(tmp_path / "alone" / "tuner")
    assert any(k.startswith("restune_bypass.ladder.") for k in mine)
    assert_close(mine, theirs)
    other = tensors(tmp_path / "sweep" / "tuner" / "learning_rate=1e-2")
    assert max((other[k] - theirs[k]).abs().max().item() for k in theirs) > 100 * TOLERANCE  # trained apart
    assert json.loads((variant / "tuner_config.json").read_text())["tuning"] == json.loads(
        (tmp_path / "alone" / "tuner" / "tuner_config.json").read_text())["tuning"]

    for step, (ours, its) in enumerate(zip(metrics(tmp_path / "sweep"), metrics(tmp_path / "alone"))):
        assert ours["loss/learning_rate=3e-3"] == pytest.approx(its["loss"], abs=TOLERANCE), step
        assert ours["lr/learning_rate=3e-3"] == pytest.approx(its["lr"], rel=1e-12), step
    row = results["variants"]["learning_rate=3e-3"]
    assert row["top1"] == alone["top1"] and "top1" not in results
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| top-1 |" in table and table.count("(highest top-1)") == 1
    assert f"| {row['top1']:.6g} | tuner/learning_rate=3e-3 |" in table
    assert json.loads((tmp_path / "sweep" / "results.json").read_text())["variants"] == results["variants"]
    # `classify eval` reads a variant's folder as any tuner and scores what the sweep reported for it.
    assert scored(vit, variant, shapes) == row["top1"]


def test_tuner_variants_bypass_linear_and_a_config_equal_their_runs_alone(vit, shapes, tmp_path, paper_form):
    results = run(vit, shapes, tmp_path / "sweep", sweep=[f"tuner=bypass,linear,{paper_form}"], learning_rate=1e-2,
                  cache_taps="yes")
    assert list(results["variants"]) == ["tuner=bypass", "tuner=linear", "tuner=paper"]
    for tuner, name in (("linear", "tuner=linear"), (paper_form, "tuner=paper")):
        alone = run(vit, shapes, tmp_path / name, tuner=tuner, learning_rate=1e-2, cache_taps="no")
        assert_close(tensors(tmp_path / "sweep" / "tuner" / name), tensors(tmp_path / name / "tuner"))
        assert results["variants"][name]["top1"] == alone["top1"]
    linear = tensors(tmp_path / "sweep" / "tuner" / "tuner=linear")
    assert sorted(linear) == ["classifier.bias", "classifier.weight"]  # a head alone, as `linear` saves it
    assert scored(vit, tmp_path / "sweep" / "tuner" / "tuner=linear", shapes) == results["variants"]["tuner=linear"]["top1"]


def test_linear_variants_from_a_file_are_heads_on_one_forward_with_their_own_ema(vit, shapes, tmp_path,
                                                                                 backbone_forwards):
    sweep_file = tmp_path / "variants.yaml"
    sweep_file.write_text("- {name: slow, learning_rate: 1e-3}\n- {name: fast, learning_rate: 1e-2, weight_decay: 0.5}\n")
    settings = dict(tuner="linear", cache_taps="no", ema=True, ema_decay=0.5, max_steps=4)
    results = run(vit, shapes, tmp_path / "sweep", sweep=[str(sweep_file)], **settings)
    swept_forwards, backbone_forwards["n"] = backbone_forwards["n"], 0
    assert list(results["variants"]) == ["slow", "fast"]
    assert json.loads((tmp_path / "sweep" / "config.json").read_text())["sweep"] == [
        {"name": "slow", "learning_rate": 1e-3}, {"name": "fast", "learning_rate": 1e-2, "weight_decay": 0.5}]
    alone = run(vit, shapes, tmp_path / "alone", learning_rate=1e-2, weight_decay=0.5, **settings)
    assert swept_forwards == backbone_forwards["n"]
    assert_close(tensors(tmp_path / "sweep" / "tuner" / "fast"), tensors(tmp_path / "alone" / "tuner"))
    assert_close(tensors(tmp_path / "sweep" / "tuner" / "fast-ema"), tensors(tmp_path / "alone" / "tuner-ema"))
    assert results["variants"]["fast"]["top1"] == alone["top1"]

    # A run's config.json repeats the sweep through --config (its variants are mappings there, not NAME=V1,V2 text).
    again = CliRunner().invoke(app, ["classify", "train", "--config", str(tmp_path / "sweep" / "config.json"),
                                     "--output", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert_close(tensors(tmp_path / "again" / "tuner" / "fast"), tensors(tmp_path / "sweep" / "tuner" / "fast"), 0.0)


def test_a_tuner_variant_takes_its_own_recipe_where_the_run_leaves_it_out(vit, shapes, tmp_path):
    # lora's recipe is lr 5e-3 without clipping; linear alone trains with its own, 1e-3 clipped at 1.0.
    results = run(vit, shapes, tmp_path / "sweep", tuner="lora", sweep=["tuner=linear,bypass"], max_steps=3,
                  cache_taps="yes")
    recorded = json.loads((tmp_path / "sweep" / "config.json").read_text())["sweep"]
    assert recorded[0] == {"name": "tuner=linear", "tuner": "linear", "learning_rate": 1e-3, "max_grad_norm": 1.0}
    alone = run(vit, shapes, tmp_path / "alone", tuner="linear", max_steps=3, cache_taps="yes")
    assert_close(tensors(tmp_path / "sweep" / "tuner" / "tuner=linear"), tensors(tmp_path / "alone" / "tuner"))
    assert results["variants"]["tuner=linear"]["top1"] == alone["top1"]


def test_a_resumed_sweep_ends_bit_equal_to_an_uninterrupted_one(vit, shapes, tmp_path):
    settings = dict(max_steps=4, checkpoint_every=2, keep_checkpoints=5, lr_scheduler="cosine", max_grad_norm=1e-2,
                    sweep=["learning_rate=1e-3,1e-2", "warmup_epochs=0,1"], cache_taps="yes")
    run(vit, shapes, tmp_path / "straight", **settings)
    interrupted = tmp_path / "interrupted"
    run(vit, shapes, interrupted, **settings)
    # Killed just after its step-2 checkpoint: everything later is gone.
    for path in (interrupted / "checkpoints").glob("step-00000004*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(interrupted / "tuner")
    (interrupted / "results.json").unlink()
    assert len(list((interrupted / "checkpoints" / "step-00000002-tuner").iterdir())) == 4  # each variant's tuner
    results = run(vit, shapes, interrupted, resume="latest", **settings)
    assert len(results["variants"]) == 4
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())["variants"]
    for name, row in results["variants"].items():
        a, b = tensors(tmp_path / "straight" / "tuner" / name), tensors(interrupted / "tuner" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert row["top1"] == straight[name]["top1"]
    assert [line["step"] for line in metrics(interrupted)] == [1, 2, 3, 4]


@pytest.mark.parametrize("sweep, tuner, expected", [
    (["learning_rate=1e-3,1e-2"], "res-tuning", "trains bypass tuners only (their ladders share one frozen forward), "
                                                "or linear (heads alone); tuner 'res-tuning'"),
    (["tuner=bypass,lora"], "bypass", "tuner 'lora' changes the backbone's own pass"),
    (["seed=0,1"], "bypass", "cannot vary seed"),
    (["cache_taps=yes,no"], "bypass", "cannot vary cache_taps"),
    (["random_flip=true,false"], "bypass", "cannot vary random_flip"),
    (["resolution=32,64"], "bypass", "cannot vary resolution"),
    (["validation_data=x"], "bypass", "validation_data is not a setting of this command; a sweep can vary "
                                      "learning_rate, weight_decay, adam_epsilon, max_grad_norm, lr_scheduler, "
                                      "warmup_steps, warmup_epochs,"),
    (["warmup_epochs=1.5"], "bypass", "'1.5' is not a whole number"),
    (["learning_rate=fast"], "linear", "'fast' is not a number"),
    (["learning_rate=-1"], "bypass", "--sweep variant learning_rate=-1: --learning-rate must be"),
    (["learning_rate=1e-3,1e-3"], "linear", "gives variant learning_rate=1e-3 twice"),
])
def test_bad_sweeps_get_one_line_each(vit, shapes, tmp_path, sweep, tuner, expected):
    args = ["classify", "train", "--model", vit, "--data", shapes, "--output", str(tmp_path / "run"), "--tuner", tuner]
    line = one_error_line(args + [arg for value in sweep for arg in ("--sweep", value)])
    assert expected in line, line
    assert not (tmp_path / "run").exists()


def test_a_head_that_trains_nothing_is_refused(vit, shapes, tmp_path):
    frozen = tmp_path / "frozen-head.yaml"
    frozen.write_text("train_head: false\n")
    args = ["classify", "train", "--model", vit, "--data", shapes, "--output", str(tmp_path / "run"), "--tuner",
            "bypass", "--sweep", f"tuner=linear,{frozen}"]
    assert f"tuner {str(frozen)!r} trains nothing" in one_error_line(args)
    assert not (tmp_path / "run").exists()
