"""`restune-sd train --sweep`: K bypass variants on one frozen forward, each equal to the same settings trained alone,
resumed exactly, and each bad input refused in one line."""

import json
import shutil

import pytest
import torch
from conftest import launched_in_two_processes, one_error_line, tiny_unet, unet_inputs
from safetensors.torch import load_file

import restune_sd.train as training
from restune_sd.datasets import make_synthetic
from restune_sd.io import load_tuner
from restune_sd.train import TrainConfig, train

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    return f"folder:{make_synthetic('folder', tmp_path_factory.mktemp('data') / 'folder', num_classes=2, images_per_class=4)}"


@pytest.fixture(scope="module")
def paper_form(tmp_path_factory):
    """A bypass of the paper's form with its own bottleneck width: another ladder than the preset's."""
    path = tmp_path_factory.mktemp("tuners") / "paper.yaml"
    path.write_text("bypass:\n  form: paper\n  bottleneck: 8\n  groups: 2\n")
    return str(path)


def config(tiny, data, output, **overrides):
    return TrainConfig(model=tiny, data=data, output=str(output), report_to="none",
                       **{"tuner": "bypass", "max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, **overrides})


def tensors(folder) -> dict:
    return load_file(str(folder / "tuner.safetensors"))


def assert_close(a: dict, b: dict, tolerance: float = TOLERANCE) -> None:
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tolerance, worst


@pytest.fixture
def frozen_forwards(monkeypatch):
    """Counts the forwards of the frozen UNet's mid block in every run train() loads."""
    calls = {"n": 0}
    load = training.load_components

    def counting(*args, **kwargs):
        comps = load(*args, **kwargs)
        comps.unet.mid_block.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        return comps

    monkeypatch.setattr(training, "load_components", counting)
    return calls


def test_each_learning_rate_variant_equals_its_run_alone_on_one_frozen_forward(tiny, folder_data, tmp_path,
                                                                              frozen_forwards):
    # max_grad_norm 1e-3 clips every step: a norm shared by the variants would give other weights than alone.
    settings = dict(max_grad_norm=1e-3, lr_scheduler="cosine", warmup_steps=1)
    results = train(config(tiny, folder_data, tmp_path / "sweep", sweep=["learning_rate=1e-3,3e-3,1e-2"], **settings))
    swept_forwards = frozen_forwards["n"]
    frozen_forwards["n"] = 0
    train(config(tiny, folder_data, tmp_path / "alone", learning_rate=3e-3, **settings))
    assert swept_forwards == frozen_forwards["n"] == 3 + 1  # one per step, and the final weights check's one

    names = ["learning_rate=1e-3", "learning_rate=3e-3", "learning_rate=1e-2"]
    assert list(results["variants"]) == names
    alone = tensors(tmp_path / "alone" / "tuner")
    assert_close(tensors(tmp_path / "sweep" / "tuner" / "learning_rate=3e-3"), alone)
    # The variants did train apart: another learning rate gives other weights.
    other = tensors(tmp_path / "sweep" / "tuner" / "learning_rate=1e-2")
    assert max((other[k] - alone[k]).abs().max().item() for k in alone) > 100 * TOLERANCE

    metrics = [json.loads(line) for line in (tmp_path / "sweep" / "metrics.jsonl").read_text().splitlines()]
    alone_metrics = [json.loads(line) for line in (tmp_path / "alone" / "metrics.jsonl").read_text().splitlines()]
    for mine, theirs in zip(metrics, alone_metrics):
        assert mine["loss/learning_rate=3e-3"] == pytest.approx(theirs["loss"], abs=TOLERANCE)
        assert mine["lr/learning_rate=3e-3"] == pytest.approx(theirs["lr"], rel=1e-12)
    assert results["variants"]["learning_rate=3e-3"]["final_loss"] == metrics[-1]["loss/learning_rate=3e-3"]
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert all(f"| {name}" in table for name in names) and table.count("(lowest)") == 1


def test_tuner_variants_grid_with_another_setting_equal_their_runs_alone(tiny, folder_data, tmp_path, paper_form):
    results = train(config(tiny, folder_data, tmp_path / "sweep", sweep=[f"tuner=bypass,{paper_form}",
                                                                         "weight_decay=0,0.5"], learning_rate=1e-2))
    assert list(results["variants"]) == ["tuner=bypass_weight_decay=0", "tuner=bypass_weight_decay=0.5",
                                         "tuner=paper_weight_decay=0", "tuner=paper_weight_decay=0.5"]
    train(config(tiny, folder_data, tmp_path / "alone", tuner=paper_form, weight_decay=0.5, learning_rate=1e-2))
    swept = tmp_path / "sweep" / "tuner" / "tuner=paper_weight_decay=0.5"
    assert_close(tensors(swept), tensors(tmp_path / "alone" / "tuner"))

    # The variant's folder is a tuner as any other: load_tuner attaches it to a fresh UNet, as trained alone.
    config_alone = json.loads((tmp_path / "alone" / "tuner" / "tuner_config.json").read_text())
    assert json.loads((swept / "tuner_config.json").read_text())["tuning"] == config_alone["tuning"]
    inputs = unet_inputs()
    with torch.no_grad():
        ours = load_tuner(tiny_unet(), swept)(*inputs).sample
        theirs = load_tuner(tiny_unet(), tmp_path / "alone" / "tuner")(*inputs).sample
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_a_sweep_file_lists_the_variants_by_name(tiny, folder_data, tmp_path, paper_form):
    sweep_file = tmp_path / "variants.yaml"
    sweep_file.write_text(f"- {{name: slow, learning_rate: 1e-4}}\n- {{name: paper, tuner: {paper_form}, "
                          "max_grad_norm: 0}\n")
    results = train(config(tiny, folder_data, tmp_path / "sweep", sweep=[str(sweep_file)], max_steps=2))
    assert list(results["variants"]) == ["slow", "paper"]
    recorded = json.loads((tmp_path / "sweep" / "config.json").read_text())["sweep"]
    assert recorded == [{"name": "slow", "learning_rate": 1e-4}, {"name": "paper", "tuner": paper_form, "max_grad_norm": 0.0}]
    train(config(tiny, folder_data, tmp_path / "alone", tuner=paper_form, max_grad_norm=0.0, max_steps=2))
    assert_close(tensors(tmp_path / "sweep" / "tuner" / "paper"), tensors(tmp_path / "alone" / "tuner"))


def test_a_resumed_sweep_ends_bit_equal_to_an_uninterrupted_one(tiny, folder_data, tmp_path):
    settings = dict(max_steps=4, checkpoint_every=2, keep_checkpoints=5, lr_scheduler="cosine", max_grad_norm=1e-3,
                    sweep=["learning_rate=1e-3,1e-2", "warmup_steps=0,2"])
    train(config(tiny, folder_data, tmp_path / "straight", **settings))
    interrupted = tmp_path / "interrupted"
    train(config(tiny, folder_data, interrupted, **settings))
    # Killed just after its step-2 checkpoint: everything later is gone.
    for path in (interrupted / "checkpoints").glob("step-00000004*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(interrupted / "tuner")
    (interrupted / "results.json").unlink()
    assert len(list((interrupted / "checkpoints" / "step-00000002-tuner").iterdir())) == 4  # each variant's tuner
    results = train(TrainConfig(model=tiny, data=folder_data, tuner="bypass", output=str(interrupted), resume="latest",
                                report_to="none"))
    assert len(results["variants"]) == 4
    for name in results["variants"]:
        a, b = tensors(tmp_path / "straight" / "tuner" / name), tensors(interrupted / "tuner" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    lines = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(f"loss/{name}" in line for line in lines for name in results["variants"])


@pytest.mark.parametrize("sweep, tuner, expected", [
    (["color=1,2"], "bypass", "color is not a setting of this command"),
    (["seed=0,1"], "bypass", "cannot vary seed: it draws every step's noise, timesteps and data order"),
    (["resolution=64,128"], "bypass", "cannot vary resolution"),
    (["batch_size=1,2"], "bypass", "cannot vary batch_size"),
    (["learning_rate="], "bypass", "lists an empty value"),
    (["learning_rate=1e-4,,1e-3"], "bypass", "lists an empty value"),
    (["learning_rate"], "bypass", "write NAME=V1,V2,..."),
    (["learning_rate=1e-4", "learning_rate=1e-3"], "bypass", "names learning_rate twice"),
    (["learning_rate=1e-4,1e-4"], "bypass", "gives variant learning_rate=1e-4 twice"),
    (["learning_rate=fast"], "bypass", "'fast' is not a number"),
    (["learning_rate=-1"], "bypass", "--sweep variant learning_rate=-1: --learning-rate must be"),
    (["warmup_steps=1.5"], "bypass", "'1.5' is not a whole number"),
    (["learning_rate=1e-4,1e-3"], "res-tuning", "trains bypass tuners only"),
    (["tuner=bypass,lora"], "bypass", "tuner 'lora' changes the backbone's own pass"),
])
def test_bad_sweeps_get_one_line_each(tiny, folder_data, tmp_path, sweep, tuner, expected):
    args = ["train", "--model", tiny, "--data", folder_data, "--output", str(tmp_path / "run"), "--tuner", tuner]
    line = one_error_line(args + [arg for value in sweep for arg in ("--sweep", value)])
    assert expected in line, line
    assert not (tmp_path / "run").exists()


def test_bad_sweep_files_and_companions_get_one_line_each(tiny, folder_data, tmp_path):
    args = ["train", "--model", tiny, "--data", folder_data, "--output", str(tmp_path / "run"), "--tuner", "bypass"]
    (tmp_path / "mapping.yaml").write_text("learning_rate: 1e-4\n")
    (tmp_path / "empty.yaml").write_text("[]\n")
    (tmp_path / "nothing.yaml").write_text("- {name: a}\n")
    (tmp_path / "ema-clash.yaml").write_text("- {name: a, learning_rate: 1e-4}\n- {name: a-ema, learning_rate: 1e-3}\n")
    assert "holds a dict, not a list" in one_error_line(args + ["--sweep", str(tmp_path / "mapping.yaml")])
    assert "must list one or more mappings" in one_error_line(args + ["--sweep", str(tmp_path / "empty.yaml")])
    assert "changes no setting" in one_error_line(args + ["--sweep", str(tmp_path / "nothing.yaml")])
    assert "would share the folder a-ema" in one_error_line(args + ["--sweep", str(tmp_path / "ema-clash.yaml")])
    assert "give it alone" in one_error_line(args + ["--sweep", str(tmp_path / "mapping.yaml"), "--sweep",
                                                     "learning_rate=1e-4"])
    assert "does not combine with --validation-prompt" in one_error_line(
        args + ["--sweep", "learning_rate=1e-4,1e-3", "--validation-prompt", "a cat"])
    assert not (tmp_path / "run").exists()


def kept_for_backward(step) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What `step` returns, and the tensors autograd saved for backward while it ran."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = step()
    return out, kept


def test_k_ladders_keep_only_the_taps_for_backward_and_give_the_plain_forwards_gradients():
    from restune_sd.config import preset
    from restune_sd.inject import attach
    from restune_sd.sweep import attach_ladders

    model, tuning = tiny_unet(), preset("bypass", "unet")
    attach(model, tuning)
    ladders = attach_ladders(model, [tuning] * 3, seed=0)
    taps = []
    ladders.register_forward_pre_hook(lambda _, args: taps.append(args))
    model(*unet_inputs())
    root, stems = taps[0]
    shared = {t.untyped_storage().data_ptr() for t in [root, *stems]}

    def gradients(step) -> tuple[list[torch.Tensor], int]:
        ladders.zero_grad(set_to_none=True)
        out, kept = kept_for_backward(step)
        out.square().sum().backward()
        own = sum(t.numel() * t.element_size() for t in kept if t.untyped_storage().data_ptr() not in shared)
        return [p.grad.clone() for p in ladders.parameters()], own

    plain, plain_own = gradients(lambda: torch.cat([ladder(root, stems) for ladder in ladders.ladders]))
    ours, ours_own = gradients(lambda: ladders(root, stems))
    # The plain forward keeps each ladder's activations; ours keeps only the taps and runs each ladder again in its
    # own backward, one ladder's activations alive at a time.
    assert plain_own > 0 and ours_own == 0, (plain_own, ours_own)
    assert all(torch.equal(a, b) for a, b in zip(plain, ours, strict=True))


def test_a_sweep_in_two_processes_equals_one_process_with_the_combined_batch(tiny, folder_data, tmp_path):
    # Each ladder recomputed in its own backward (checkpointing) under DDP's gradient all-reduce.
    args = ["train", "--model", tiny, "--data", folder_data, "--tuner", "bypass", "--max-steps", "3",
            "--learning-rate", "1e-3", "--report-to", "none", "--sweep", "learning_rate=1e-3,3e-3"]
    first = launched_in_two_processes(args, tmp_path / "two", batch_size=1, tuner="tuner/learning_rate=1e-3")
    train(config(tiny, folder_data, tmp_path / "one", sweep=["learning_rate=1e-3,3e-3"], batch_size=2))
    assert_close(first, tensors(tmp_path / "one" / "tuner" / "learning_rate=1e-3"))
    assert_close(tensors(tmp_path / "two" / "tuner" / "learning_rate=3e-3"),
                 tensors(tmp_path / "one" / "tuner" / "learning_rate=3e-3"))


def test_bench_sd_sweep_measures_one_variant_against_k_in_processes_of_their_own(tiny, tmp_path):
    from typer.testing import CliRunner

    from restune_sd.cli.main import app

    output = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "sd", "--sweep", "3", "--model", tiny, "--resolution", "64",
                                      "--steps", "2", "--output", str(output)])
    assert result.exit_code == 0, result.output
    figures = json.loads((output / "results.json").read_text())
    one, three = figures["rows"]
    assert (one["variants"], three["variants"]) == (1, 3) and "error" not in one and "error" not in three
    assert three["trainable_params"] == 3 * one["trainable_params"] > 0
    assert figures["ratios"]["step_seconds"] == three["step_seconds"] / one["step_seconds"]
    assert figures["environment"]["command"].startswith(f"restune-sd bench sd --sweep 3 --output {output} --model ")
    assert "meets the targets" in (output / "results.md").read_text()
    assert "--sweep must be a number of variants from 2" in one_error_line(
        ["bench", "sd", "--sweep", "1", "--model", tiny, "--output", str(tmp_path / "other")])
    assert "use `bench sd --sweep K`" in one_error_line(["bench", "vit", "--sweep", "4", "--output", str(tmp_path / "o")])


def test_each_variant_keeps_its_own_ema_as_trained_alone(tiny, folder_data, tmp_path):
    settings = dict(ema=True, ema_decay=0.5, max_steps=2)
    train(config(tiny, folder_data, tmp_path / "sweep", sweep=["learning_rate=1e-3,1e-2"], **settings))
    train(config(tiny, folder_data, tmp_path / "alone", learning_rate=1e-2, **settings))
    assert_close(tensors(tmp_path / "sweep" / "tuner" / "learning_rate=1e-2-ema"), tensors(tmp_path / "alone" / "tuner-ema"))
    assert_close(tensors(tmp_path / "sweep" / "tuner" / "learning_rate=1e-2"), tensors(tmp_path / "alone" / "tuner"))
