"""Activation memory a training forward keeps for backward, counted with autograd's saved-tensor hooks.

On CPU this is the honest per-tuner figure (a process's peak RSS is shared by everything it ran); it is the
memory Res-Tuning-Bypass saves by running the backbone without autograd.
"""

import torch


def saved_activation_bytes(forward, model: torch.nn.Module | None = None) -> int:
    """Bytes of the distinct tensors autograd saves while `forward()` runs (shared storages counted once).

    Linear and conv layers save their weight for the input's gradient; those storages are `model`'s parameters,
    held anyway, so they are left out: what remains is the memory training adds.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        # A detached alias, not the tensor: a saved output handed back as itself would hold its own grad_fn, a
        # reference cycle through C++ that the garbage collector cannot see, so every graph would stay alive.
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()  # held until counting ends, so no saved storage's address is reused by another
    del output
    return sum(storages.values())


def unet_training_activation_mb(unet, batch: int, latent_size: int, text_tokens: int = 77) -> float:
    """Saved activations of one denoising forward of `unet` (latent, timestep, text context of the UNet's widths)."""
    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, unet.config.in_channels, latent_size, latent_size, generator=g).to(device)
    context = torch.randn(batch, text_tokens, unet.config.cross_attention_dim, generator=g).to(device)
    timesteps = torch.full((batch,), 500, device=device)
    return saved_activation_bytes(lambda: unet(latents, timesteps, context).sample, unet) / 2**20
