"""`train --text-encoder-lora RANK`: a LoRA on the CLIP text encoder beside the UNet tuner, trained with its own
learning rate, checkpointed (resume stays bit-equal, its EMA too), saved in the tuner folder, applied by load_tuner and
`sample`, and exported as kohya's `lora_te_*` and diffusers' `text_encoder.*` keys that a stock pipeline's
`load_lora_weights` applies to the same image."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import launched_in_two_processes, one_error_line, tiny_unet, unet_inputs
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from restune_sd import TuningConfig, attach, load_tuner, save_tuner
from restune_sd.cli.main import app
from restune_sd.errors import UserError
from restune_sd.export import export_lora, merge_lora
from restune_sd.text_encoder_lora import TEXT_ENCODER_LORA_FILE, attach_text_encoder_lora
from restune_sd.train import Encoders, TrainConfig, load_components, train

runner = CliRunner()
LAYERS = 2  # the tiny text encoder's
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
SETTINGS = dict(tuner="lora-r4", max_steps=4, batch_size=2, learning_rate=1e-2, text_encoder_lora=4,
                text_encoder_lora_alpha=2.0, text_encoder_lr=5e-2, checkpoint_every=2, keep_checkpoints=5, ema=True,
                ema_decay=0.5, lr_scheduler="cosine", report_to="none")


def config(tiny, data, output, **overrides) -> TrainConfig:
    return TrainConfig(model=tiny, data=data, output=str(output), **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def run(tiny, data, tmp_path_factory) -> Path:
    """A lora-r4 + text-encoder LoRA run of 4 steps at high learning rates, checkpointed at step 2 and 4, with an EMA."""
    output = tmp_path_factory.mktemp("runs") / "straight"
    train(config(tiny, data, output))
    return output


def pipeline(tiny):
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


def text_lora(pipe) -> dict:
    return {n: p for n, p in pipe.text_encoder.named_parameters() if "lora_" in n}


def test_the_text_encoder_lora_trains_at_its_own_rate_and_is_saved_with_the_tuner(run):
    record = json.loads((run / "tuner" / "tuner_config.json").read_text())["text_encoder_lora"]
    assert (record["rank"], record["alpha"], record["targets"]) == (4, 2.0, ["q_proj", "k_proj", "v_proj", "out_proj",
                                                                              "fc1", "fc2"])
    saved = load_file(str(run / "tuner" / TEXT_ENCODER_LORA_FILE))
    expected = {f"encoder.layers.{i}.{t}.lora_{ab}.default.weight" for i in range(LAYERS) for t in TARGETS for ab in "AB"}
    assert set(saved) == expected and record["params"] == sum(t.numel() for t in saved.values())
    ups = [t for name, t in saved.items() if ".lora_B." in name]
    assert all(t.abs().max() > 1e-4 for t in ups)  # every up-projection left its zero initialisation: it trained

    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["text_encoder_lora"], recorded["text_encoder_lr"]) == (4, 5e-2)
    state = torch.load(run / "checkpoints" / "step-00000002.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-2, 5e-2] and len(groups[1]["params"]) == len(expected)
    assert {f"text_encoder.{n}" for n in expected} <= set(state["tuner"])
    assert not (run / "cache").exists()


def test_a_stock_pipeline_loads_the_kohya_and_diffusers_exports_to_load_tuners_image(tiny, run, tmp_path):
    ours = image(load_tuner(pipeline(tiny), run))
    kohya = export_lora(run, "kohya", tmp_path / "kohya.safetensors")
    diffusers = export_lora(run, "diffusers", tmp_path / "diffusers")
    assert kohya["text_encoder_lora_modules"] == diffusers["text_encoder_lora_modules"] == LAYERS * len(TARGETS)
    keys = load_file(str(tmp_path / "kohya.safetensors"))
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in keys
    assert keys["lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha"].item() == 2.0
    assert keys["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 4.0
    written = load_file(str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"))
    assert sum(k.startswith("text_encoder.") for k in written) == 2 * LAYERS * len(TARGETS)
    assert any(k.startswith("unet.") for k in written)

    for lora in (tmp_path / "kohya.safetensors", tmp_path / "diffusers", run / "tuner"):
        stock = pipeline(tiny)
        stock.load_lora_weights(str(lora))
        assert len(text_lora(stock)) == 2 * LAYERS * len(TARGETS), lora  # the text encoder's part was applied
        assert np.abs(image(stock) - ours).max() < 1e-5, lora

    # The control: the same UNet LoRA without the text encoder's gives another image, so the match above needs it.
    unet_only = load_tuner(pipeline(tiny), run)
    with torch.no_grad():
        for name, p in text_lora(unet_only).items():
            if ".lora_B." in name:
                p.zero_()
    assert np.abs(image(unet_only) - ours).max() > 1e-3


def test_sample_applies_the_text_encoder_lora_as_a_stock_pipeline_does(tiny, run, tmp_path):
    result = runner.invoke(app, ["sample", "--model", tiny, "--tuner", str(run), "--out", str(tmp_path / "out"),
                                 "--prompt", "a red circle", "--steps", "3", "--seed", "5", "--no-fp16"])
    assert result.exit_code == 0, result.output
    stock = pipeline(tiny)
    stock.load_lora_weights(str(run / "tuner"))  # the tuner folder's own pytorch_lora_weights.safetensors
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    expected = np.asarray(stock("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(5)).images[0],
                          dtype=int)
    assert np.abs(np.asarray(Image.open(tmp_path / "out" / "00000.png"), dtype=int) - expected).max() <= 1


def test_merge_lora_folds_the_text_encoder_lora_in_too(tiny, run):
    ours = image(load_tuner(pipeline(tiny), run))
    merged = merge_lora(load_tuner(pipeline(tiny), run))
    assert not text_lora(merged) and not any("lora_" in n for n, _ in merged.unet.named_parameters())
    assert np.abs(image(merged) - ours).max() < 1e-4  # merged weights differ from the branches by float rounding only


def test_resume_is_bit_equal_with_the_text_encoder_lora_and_its_ema(tiny, data, run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for name in ("checkpoints/step-00000004.pt", "checkpoints/step-00000004.pt.sha256", "results.json"):
        (resumed / name).unlink()
    for name in ("checkpoints/step-00000004-tuner", "checkpoints/step-00000004-tuner-ema", "tuner", "tuner-ema"):
        shutil.rmtree(resumed / name)
    train(config(tiny, data, resumed, resume="latest"))
    for folder in ("tuner", "tuner-ema"):
        for file in ("tuner.safetensors", TEXT_ENCODER_LORA_FILE):
            a, b = load_file(str(run / folder / file)), load_file(str(resumed / folder / file))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (folder, file)
    raw, average = (load_file(str(run / folder / TEXT_ENCODER_LORA_FILE)) for folder in ("tuner", "tuner-ema"))
    assert any(not torch.equal(raw[k], average[k]) for k in raw)  # the EMA covers the text encoder's LoRA


def test_two_processes_average_the_text_encoder_gradients_as_one_process_with_the_combined_batch(tiny, data, tmp_path):
    args = ["train", "--model", tiny, "--data", data, "--tuner", "lora-r4", "--text-encoder-lora", "4",
            "--text-encoder-lr", "5e-2", "--learning-rate", "1e-2", "--max-steps", "3", "--report-to", "none"]
    launched_in_two_processes(args, tmp_path / "two", batch_size=1)
    train(config(tiny, data, tmp_path / "one", max_steps=3, batch_size=2, checkpoint_every=0, ema=False,
                 ema_decay=0.9999, lr_scheduler="constant", text_encoder_lora_alpha=None))
    a, b = (load_file(str(tmp_path / run / "tuner" / TEXT_ENCODER_LORA_FILE)) for run in ("two", "one"))
    # Adam's first steps magnify float rounding in near-zero gradients to ~3e-4 here; unaveraged, the ranks' own
    # gradients leave the weights ~0.3 apart.
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2


def test_cache_keeps_latents_but_no_text_embeddings_while_the_text_encoder_trains(tiny, data, tmp_path, capsys):
    def cached_run(name, **settings) -> Path:
        train(config(tiny, data, tmp_path / name, max_steps=1, checkpoint_every=0, ema=False, ema_decay=0.9999, cache=True,
                     encode_ahead="no", **settings))
        return tmp_path / name / "cache" / "texts"

    assert not cached_run("te").exists()
    assert "--cache keeps latents but not text embeddings here: with --text-encoder-lora" in capsys.readouterr().err
    # The control: the same run without the text encoder's LoRA keeps its captions' embeddings.
    assert list(cached_run("unet", text_encoder_lora=None, text_encoder_lora_alpha=None, text_encoder_lr=None).iterdir())

    comps = load_components(tiny, torch.device("cpu"), torch.float32)
    unet = attach(comps.unet, TuningConfig(lora={"rank": 2}))
    attach_text_encoder_lora(unet, comps.text_encoder, 2, None)
    encoders = Encoders(comps, torch.float32, texts=tmp_path / "texts", text_trains=True)
    embeddings = encoders.text(["a red circle"], "cpu")
    assert embeddings.requires_grad and encoders.texts is None  # the LoRA gets its gradient; nothing is cached
    assert not any(p.requires_grad for n, p in comps.text_encoder.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        assert not encoders.text(["a red circle"], "cpu").requires_grad  # validation and checks stay gradient-free


def test_bypass_is_refused_since_no_gradient_reaches_the_text_encoder(tiny, data, tmp_path):
    line = one_error_line(["train", "--model", tiny, "--data", data, "--output", str(tmp_path / "run"), "--tuner",
                           "bypass", "--text-encoder-lora", "4"])
    assert "no gradient reaches the text encoder" in line and not (tmp_path / "run").exists()
    # Why: the bypass runs the UNet without autograd, and the text embeddings enter only through its cross-attention.
    unet = attach(tiny_unet(), TuningConfig(bypass={}))
    sample, timesteps, context = unet_inputs()
    context.requires_grad_(True)
    unet(sample, timesteps, context).sample.sum().backward()
    assert context.grad is None


@pytest.mark.parametrize("flags, expected", [
    (["--text-encoder-lora", "0"], "--text-encoder-lora must be >= 1 and <= 1024, not 0"),
    (["--text-encoder-lora", "-2"], "--text-encoder-lora must be >= 1 and <= 1024, not -2"),
    (["--text-encoder-lora", "4", "--text-encoder-lr", "0"], "--text-encoder-lr must be > 0 and <= 10.0, not 0.0"),
    (["--text-encoder-lora", "4", "--text-encoder-lr", "-1e-4"], "--text-encoder-lr must be > 0"),
    (["--text-encoder-lora", "4", "--text-encoder-lora-alpha", "0"], "--text-encoder-lora-alpha must be > 0"),
    (["--text-encoder-lr", "1e-4"], "--text-encoder-lr sets up the text encoder's LoRA: add --text-encoder-lora RANK"),
    (["--text-encoder-lora-alpha", "8"], "--text-encoder-lora-alpha sets up the text encoder's LoRA"),
])
def test_bad_text_encoder_settings_are_one_line(tiny, data, tmp_path, flags, expected):
    line = one_error_line(["train", "--model", tiny, "--data", data, "--output", str(tmp_path / "run"), *flags])
    assert expected in line, line
    assert not (tmp_path / "run").exists()


def test_the_settings_are_refused_on_resume(tiny, data, run, tmp_path):
    resume = ["train", "--model", tiny, "--data", data, "--output", str(run), "--resume", "latest", "--tuner", "lora-r4"]
    assert "text_encoder_lr=0.05, not 0.1" in one_error_line([*resume, "--text-encoder-lora", "4", "--text-encoder-lr",
                                                              "0.1"])


@pytest.fixture
def res_tuning_with_text_lora(tiny, tmp_path) -> Path:
    """A res-tuning UNet tuner saved with a text-encoder LoRA (no training: export and stacking only read its config)."""
    pipe = pipeline(tiny)
    attach(pipe, TuningConfig(name="res-tuning", tuners=[{"kind": "res-adapter", "site": "ffn"}]))
    attach_text_encoder_lora(pipe.unet, pipe.text_encoder, 2, None)
    return save_tuner(pipe.unet, tmp_path / "tuner")


def test_what_cannot_carry_the_text_encoder_lora_is_one_line(tiny, res_tuning_with_text_lora, tmp_path):
    tuner = str(res_tuning_with_text_lora)
    line = one_error_line(["export", tuner, "--output", str(tmp_path / "x.safetensors")])
    assert "only UNet LoRA tuners do (its text-encoder LoRA alone would leave its UNet tuner out)" in line
    line = one_error_line(["sample", "--model", tiny, "--tuner", f"{tuner}:0.5", "--out", str(tmp_path / "out"),
                           "--prompt", "a red circle", "--steps", "2"])
    assert "also holds a text-encoder LoRA, which a stack cannot weigh or combine yet" in line


def test_load_tuner_on_a_bare_unet_says_the_text_encoder_lora_is_left_out(tiny, res_tuning_with_text_lora, capsys):
    unet = load_tuner(pipeline(tiny).unet, res_tuning_with_text_lora)
    assert unet.restune.text_encoder_lora is None
    assert "also holds a LoRA for the text encoder, which applies to a pipeline only" in capsys.readouterr().err


def test_an_altered_text_encoder_lora_file_is_refused_in_one_line(tiny, res_tuning_with_text_lora):
    path = res_tuning_with_text_lora / TEXT_ENCODER_LORA_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="text_encoder_lora.safetensors is damaged: it does not match the checksum"):
        load_tuner(pipeline(tiny), res_tuning_with_text_lora)
