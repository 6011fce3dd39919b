"""Why tuners stall on a tiny random ViT: the same tiny ViT at two weight scales, tuned on a task where the colour
says nothing (the label is a shape on a random background). Prints figures; asserts nothing.

    python -m restune_sd.evaluation.tiny_vit_scale --init 0.02 0.2 --tuners linear lora res-tuning bypass full
"""

import argparse
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from restune_sd.config import preset
from restune_sd.inject import attach
from restune_sd.tiny import TINY_VIT


def shapes(count: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A circle, square or triangle (the label) in the inverse colour of a random background."""
    rng = random.Random(seed)
    pixels, labels = [], []
    for _ in range(count):
        label, background = rng.randrange(3), tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        fill, canvas = tuple(255 - c for c in background), ImageDraw.Draw(image)
        cx, cy, r = rng.uniform(10, size - 10), rng.uniform(10, size - 10), rng.uniform(5, 9)
        if label == 0:
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif label == 1:
            canvas.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            canvas.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        pixels.append(np.asarray(image, dtype=np.float32))
        labels.append(label)
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1, torch.tensor(labels)


def main() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=float, nargs="+", default=[0.02, 0.2], help="ViTConfig.initializer_range")
    parser.add_argument("--tuners", nargs="+", default=["linear", "lora", "res-tuning", "bypass", "full"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    (x, y), (test_x, test_y) = shapes(900, 1), shapes(300, 2)
    for init in args.init:
        for name in args.tuners:
            torch.manual_seed(0)
            model = ViTForImageClassification(ViTConfig(**{**TINY_VIT, "initializer_range": init}, num_labels=3))
            with torch.no_grad():
                stream = model.vit(pixel_values=x[:8], output_hidden_states=True).hidden_states
            model = attach(model, preset(name, "vit")).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-4)
            for step in range(args.steps):
                index = torch.randint(len(x), (32,), generator=torch.Generator().manual_seed(step))
                loss = F.cross_entropy(model(pixel_values=x[index]).logits, y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                accuracy = (model.eval()(pixel_values=test_x).logits.argmax(-1) == test_y).float().mean().item()
            print(f"init {init}: {name:10s} residual std {stream[0].std():.2f} (embeddings) -> {stream[-1].std():.2f} "
                  f"(last layer); final loss {loss.item():.3f}, test top-1 {accuracy:.2f} (chance 0.33)", flush=True)


if __name__ == "__main__":
    main()
