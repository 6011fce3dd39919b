"""A bypass training step runs the frozen UNet's heavy-weight CPU convolutions without oneDNN (restune_sd/kernels.py):
which convolutions, that oneDNN's setting always comes back, and that the step's result moves by rounding only."""

import pytest
import torch
from conftest import perturb, run, tiny_unet

from restune_sd import attach, preset
from restune_sd.kernels import prefers_plain_kernel


def unet_inputs():
    """Latents large enough that the first blocks' activations outweigh their weights (they keep oneDNN)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g)


def kernels_seen(model, inputs, grad: bool) -> dict[str, bool]:
    """For each frozen convolution of one forward: was oneDNN on while it ran?"""
    seen = {}
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and "restune" not in name:
            # a pre-hook registered after the bypass's own: it sees the setting the convolution runs with
            conv.register_forward_pre_hook(lambda m, a, name=name: seen.update({name: torch.backends.mkldnn.enabled}))
    with torch.set_grad_enabled(grad):
        run(model, inputs)
    return seen


def test_heavy_weight_convolutions_skip_onednn_in_a_training_step_only():
    model = attach(tiny_unet(), preset("bypass", "unet"))
    inputs = unet_inputs()
    shapes = {}
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and "restune" not in name:
            conv.register_forward_pre_hook(lambda m, a, name=name: shapes.update({name: prefers_plain_kernel(m, a[0])}))
    training = kernels_seen(model, inputs, grad=True)
    heavy = {name for name, plain in shapes.items() if plain}
    # the frozen part (before the ladder's target, conv_norm_out) only; the channels decide, so both kinds occur
    frozen = {name for name in training if not name.startswith(("conv_out",))}
    assert heavy and heavy != set(frozen)
    assert {name for name in frozen if not training[name]} == heavy & frozen
    assert torch.backends.mkldnn.enabled
    assert all(kernels_seen(model, inputs, grad=False).values())  # sampling keeps oneDNN: a stock pipeline's image


def test_onednn_comes_back_when_the_frozen_forward_fails():
    model = attach(tiny_unet(), preset("bypass", "unet"))
    model.mid_block.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        run(model, unet_inputs())
    assert torch.backends.mkldnn.enabled
    assert model.restune_bypass._kernels.active == 0


def test_a_training_step_moves_by_rounding_only():
    """The same step with oneDNN for every convolution gives the same loss and gradients to float rounding."""
    results = []
    for plain in (True, False):
        torch.manual_seed(0)
        model = attach(tiny_unet(), preset("bypass", "unet"))
        perturb(model)
        if not plain:
            model.restune_bypass._kernels.active = -10**6  # never above zero: oneDNN throughout
        loss = run(model, unet_inputs()).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_plain, grads_plain), (loss_onednn, grads_onednn) = results
    torch.testing.assert_close(loss_plain, loss_onednn, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_plain, grads_onednn):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
