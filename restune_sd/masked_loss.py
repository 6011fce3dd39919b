"""The per-sample denoising MSE, weighted under --masked-loss by each sample's mask (kohya's apply_masked_loss)."""

import torch
import torch.nn.functional as F


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks [B, 1, H, W] in image pixels brought to the latent's `size` (height, width) by area averaging, as kohya
    does: a latent pixel half covered by the mask gets weight 0.5."""
    return F.interpolate(mask.float(), size=tuple(size), mode="area")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean squared error [B] ([K, B] for a sweep's predictions [K, B, C, H, W] of K variants); with
    `mask` the mean over all latent elements of mask * squared error (kohya's --masked_loss: masked-out elements count
    as zeros in the mean rather than leaving it, so a sample whose mask keeps half of it weighs about half as much)."""
    error = F.mse_loss(prediction, target.expand_as(prediction), reduction="none")
    if mask is not None:
        error = error * latent_mask(mask.to(error.device), error.shape[-2:])
    return error.mean(dim=(-3, -2, -1))
