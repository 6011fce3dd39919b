"""The bypass ladder trains every stage from the first step: gradients reach each rung, the root reaches the output."""

import pytest
import torch
from conftest import run, tiny_unet, tiny_vit, unet_inputs, vit_inputs

from restune_sd import TuningConfig, attach, preset
from restune_sd.models import build_architecture

FORMS = ["correction", "paper"]


def bypass(kind: str, form: str) -> TuningConfig:
    config = preset("bypass", kind)
    config.bypass.form = form
    return config


def sd15_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 7, 768, generator=g)


def backbones():
    return {
        "tiny-unet": (lambda: tiny_unet(), "unet", unet_inputs),
        "tiny-vit": (lambda: tiny_vit(), "vit", vit_inputs),
        "sd15": (lambda: build_architecture("sd15", device="cpu"), "unet", sd15_inputs),
    }


def loss_of(model, inputs) -> torch.Tensor:
    out = run(model, inputs)
    return (out - torch.linspace(-1, 1, out.numel()).view_as(out)).square().mean()


def rung_modules(ladder) -> dict[str, torch.nn.Module]:
    rungs = {f"horizontal.{i}": m for i, m in enumerate(ladder.horizontal)}
    rungs |= {f"vertical.{i}": m for i, m in enumerate(ladder.vertical)}
    rungs |= {f"project.{i}": m for i, m in enumerate(ladder.project) if not isinstance(m, torch.nn.Identity)}
    return rungs


def zero_grads(module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backbone", ["tiny-unet", "tiny-vit", "sd15"])
def test_every_rung_gets_a_gradient_at_the_first_step_and_every_tensor_after_it(backbone, form):
    build, kind, make_inputs = backbones()[backbone]
    torch.manual_seed(0)
    model = attach(build(), bypass(kind, form))
    ladder = model.restune_bypass.ladder
    inputs = make_inputs()

    loss_of(model, inputs).backward()
    silent = [name for name, module in rung_modules(ladder).items()
              if len(zero_grads(module)) == len(list(module.parameters()))]
    assert not silent, f"rungs with no gradient at the first step: {silent}"
    if form == "paper":  # its stems differ at init, so the mix has a gradient at once
        assert (ladder.lam.grad != 0).all()

    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    model.zero_grad()
    loss_of(model, inputs).backward()
    assert zero_grads(ladder) == []


def captured_features(model, inputs):
    bypass_ = model.restune_bypass
    seen = {}
    original = bypass_.ladder.forward
    bypass_.ladder.forward = lambda root, stems: seen.update(root=root, stems=stems) or original(root, stems)
    try:
        with torch.no_grad():
            run(model, inputs)
    finally:
        del bypass_.ladder.forward
    return seen["root"], seen["stems"]


@pytest.mark.parametrize("backbone", ["tiny-unet", "tiny-vit"])
def test_after_one_step_the_root_feature_reaches_the_output(backbone):
    build, kind, make_inputs = backbones()[backbone]
    torch.manual_seed(0)
    model = attach(build(), preset("bypass", kind))
    ladder = model.restune_bypass.ladder
    inputs = make_inputs()
    root, stems = captured_features(model, inputs)
    nudged = root + torch.randn(root.shape, generator=torch.Generator().manual_seed(5))

    with torch.no_grad():  # at initialisation the ladder is the identity on the last stem
        assert torch.equal(ladder(root, stems), stems[-1]) and torch.equal(ladder(nudged, stems), stems[-1])
    loss_of(model, inputs).backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    with torch.no_grad():
        change = (ladder(nudged, stems) - ladder(root, stems)).abs().max()
    assert change > 1e-6


@pytest.mark.parametrize("backbone", ["tiny-unet", "tiny-vit"])
def test_correction_form_equals_the_frozen_model_at_init_and_the_papers_form_does_not(backbone):
    build, kind, make_inputs = backbones()[backbone]
    inputs = make_inputs()
    with torch.no_grad():
        frozen = run(build(), inputs)
        assert preset("bypass", kind).bypass.form == "correction"  # the default
        assert torch.equal(run(attach(build(), preset("bypass", kind)), inputs), frozen)
        assert not torch.allclose(run(attach(build(), bypass(kind, "paper")), inputs), frozen, atol=1e-3)


def test_the_form_travels_with_a_saved_tuner(tmp_path):
    from conftest import perturb

    from restune_sd import load_tuner, save_tuner

    tuned = attach(tiny_unet(), bypass("unet", "paper"))
    perturb(tuned)
    inputs = unet_inputs()
    with torch.no_grad():
        expected = run(tuned, inputs)
    save_tuner(tuned, tmp_path / "tuner")
    loaded = load_tuner(tiny_unet(), tmp_path / "tuner")
    assert loaded.restune_bypass.ladder.form == "paper"
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), expected)


def test_vit_ladder_on_the_class_token_alone_gives_the_full_width_logits():
    from conftest import perturb

    model = attach(tiny_vit(), preset("bypass", "vit"))
    perturb(model)
    x = vit_inputs(batch=3)
    with torch.no_grad():
        logits = run(model, x)
        model.restune_bypass.select = None  # the whole token sequence through the ladder
        assert torch.allclose(run(model, x), logits, atol=1e-6, rtol=0)
