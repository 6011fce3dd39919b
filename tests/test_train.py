"""`restune-sd train` on the tiny model and tiny generated data sets: every tuner, every layout, resume,
two processes, and each bad input's one-line message."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import launched_in_two_processes, one_error_line, poison_weights_after, reseal
from safetensors.torch import load_file
from typer.testing import CliRunner

import restune_sd.train as training
from restune_sd.cli.main import app
from restune_sd.datasets import build_dataset, make_synthetic
from restune_sd.errors import UserError
from restune_sd.runconfig import LR_SCHEDULES, lr_schedule
from restune_sd.streams import SampleStream
from restune_sd.train import Encoders, TrainConfig, diffusion_loss, load_components, train

runner = CliRunner()


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    return f"folder:{make_synthetic('folder', tmp_path_factory.mktemp('data') / 'folder', num_classes=2, images_per_class=4)}"


def config(tiny, data, output, **overrides):
    return TrainConfig(model=tiny, data=data, tuner=overrides.pop("tuner", "res-tuning"), output=str(output),
                       **{"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, **overrides})


@pytest.fixture
def spy_components(monkeypatch):
    """Keeps the components train() loaded, so a test can inspect the frozen UNet afterwards."""
    seen = []

    def spying(*args, **kwargs):
        seen.append(load_components_original(*args, **kwargs))
        return seen[-1]

    load_components_original = training.load_components
    monkeypatch.setattr(training, "load_components", spying)
    return seen


@pytest.mark.parametrize("tuner", ["res-tuning", "bypass", "adapter", "prefix", "prompt", "lora", "full"])
def test_every_tuner_trains_and_frozen_weights_stay_bit_identical(tiny, folder_data, tmp_path, tuner, spy_components):
    results = train(config(tiny, folder_data, tmp_path / "run", tuner=tuner))
    assert results["steps"] == 2 and results["tuner_params"] > 0
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "loss.png", "results.json", "tuner/tuner_config.json", "tuner/tuner.safetensors"):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert set(metrics[0]) == {"step", "loss", "lr", "seconds_per_step", "peak_memory_mb"}

    original = load_file(str(Path(tiny) / "unet" / "diffusion_pytorch_model.safetensors"))
    unet = spy_components[-1].unet
    trained = set(unet.restune.param_names)
    params = dict(unet.named_parameters())
    frozen = [n for n in params if n not in trained and "lora_" not in n]
    changed = [n for n in frozen if not torch.equal(params[n].detach(), original[n.replace(".base_layer", "")])]
    assert changed == []
    if tuner == "full":
        assert any(not torch.equal(params[n].detach(), original[n]) for n in trained)


@pytest.mark.parametrize("layout", ["coco", "cub", "flowers102", "cars", "aircraft", "food101", "classfolder", "folder"])
def test_each_data_layout_trains(tiny, tmp_path, layout):
    root = make_synthetic(layout, tmp_path / layout, num_classes=2, images_per_class=2)
    results = train(config(tiny, f"{layout}:{root}", tmp_path / "run", max_steps=1))
    assert results["steps"] == 1 and results["final_loss"] > 0


def fixed_draw_loss(tiny, data, tuner=None) -> float:
    """The loss on 8 images x 4 fixed noise/timestep draws: the same numbers before and after training."""
    from restune_sd.io import load_tuner

    comps = load_components(tiny, torch.device("cpu"), torch.float32)
    if tuner:
        load_tuner(comps.unet, tuner)
    stream = SampleStream(build_dataset(data, resolution=64), seed=0)
    batch = torch.utils.data.default_collate([stream[p] for p in range(8)])
    cfg = config(tiny, data, "unused")
    with torch.no_grad():
        return sum(diffusion_loss(comps.unet, Encoders(comps, torch.float32), batch, cfg, 10_000 + k, "cpu").item()
                   for k in range(4)) / 4


def test_overfitting_a_tiny_set_lowers_the_loss(tiny, folder_data, tmp_path):
    train(config(tiny, folder_data, tmp_path / "run", max_steps=40, batch_size=4, learning_rate=3e-3))
    before, after = fixed_draw_loss(tiny, folder_data), fixed_draw_loss(tiny, folder_data, tmp_path / "run")
    assert after < 0.9 * before, (before, after)


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tiny, folder_data, tmp_path):
    settings = dict(max_steps=6, lr_scheduler="cosine", warmup_steps=2, checkpoint_every=3, keep_checkpoints=5)
    train(config(tiny, folder_data, tmp_path / "straight", **settings))

    interrupted = tmp_path / "interrupted"
    train(config(tiny, folder_data, interrupted, **settings))
    # A run killed just after its step-3 checkpoint: everything later is gone.
    (interrupted / "checkpoints" / "step-00000006.pt").unlink()
    for name in ("tuner", "results.json"):
        shutil.rmtree(interrupted / name) if (interrupted / name).is_dir() else (interrupted / name).unlink()
    train(config(tiny, folder_data, interrupted, resume="latest", **settings))

    a = load_file(str(tmp_path / "straight" / "tuner" / "tuner.safetensors"))
    b = load_file(str(interrupted / "tuner" / "tuner.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoints_keep_the_last_k(tiny, folder_data, tmp_path):
    train(config(tiny, folder_data, tmp_path / "run", max_steps=5, checkpoint_every=1, keep_checkpoints=2))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-00000004-tuner", "step-00000004.pt", "step-00000004.pt.sha256", "step-00000005-tuner", "step-00000005.pt",
        "step-00000005.pt.sha256"]


def test_two_processes_match_one_process_with_the_combined_batch(tiny, folder_data, tmp_path):
    args = ["train", "--model", tiny, "--data", folder_data, "--tuner", "res-tuning", "--max-steps", "3", "--learning-rate", "1e-3"]
    a = launched_in_two_processes(args, tmp_path / "two", batch_size=2)
    train(config(tiny, folder_data, tmp_path / "one", max_steps=3, batch_size=4))
    b = load_file(str(tmp_path / "one" / "tuner" / "tuner.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


def test_a_loss_that_explodes_stops_the_run_and_keeps_the_checkpoint(tiny, folder_data, tmp_path, monkeypatch):
    poison_weights_after(monkeypatch, 3, lambda p: torch.full_like(p, float("nan")))  # step 4's loss is NaN
    result = runner.invoke(app, ["train", "--model", tiny, "--data", folder_data, "--output", str(tmp_path / "run"),
                                 "--tuner", "full", "--max-steps", "20", "--checkpoint-every", "2", "--keep-checkpoints", "1"])
    assert result.exit_code == 2, result.output
    assert "loss became nan at step 4" in result.stderr and "step-00000002.pt" in result.stderr
    assert not (tmp_path / "run" / "tuner").exists()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*.pt")] == ["step-00000002.pt"]


def test_a_resumed_run_that_explodes_names_the_checkpoint_it_resumed_from(tiny, folder_data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny, folder_data, run, checkpoint_every=2))
    checkpoint = run / "checkpoints" / "step-00000002.pt"
    state = torch.load(checkpoint, weights_only=False)
    state["tuner"] = {k: torch.full_like(v, float("inf")) for k, v in state["tuner"].items()}
    torch.save(state, checkpoint)
    reseal(checkpoint)
    result = runner.invoke(app, ["train", "--model", tiny, "--data", folder_data, "--output", str(run), "--batch-size", "2",
                                 "--learning-rate", "1e-3", "--max-steps", "4", "--resume", "latest"])
    assert result.exit_code == 2, result.output
    assert "loss became" in result.stderr and "step-00000002.pt" in result.stderr


def test_resume_refuses_settings_the_checkpoint_would_override(tiny, folder_data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny, folder_data, run, checkpoint_every=2))
    message = one_error_line(["train", "--model", tiny, "--data", folder_data, "--output", str(run), "--batch-size", "2",
                              "--learning-rate", "5e-4", "--max-steps", "4", "--resume", "latest"])
    assert "learning_rate=0.001" in message


def test_bad_inputs_get_one_line_each(tiny, folder_data, tmp_path):
    base = ["train", "--model", tiny, "--max-steps", "1"]
    coco = make_synthetic("coco", tmp_path / "coco", num_classes=1, images_per_class=2)
    (coco / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": "not a list"}))
    classes = make_synthetic("classfolder", tmp_path / "classes", num_classes=2, images_per_class=2)
    (classes / "empty_class").mkdir()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "results.json").write_text("{}")

    assert "does not exist" in one_error_line([*base, "--data", f"folder:{tmp_path / 'nowhere'}", "--output", str(tmp_path / "a")])
    assert "captions_train2017.json" in one_error_line([*base, "--data", f"coco:{coco}", "--output", str(tmp_path / "b")])
    assert "empty_class" in one_error_line([*base, "--data", f"classfolder:{classes}", "--output", str(tmp_path / "c")])
    assert "unknown tuner 'magic'" in one_error_line([*base, "--data", folder_data, "--tuner", "magic", "--output", str(tmp_path / "d")])
    assert "already holds files" in one_error_line([*base, "--data", folder_data, "--output", str(taken)])
    assert (taken / "results.json").read_text() == "{}" and len(list(taken.iterdir())) == 1
    model_args = ["train", "--model", str(classes), "--data", folder_data, "--output", str(tmp_path / "e")]
    assert "not a diffusers Stable Diffusion pipeline" in one_error_line(model_args)
    assert "holds no checkpoint" in one_error_line([*base, "--data", folder_data, "--output", str(tmp_path / "f"), "--resume", "latest"])


def test_corrupt_images_are_skipped_and_counted(tiny, tmp_path):
    root = make_synthetic("folder", tmp_path / "data", num_classes=2, images_per_class=3, corrupt=2)
    result = runner.invoke(app, ["train", "--model", tiny, "--data", f"folder:{root}", "--output", str(tmp_path / "run"),
                                 "--max-steps", "3", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "skipped 2 corrupt images" in result.output + result.stderr


def counting_encodes(monkeypatch) -> dict:
    """Counts the VAE calls: latent_moments calls that find a latent missing from the cache."""
    calls = {"vae": 0}
    original = Encoders.latent_moments

    def counting(self, pixels, keys, device):
        if self.latents is None or any(self.latents.get(key) is None for key in keys):
            calls["vae"] += 1
        return original(self, pixels, keys, device)

    monkeypatch.setattr(Encoders, "latent_moments", counting)
    return calls


def test_cached_and_ahead_encoded_latents_give_the_same_run(tiny, folder_data, tmp_path, monkeypatch):
    train(config(tiny, folder_data, tmp_path / "plain", max_steps=6, encode_ahead="no"))
    calls = counting_encodes(monkeypatch)
    train(config(tiny, folder_data, tmp_path / "cached", max_steps=6, cache=True, encode_ahead="no", cache_dir="none"))
    assert calls["vae"] == 4  # 8 images in batches of 2: after the first pass every latent comes from the cache
    calls["vae"] = 0
    results = train(config(tiny, folder_data, tmp_path / "ahead", max_steps=6, cache_dir="none"))  # 12 >= 8 images: auto
    assert calls["vae"] == 1  # one chunk of 8 before training, none during it
    assert json.loads((tmp_path / "ahead" / "config.json").read_text())["encode_ahead"] == "yes"
    tuners = [load_file(str(tmp_path / run / "tuner" / "tuner.safetensors")) for run in ("plain", "cached", "ahead")]
    assert all(torch.equal(tuners[0][k], other[k]) for other in tuners[1:] for k in tuners[0])  # each image encoded alone
    assert len(list((tmp_path / "cached" / "cache" / "latents").glob("*.safetensors"))) == 8
    assert len(list((tmp_path / "cached" / "cache" / "texts").glob("*.safetensors"))) >= 2
    assert len(list((tmp_path / "ahead" / "cache" / "latents").glob("*.safetensors"))) == 8
    assert results["steps"] == 6


def test_encode_ahead_auto_declines_a_run_shorter_than_the_data_and_a_damaged_latent_is_recomputed(
        tiny, folder_data, tmp_path, monkeypatch):
    train(config(tiny, folder_data, tmp_path / "short", max_steps=1))  # 2 samples of 8 images: encoding all costs more
    assert json.loads((tmp_path / "short" / "config.json").read_text())["encode_ahead"] == "no"
    assert not (tmp_path / "short" / "cache").exists()
    train(config(tiny, folder_data, tmp_path / "run", max_steps=4, checkpoint_every=2, encode_ahead="yes", cache_dir="none"))
    latents = sorted((tmp_path / "run" / "cache" / "latents").glob("*.safetensors"))
    latents[0].write_bytes(b"not a safetensors file")
    calls = counting_encodes(monkeypatch)
    train(config(tiny, folder_data, tmp_path / "run", max_steps=6, checkpoint_every=2, encode_ahead="yes",
                 resume="latest"))
    assert calls["vae"] == 1  # the damaged latent alone was encoded again
    assert load_file(str(latents[0])).keys() == {"mean", "std"}


OPTIONS = {
    "v-prediction, Min-SNR, noise offset": dict(prediction_type="v_prediction", snr_gamma=5.0, noise_offset=0.05),
    "gradient accumulation": dict(gradient_accumulation=2, batch_size=1),
    "bf16 autocast": dict(mixed_precision="bf16"),
    "gradient checkpointing": dict(gradient_checkpointing=True),
    "cosine with warm-up and validation images": dict(lr_scheduler="cosine", warmup_steps=1, max_steps=3,
                                                      validation_prompts="a red circle", validation_every=3, validation_steps=2),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_training_options(tiny, folder_data, tmp_path, name):
    results = train(config(tiny, folder_data, tmp_path / "run", **OPTIONS[name]))
    assert results["final_loss"] > 0
    saved = load_file(str(tmp_path / "run" / "tuner" / "tuner.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())  # trainable weights stay fp32 under autocast
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if "cosine" in name:
        assert lrs == pytest.approx([0.0, 1e-3, 0.5e-3])  # each step logs the rate its update used: warm-up first
        assert (tmp_path / "run" / "validation" / "step-00000003" / "prompt-000-image-00.png").is_file()
    if "v-prediction" in name:
        assert json.loads((tmp_path / "run" / "config.json").read_text())["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("isa, slow", [("AVX2", True), ("DEFAULT", True), ("AVX512", False)])
def test_bf16_on_an_x86_cpu_without_avx512_gets_a_warning_line(tiny, folder_data, tmp_path, monkeypatch, capsys,
                                                                 isa, slow):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    train(config(tiny, folder_data, tmp_path / "run", max_steps=1, mixed_precision="bf16"))
    warned = [line for line in capsys.readouterr().err.splitlines() if "no AVX-512" in line]
    assert warned == (["warning: --mixed-precision bf16: this CPU has no AVX-512, and PyTorch's bf16 convolutions run "
                       "about 50x slower than fp32 on it; --mixed-precision no is faster here"] if slow else [])


def factors(total: int, **settings) -> list[float]:
    cfg = TrainConfig(model="m", data="d", tuner="t", output="o", learning_rate=1.0, **settings)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    schedule = lr_schedule(optimizer, cfg, total, cfg.warmup_steps)
    seen = []
    for _ in range(total + 1):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return seen


def test_lr_schedules_are_diffusers_counted_in_optimizer_steps():
    cosine = factors(110, lr_scheduler="cosine", warmup_steps=10)
    assert [cosine[s] for s in (0, 5, 10, 60, 110)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert factors(4, lr_scheduler="constant", warmup_steps=2) == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert factors(4, lr_scheduler="linear") == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert factors(4, lr_scheduler="polynomial", lr_power=2.0)[2] == pytest.approx(0.25 + 1e-7 * 0.75, rel=1e-3)
    restarts = factors(8, lr_scheduler="cosine_with_restarts", lr_num_cycles=2)
    assert restarts[0] == restarts[4] == pytest.approx(1.0) and restarts[2] == pytest.approx(0.5)
    piecewise = factors(4, lr_scheduler="piecewise_constant", lr_step_rules="1:2,0.1")
    assert piecewise == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1])
    assert len(LR_SCHEDULES) == 7


@pytest.mark.parametrize("settings", [dict(lr_scheduler="step"), dict(lr_scheduler="piecewise_constant"),
                                      dict(lr_step_rules="1:2,0.1"), dict(lr_scheduler="piecewise_constant", lr_step_rules="1:x,0.1"),
                                      dict(lr_scheduler="cosine_with_restarts", lr_num_cycles=0)])
def test_bad_schedules_are_one_line(settings):
    with pytest.raises(UserError) as error:
        TrainConfig(model="m", data="d", tuner="t", output="o", **settings)
    assert "\n" not in str(error.value)
