"""The activation-memory measure counts what training adds, not the frozen weights layers save for backward, and
holds nothing once it returns."""

import gc
import weakref

import torch

from restune_sd.evaluation.memory import saved_activation_bytes


def test_frozen_weights_saved_for_backward_are_not_counted():
    layer = torch.nn.Linear(512, 512).requires_grad_(False)
    x = torch.randn(4, 512, requires_grad=True)  # the input needs a gradient, so the layer saves its weight
    assert saved_activation_bytes(lambda: layer(x)) == 512 * 512 * 4
    assert saved_activation_bytes(lambda: layer(x), layer) == 0
    act = torch.nn.Sequential(layer, torch.nn.GELU())
    assert saved_activation_bytes(lambda: act(x), act) == 4 * 512 * 4  # the GELU's input: a real activation


def live_tensors() -> tuple[int, int]:
    """(tensor objects the garbage collector can see, bytes of their distinct storages) after a full collection."""
    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type != "meta"}
    return len(tensors), sum(storages.values())


def test_repeated_counts_keep_no_graph_alive():
    # Softmax and tanh save their own outputs: a hook handing such a tensor back as itself closes a reference cycle
    # through its grad_fn, and every call's graph stays alive.
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Softmax(-1), torch.nn.Linear(256, 256),
                                torch.nn.Tanh())
    x = torch.randn(64, 256)
    outputs = []

    def forward():
        output = model(x)
        outputs.append(weakref.ref(output))
        return output

    first = saved_activation_bytes(forward, model)
    assert first >= 2 * 64 * 256 * 4  # at least the two saved outputs
    before = live_tensors()
    for _ in range(3):
        assert saved_activation_bytes(forward, model) == first
    assert live_tensors() == before
    gc.collect()
    assert all(ref() is None for ref in outputs)


def test_gradients_are_unchanged_under_the_counter():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Softmax(-1), torch.nn.Linear(16, 4), torch.nn.Tanh())
    x = torch.randn(8, 16)
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    saved_activation_bytes(lambda: model(x).square().sum().backward(), model)
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))
