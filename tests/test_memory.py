"""The activation-memory measure counts what training adds, not the frozen weights layers save for backward."""

import torch

from restune_sd.evaluation.memory import saved_activation_bytes


def test_frozen_weights_saved_for_backward_are_not_counted():
    layer = torch.nn.Linear(512, 512).requires_grad_(False)
    x = torch.randn(4, 512, requires_grad=True)  # the input needs a gradient, so the layer saves its weight
    assert saved_activation_bytes(lambda: layer(x)) == 512 * 512 * 4
    assert saved_activation_bytes(lambda: layer(x), layer) == 0
    act = torch.nn.Sequential(layer, torch.nn.GELU())
    assert saved_activation_bytes(lambda: act(x), act) == 4 * 512 * 4  # the GELU's input: a real activation
