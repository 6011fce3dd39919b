"""How much of the bypass ladder a gradient reaches, on the real SD v1.5 UNet (random weights): at the first backward
and after one AdamW step, per form. Prints figures; asserts nothing (tests/test_bypass_ladder.py asserts).

    python -m restune_sd.evaluation.ladder_gradients --latent 32
"""

import argparse

import torch

from restune_sd.config import BYPASS_FORMS, preset
from restune_sd.inject import attach
from restune_sd.models import build_architecture


def reached(ladder) -> tuple[int, list[str]]:
    """Parameters in tensors with a non-zero gradient, and the names of the tensors without one."""
    silent = [n for n, p in ladder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    return sum(p.numel() for n, p in ladder.named_parameters() if n not in silent), silent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (32: a 256 px image)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, args.latent, args.latent, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g))
    for form in BYPASS_FORMS:
        torch.manual_seed(0)
        config = preset("bypass", "unet")
        config.bypass.form = form
        model = attach(build_architecture("sd15", device="cpu"), config)
        ladder = model.restune_bypass.ladder
        total = sum(p.numel() for p in ladder.parameters())
        for when in ("first backward", "after one AdamW step"):
            if when != "first backward":
                torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4).step()
                model.zero_grad()
            out = model(*inputs).sample
            (out - torch.linspace(-1, 1, out.numel()).view_as(out)).square().mean().backward()
            count, silent = reached(ladder)
            print(f"{form}, {when}: {count:,} of {total:,} ladder parameters in tensors with a gradient; "
                  f"without one: {', '.join(silent) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
