"""Stacking: `sample --tuner A+B:0.6` applies several tuners in one pipeline, each at a weight (a LoRA's scale, a
Res-Tuning branch's strength, a bypass's contribution); `--tuner A --tuner B` still samples each into its own folder."""

import json

import numpy as np
import pytest
import torch
from conftest import one_error_line, perturb, tiny_unet, tiny_vit, unet_inputs
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from typer.testing import CliRunner

import restune_sd
from restune_sd import TuningConfig
from restune_sd.cli.main import app
from restune_sd.errors import UserError
from restune_sd.stacking import apply_tuner

STEPS = ["--steps", "3", "--guidance-scale", "5", "--seed", "4"]


def saved_tuner(tiny, folder, config, seed):
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    restune_sd.attach(pipe, restune_sd.preset(config, "unet") if isinstance(config, str) else config)
    perturb(pipe.unet, seed=seed, std=0.2)  # a tuner that changes the images, as a trained one would
    return str(restune_sd.save_tuner(pipe, folder))


@pytest.fixture(scope="module")
def tuners(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuners")
    lora = TuningConfig(name="lora", lora={"rank": 4, "alpha": 8})
    made = {name: saved_tuner(tiny, root / name, config, seed) for seed, (name, config) in enumerate(
        [("res-tuning", "res-tuning"), ("res-tuning-b", "res-tuning"), ("bypass", "bypass"), ("lora", lora),
         ("prefix", "prefix"), ("prefix-b", "prefix")])}
    vit = tiny_vit()
    restune_sd.attach(vit, restune_sd.preset("res-tuning", "vit"))
    made["vit"] = str(restune_sd.save_tuner(vit, root / "vit"))
    return made


def sampled(tiny, tuner, out) -> np.ndarray:
    result = CliRunner().invoke(app, ["sample", "--model", tiny, "--tuner", tuner, "--out", str(out), "--prompt",
                                      "a red bus", *STEPS, "--no-fp16"])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out / "00000.png"))


def stock(tiny, tuner=None, **call) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    if tuner:
        restune_sd.load_tuner(pipe, tuner)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return np.asarray(pipe("a red bus", num_inference_steps=3, guidance_scale=5, generator=torch.Generator().manual_seed(4),
                           **call).images[0])


def test_a_second_tuner_at_weight_0_leaves_the_first_alone_exactly(tiny, tuners, tmp_path):
    alone = stock(tiny, tuners["res-tuning"])
    for other in ("bypass", "lora", "res-tuning-b"):
        stacked = sampled(tiny, f"{tuners['res-tuning']}+{tuners[other]}:0", tmp_path / other)
        assert np.array_equal(stacked, alone), other
    # and a bypass first, at weight 1, stays the bypass alone
    assert np.array_equal(sampled(tiny, f"{tuners['bypass']}:1+{tuners['lora']}:0", tmp_path / "b"), stock(tiny, tuners["bypass"]))


def test_a_lora_at_weight_half_is_peft_scale_half(tiny, tuners, tmp_path):
    half = sampled(tiny, f"{tuners['lora']}:0.5", tmp_path / "half")
    assert np.array_equal(half, stock(tiny, tuners["lora"], cross_attention_kwargs={"scale": 0.5}))
    assert not np.array_equal(half, stock(tiny, tuners["lora"]))


def test_two_res_tuning_tuners_stacked_differ_from_either_alone(tiny, tuners, tmp_path):
    both = sampled(tiny, f"{tuners['res-tuning']}+{tuners['res-tuning-b']}:0.6", tmp_path / "both")
    assert not np.array_equal(both, stock(tiny, tuners["res-tuning"]))
    assert not np.array_equal(both, stock(tiny, tuners["res-tuning-b"]))
    record = json.loads((tmp_path / "both" / "samples.jsonl").read_text().splitlines()[0])
    assert record["tuner"] == f"{tuners['res-tuning']}+{tuners['res-tuning-b']}:0.6"


def test_a_weight_scales_each_kind_of_branch():
    from restune_sd.tuners import ResAdapter

    adapter = ResAdapter(8, 4)
    torch.nn.init.normal_(adapter.up.weight)
    torch.nn.init.normal_(adapter.bias)
    x = torch.randn(2, 5, 8)
    full = adapter(x)
    adapter.strength = 0.25
    assert torch.allclose(adapter(x), 0.25 * full, atol=1e-6)

    unet = tiny_unet()
    restune_sd.attach(unet, restune_sd.preset("bypass", "unet"))
    perturb(unet)
    inputs = unet_inputs()
    with torch.no_grad():
        tuned = unet(*inputs).sample
        unet.restune_bypass.strength = 0.0
        plain = unet(*inputs).sample
        unet.restune_bypass.strength = 1.0
        assert torch.equal(unet(*inputs).sample, tuned)  # alone at weight 1: the ladder's output, as unstacked
    with torch.no_grad():
        bare = tiny_unet()(*inputs).sample
    assert torch.equal(plain, bare) and not torch.equal(tuned, bare)


def test_several_tuner_options_still_sample_into_their_own_folders(tiny, tuners, tmp_path):
    result = CliRunner().invoke(app, ["sample", "--model", tiny, "--tuner", tuners["res-tuning"], "--tuner",
                                      f"{tuners['res-tuning']}+{tuners['bypass']}:0.5", "--out", str(tmp_path / "out"),
                                      "--prompt", "a red bus", *STEPS, "--no-fp16"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["res-tuning", "res-tuning+bypass-0.5"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "res-tuning" / "00000.png")), stock(tiny, tuners["res-tuning"]))


@pytest.mark.parametrize("weight, expected", [("abc", "must be a number, not 'abc'"), ("-1", "must be >= 0"),
                                              ("11", "<= 10"), ("nan", "must be a number, not nan"),
                                              ("inf", "must be a number, not inf")])
def test_bad_weights_are_one_line(tiny, tuners, tmp_path, weight, expected):
    message = one_error_line(["sample", "--model", tiny, "--tuner", f"{tuners['res-tuning']}+{tuners['lora']}:{weight}",
                              "--out", str(tmp_path / "out"), "--prompt", "x", *STEPS])
    assert expected in message and tuners["lora"] in message, message
    assert not (tmp_path / "out").exists()


def test_tuners_that_cannot_stack_are_one_line(tiny, tuners, tmp_path):
    full = saved_tuner(tiny, tmp_path / "full", "full", 9)
    cases = [
        (f"{tuners['res-tuning']}+{tuners['vit']}", "tuner for a vit"),
        (f"{tuners['res-tuning']}+{full}:0.5", "full fine-tune"),
        (f"{tuners['prefix']}:0.5", "softmax-gated"),
        (f"{tuners['prefix']}+{tuners['prefix-b']}", "share its softmax"),
        (f"{tuners['res-tuning']}+", "empty tuner"),
    ]
    for n, (tuner, expected) in enumerate(cases):
        message = one_error_line(["sample", "--model", tiny, "--tuner", tuner, "--out", str(tmp_path / f"out{n}"),
                                  "--prompt", "x", *STEPS])
        assert expected in message, message


def test_a_stacked_model_is_not_saved_as_one_tuner(tiny, tuners, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    apply_tuner(pipe, f"{tuners['res-tuning']}+{tuners['lora']}:0.5")
    with pytest.raises(UserError, match="stack of tuners"):
        restune_sd.save_tuner(pipe, tmp_path / "saved")
