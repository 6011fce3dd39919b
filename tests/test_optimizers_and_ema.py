"""`--optimizer` and `--optimizer-args` (each optimizer trains, resumes bit-equal and round-trips its state through a
checkpoint; bad input and missing packages are one line) and `--ema` (the averaged tuner beside the raw one, its
formula, resume, validation and finiteness check)."""

import io
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import one_error_line
from safetensors.torch import load_file
from typer.testing import CliRunner

from restune_sd.classify import ClassifyConfig, classify
from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic, make_synthetic_classification
from restune_sd.ema import TunerEMA
from restune_sd.errors import UserError
from restune_sd.optimizers import build_optimizer
from restune_sd.tiny import write_tiny_vit
from restune_sd.train import Encoders, TrainConfig, load_components, train
from restune_sd.validation import held_out_data, validation_loss

runner = CliRunner()
# Each optimizer's usual settings, and one of them as its checkpointed param_groups hold it: the state is its own.
CPU_OPTIMIZERS = {
    "adamw": ({"learning_rate": 1e-3, "optimizer_args": ["amsgrad=true"]}, ("amsgrad", True)),
    "prodigy": ({"learning_rate": 1.0, "optimizer_args": ["d_coef=2", "use_bias_correction=true"]}, ("d_coef", 2)),
    "adafactor": ({"learning_rate": 1e-3, "optimizer_args": ["beta1=0.9"]}, ("beta1", 0.9)),
    "lion": ({"learning_rate": 1e-4, "optimizer_args": ["betas=0.95,0.98"]}, ("betas", [0.95, 0.98])),
    "sgd": ({"learning_rate": 1e-2, "optimizer_args": ["momentum=0.9", "nesterov=true"]}, ("nesterov", True)),
}


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    return f"folder:{make_synthetic('folder', tmp_path_factory.mktemp('data') / 'folder', num_classes=2, images_per_class=2)}"


def config(tiny, data, output, **overrides) -> TrainConfig:
    return TrainConfig(model=tiny, data=data, tuner="res-tuning", output=str(output),
                       **{"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, **overrides})


def weights(folder: Path) -> dict:
    return load_file(str(folder / "tuner.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close(a: dict, b: dict) -> bool:
    """Equal up to EMAModel's float rounding: it computes s - (1 - decay) * (s - w), which at decay 0 is w in exact
    arithmetic only."""
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def cut_after_first_checkpoint(run: Path, copy: Path) -> None:
    """A copy of `run` as a kill -9 just after its step-2 checkpoint leaves it."""
    shutil.copytree(run, copy)
    for name in ("checkpoints/step-00000004.pt", "checkpoints/step-00000004.pt.sha256", "results.json"):
        (copy / name).unlink()
    for name in ("checkpoints/step-00000004-tuner", "checkpoints/step-00000004-tuner-ema", "tuner", "tuner-ema"):
        shutil.rmtree(copy / name)


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_each_optimizer_resumes_bit_equal_with_its_ema(tiny, folder_data, tmp_path, name):
    settings, (key, value) = CPU_OPTIMIZERS[name]
    settings = dict(settings, optimizer=name, max_steps=4, checkpoint_every=2, keep_checkpoints=5, ema=True,
                    ema_decay=0.5, lr_scheduler="cosine")
    straight = tmp_path / "straight"
    train(config(tiny, folder_data, straight, **settings))
    recorded = json.loads((straight / "config.json").read_text())
    assert recorded["optimizer"] == name and recorded["ema"] is True and recorded["ema_decay"] == 0.5
    state = torch.load(straight / "checkpoints" / "step-00000002.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert (list(group[key]) if isinstance(value, list) else group[key]) == value
    assert state["ema"]["optimization_step"] == 2

    resumed = tmp_path / "resumed"
    cut_after_first_checkpoint(straight, resumed)
    train(config(tiny, folder_data, resumed, resume="latest", **settings))
    assert same(weights(straight / "tuner"), weights(resumed / "tuner"))
    assert same(weights(straight / "tuner-ema"), weights(resumed / "tuner-ema"))
    assert not same(weights(straight / "tuner"), weights(straight / "tuner-ema"))
    assert same(weights(straight / "checkpoints" / "step-00000004-tuner-ema"), weights(straight / "tuner-ema"))


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_each_optimizers_state_round_trips_through_a_checkpoint_file(tiny, folder_data, name):
    cfg = config(tiny, folder_data, "unused", optimizer=name, **CPU_OPTIMIZERS[name][0])

    def stepped(optimizer, params, steps):
        for step in range(steps):
            for k, p in enumerate(params):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32) * (k + 1) + step).reshape(p.shape)
            optimizer.step()

    params = [torch.nn.Parameter(torch.ones(5, 7)), torch.nn.Parameter(torch.zeros(11))]
    optimizer = build_optimizer(params, cfg)
    stepped(optimizer, params, 2)
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reloaded = build_optimizer(copies, cfg)
    reloaded.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    stepped(optimizer, params, 2)
    stepped(reloaded, copies, 2)
    assert all(torch.equal(a, b) for a, b in zip(params, copies))


def ema_runs(tiny, data, tmp_path, **settings) -> Path:
    run = tmp_path / "run"
    train(config(tiny, data, run, ema=True, checkpoint_every=1, keep_checkpoints=5, **settings))
    return run


def test_an_ema_with_decay_zero_is_the_raw_weights(tiny, folder_data, tmp_path):
    run = ema_runs(tiny, folder_data, tmp_path, ema_decay=0.0, max_steps=3)
    raw, average = weights(run / "tuner"), weights(run / "tuner-ema")
    assert close(raw, average) and not close(raw, weights(run / "checkpoints" / "step-00000002-tuner"))


@pytest.mark.parametrize("settings, decay_at_step_2", [
    ({"ema_decay": 0.1}, 0.1),  # min(decay, (1 + 1) / (10 + 1))
    ({"ema_decay": 0.9}, 2 / 11),
    ({"ema_decay": 0.9, "ema_warmup": True, "ema_power": 1.0}, 0.5),  # min(decay, 1 - (1 + 1) ** -1)
])
def test_the_ema_follows_diffusers_formula(tiny, folder_data, tmp_path, settings, decay_at_step_2):
    run = ema_runs(tiny, folder_data, tmp_path, **settings)
    first, second = weights(run / "checkpoints" / "step-00000001-tuner"), weights(run / "tuner")
    assert close(weights(run / "checkpoints" / "step-00000001-tuner-ema"), first)  # the first step's decay is 0
    average = weights(run / "tuner-ema")
    for key in first:
        expected = decay_at_step_2 * first[key] + (1 - decay_at_step_2) * second[key]
        assert torch.allclose(average[key], expected, rtol=0, atol=1e-6), key
    assert not same(average, second)


def test_the_ema_tuner_loads_and_samples_like_any_tuner(tiny, folder_data, tmp_path):
    from diffusers import UNet2DConditionModel

    import restune_sd

    run = ema_runs(tiny, folder_data, tmp_path, ema_decay=0.5, max_steps=3)
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    restune_sd.load_tuner(unet, run / "tuner-ema")
    loaded = dict(unet.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in weights(run / "tuner-ema").items())
    result = runner.invoke(app, ["sample", "--model", tiny, "--tuner", str(run / "tuner-ema"), "--prompt", "a cat",
                                 "--steps", "2", "--out", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples" / "00000.png").is_file()


def test_validation_ema_validates_the_averaged_weights_and_leaves_training_alone(tiny, folder_data, tmp_path):
    settings = dict(max_steps=3, ema=True, ema_decay=0.5, validation_data=folder_data, validation_samples=2)
    train(config(tiny, folder_data, tmp_path / "raw", **settings))
    train(config(tiny, folder_data, tmp_path / "ema", validation_ema=True, **settings))
    for folder in ("tuner", "tuner-ema"):
        assert same(weights(tmp_path / "raw" / folder), weights(tmp_path / "ema" / folder))
    losses = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["validation_loss"]
              for name in ("raw", "ema")}
    resolution = json.loads((tmp_path / "ema" / "config.json").read_text())["resolution"]
    cfg = config(tiny, folder_data, "unused", resolution=resolution, validation_ema=True, **settings)
    comps = load_components(tiny, torch.device("cpu"), torch.float32)
    from restune_sd.io import load_tuner

    load_tuner(comps.unet, tmp_path / "ema" / "tuner-ema")
    held_out = held_out_data(cfg, cfg.resolution)
    expected = validation_loss(comps.unet.eval(), Encoders(comps, torch.float32), held_out, cfg, "cpu")
    assert losses["ema"] == pytest.approx(expected, rel=1e-5) and losses["ema"] != losses["raw"]


def test_non_finite_ema_weights_are_never_saved(tiny, folder_data, tmp_path, monkeypatch):
    real_step = TunerEMA.step

    def poisoned(self):
        real_step(self)
        if self.average.optimization_step == 2:
            self.average.shadow_params[0].fill_(float("nan"))

    monkeypatch.setattr(TunerEMA, "step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(UserError, match="diverged by step 2") as error:
        train(config(tiny, folder_data, run, max_steps=3, ema=True, checkpoint_every=1))
    assert "step-00000001.pt" in str(error.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.endswith(".sha256")) == [
        "step-00000001-tuner", "step-00000001-tuner-ema", "step-00000001.pt"]
    assert not (run / "tuner").exists() and not (run / "tuner-ema").exists()


def test_the_settings_are_refused_on_resume_and_repeated_from_config_json(tiny, folder_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--model", tiny, "--data", folder_data, "--batch-size", "2", "--learning-rate", "1.0",
            "--optimizer", "prodigy", "--optimizer-args", "d_coef=2 safeguard_warmup=true", "--optimizer-args",
            "betas=0.9,0.99", "--ema", "--ema-decay", "0.9"]
    result = runner.invoke(app, [*args, "--output", str(run), "--max-steps", "2", "--checkpoint-every", "2"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["optimizer_args"] == {"d_coef": 2, "safeguard_warmup": True, "betas": [0.9, 0.99]}
    resume = ["train", "--model", tiny, "--data", folder_data, "--output", str(run), "--max-steps", "4", "--resume", "latest"]
    assert "optimizer='prodigy', not 'lion'" in one_error_line([*resume, "--optimizer", "lion"])
    assert "optimizer_args=" in one_error_line([*resume, "--optimizer", "prodigy", "--optimizer-args", "d_coef=3"])
    assert "ema_decay=0.9, not 0.5" in one_error_line([*resume, "--ema", "--ema-decay", "0.5"])
    again = tmp_path / "again"
    result = runner.invoke(app, ["train", "--config", str(run / "config.json"), "--output", str(again)])
    assert result.exit_code == 0, result.output
    assert same(weights(run / "tuner"), weights(again / "tuner"))
    assert same(weights(run / "tuner-ema"), weights(again / "tuner-ema"))


def test_a_yaml_config_gives_the_optimizer_args_as_a_mapping(tiny, folder_data, tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("optimizer: prodigy\nlearning-rate: 1.0\nmax-steps: 1\n"
                        "optimizer_args: {d0: 1e-6, d_coef: 2, betas: [0.9, 0.99]}\n")  # PyYAML reads 1e-6 as a string
    result = runner.invoke(app, ["train", "--config", str(settings), "--model", tiny, "--data", folder_data,
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["optimizer_args"]
    assert recorded == {"d0": 1e-6, "d_coef": 2, "betas": [0.9, 0.99]}


def test_classify_train_takes_the_optimizer_and_the_ema(tmp_path):
    vit = write_tiny_vit(tmp_path / "vit")
    root = make_synthetic_classification("classfolder", tmp_path / "data", num_classes=3, images_per_class=4, size=32)
    cfg = ClassifyConfig(model=str(vit), data=f"classfolder:{root}", output=str(tmp_path / "run"), tuner="bypass",
                         max_steps=2, batch_size=4, warmup_epochs=0, eval_batch_size=8, optimizer="prodigy", ema=True)
    assert cfg.learning_rate == 1.0  # Prodigy's own recipe, not the preset's AdamW rate
    results = classify(cfg)
    assert results["ema_tuner_dir"] == str(tmp_path / "run" / "tuner-ema")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optimizer"] == "prodigy"
    assert weights(tmp_path / "run" / "tuner-ema").keys() == weights(tmp_path / "run" / "tuner").keys()


def test_a_vtab_task_run_before_the_optimizer_setting_is_reused_only_for_adamw(tmp_path):
    from restune_sd.vtab import difference, sweep_settings

    def wanted(**overrides):
        return sweep_settings(ClassifyConfig(model="vit-b16", data="vtab:", output=str(tmp_path), **overrides))

    older = {k: v for k, v in wanted().items() if not k.startswith(("optimizer", "ema"))}
    assert difference(older, wanted()) is None
    assert difference(older, wanted(optimizer="lion")) == "it records no optimizer"


@pytest.mark.parametrize("flags, expected", [
    (["--optimizer", "adam"], "unknown --optimizer 'adam': use one of adamw, adamw8bit, prodigy, adafactor, lion, sgd"),
    (["--optimizer", "prodigy", "--optimizer-args", "d_coeff=2"], "prodigy takes beta3, betas, d0, d_coef, decouple"),
    (["--optimizer-args", "lr=1"], "--optimizer-args lr: set it with --learning-rate"),
    (["--optimizer", "sgd", "--optimizer-args", "momentum=high"], "momentum=high: the value must be a number"),
    (["--optimizer", "sgd", "--optimizer-args", "nesterov=true"], "nesterov=true needs momentum > 0"),
    (["--optimizer", "lion", "--optimizer-args", "betas=0.9"], "betas must be two numbers"),
    (["--optimizer", "adafactor", "--optimizer-args", "relative_step=true"], "relative_step=false"),
    (["--ema-decay", "0.99"], "--ema-decay sets up the EMA of the weights: add --ema"),
    (["--ema", "--ema-decay", "1"], "--ema-decay must be below 1"),
    (["--ema", "--ema-decay=-0.1"], "--ema-decay must be >= 0 and <= 1"),
    (["--ema", "--ema-power", "0.75"], "--ema-power shapes the decay's warm-up ramp: add --ema-warmup"),
    (["--validation-ema"], "--validation-ema validates with the EMA weights: add --ema"),
])
def test_bad_optimizer_and_ema_settings_are_one_line(tiny, folder_data, tmp_path, flags, expected):
    run = tmp_path / "run"
    assert expected in one_error_line(["train", "--model", tiny, "--data", folder_data, "--output", str(run), *flags])
    assert not run.exists()


def test_prodigy_at_an_adamw_learning_rate_is_warned_about(tiny, folder_data, tmp_path):
    result = runner.invoke(app, ["train", "--model", tiny, "--data", folder_data, "--output", str(tmp_path / "run"),
                                 "--max-steps", "1", "--optimizer", "prodigy", "--learning-rate", "1e-4"])
    assert result.exit_code == 0, result.output
    assert "--learning-rate 0.0001 makes its steps 0.0001 times those it estimates" in result.stderr
    assert json.loads(result.stdout)["steps"] == 1  # Prodigy's own note went to stderr, not into the results


def test_a_missing_optimizer_package_names_what_to_install(tiny, folder_data, tmp_path, monkeypatch):
    base = ["train", "--model", tiny, "--data", folder_data, "--output", str(tmp_path / "run")]
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # an import of it fails, as where it is not installed
    assert "pip install prodigyopt" in one_error_line([*base, "--optimizer", "prodigy", "--learning-rate", "1"])
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    assert "pip install lion-pytorch" in one_error_line([*base, "--optimizer", "lion"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    assert "pip install bitsandbytes" in one_error_line([*base, "--optimizer", "adamw8bit"])
    assert not (tmp_path / "run").exists()


def test_8bit_adamw_where_bitsandbytes_cannot_run_it_is_one_line(tiny, folder_data, tmp_path, monkeypatch):
    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, min_8bit_size=4096, **settings):
            super().__init__(params, **settings)

        def step(self, closure=None):
            raise RuntimeError("no kernel for 8-bit optimizers on this device\nlong library trace")

    fake = types.ModuleType("bitsandbytes")
    fake.__version__, fake.optim = "0.42.0", types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake.optim)
    message = one_error_line(["train", "--model", tiny, "--data", folder_data, "--output", str(tmp_path / "run"),
                              "--optimizer", "adamw8bit"])
    assert message == ("error: --optimizer adamw8bit: bitsandbytes 0.42.0 cannot run 8-bit AdamW on this machine's cpu "
                       "(no kernel for 8-bit optimizers on this device); use --optimizer adamw, or a CUDA GPU")
    assert not (tmp_path / "run").exists()
