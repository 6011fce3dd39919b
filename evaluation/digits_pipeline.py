"""A small Stable Diffusion pipeline pretrained on handwritten digits 0-4 at 32 px, made on CPU in minutes.

The tiny pipeline of restune_sd/tiny.py has random weights everywhere; three changes make it a backbone worth tuning:

- the VAE downsamples 4x (three blocks), so 32 px images have the tiny UNet's 8 x 8 latents, and it is first trained
  as an autoencoder on the digits 0-4 (a random VAE decodes any latent to noise, whatever the UNet learns); its
  scaling factor is set so the latents have unit spread, as SD's 0.18215 does for its VAE;
- the UNet is trained from its random start with the project's own `train` and the `full` tuner, on captions
  "a handwritten digit D" (10% dropped, so guidance has an unconditional model), and exported into the pipeline;
- the CLIP text encoder stays random and frozen, with a short context: its tokenizer learns "handwritten" and "digit"
  whole, so a caption is 6 of CONTEXT tokens. Padded to SD's 77, the one token naming the digit hid among ~65 pads
  that barely differ: after 800 steps the samples for 0-4 were read as asked 24% of the time (chance 20%), against
  56% at 8 tokens (and 100% after 2000 steps), at half the step time.
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from restune_sd.evaluation import digits_data

RESOLUTION = 32
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           norm_num_groups=4, sample_size=RESOLUTION)
CAPTION_WORDS = ("handwritten", "digit")
CONTEXT = 8  # tokens: start, "a handwritten digit D", end, one pad
# The KL term only keeps the posterior's spread from collapsing to nothing; the reconstruction decides the latents.
KL_WEIGHT = 1e-6


@dataclass(frozen=True)
class PretrainSettings:
    vae_steps: int = 250
    vae_batch: int = 32
    vae_learning_rate: float = 2e-3
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_learning_rate: float = 1e-3
    caption_dropout: float = 0.1
    seed: int = 0


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 8x8 digits as the pipeline's RGB input at RESOLUTION, in [-1, 1]: the same rendering as the data folders."""
    rendered = np.stack([np.asarray(digits_data.render(image, RESOLUTION)) for image in images])
    return torch.from_numpy(rendered).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(images: np.ndarray, settings: PretrainSettings):
    """An AutoencoderKL of VAE's shape trained to reconstruct `images` (MSE + KL_WEIGHT * KL); its scaling factor set to
    1 / the latents' standard deviation. Returns (vae, record)."""
    from diffusers import AutoencoderKL

    x = pixels(images)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        vae = AutoencoderKL(**VAE)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate)
        started = time.time()
        for _ in range(settings.vae_steps):
            batch = x[torch.randint(0, len(x), (settings.vae_batch,), generator=generator)]
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            loss = torch.nn.functional.mse_loss(reconstruction, batch) + KL_WEIGHT * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(256)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae, {"vae_seconds": round(time.time() - started, 1), "vae_final_mse": round(loss.item(), 5),
                 "vae_params": sum(p.numel() for p in vae.parameters()), "vae_scaling_factor": vae.config.scaling_factor}


@torch.no_grad()
def reconstruct(vae, images: np.ndarray) -> list:
    """The VAE's reconstructions of `images` (through the latent means) as PIL images: the decoder's ceiling."""
    from PIL import Image

    out = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in pixels(images).split(256)])
    arrays = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def write_initial_pipeline(path: Path, vae) -> Path:
    """The tiny random pipeline (restune_sd.tiny) with `vae` in place of its random 8x VAE: 32 px images, 8x8 latents."""
    from restune_sd.tiny import write_tiny_sd

    write_tiny_sd(path, seed=0, extra_words=CAPTION_WORDS, max_length=CONTEXT)
    shutil.rmtree(path / "vae")
    vae.save_pretrained(path / "vae", safe_serialization=True)
    return path


def pretrain(folder: Path, settings: PretrainSettings = PretrainSettings()) -> dict:
    """Everything under `folder`: data/pretrain (digits 0-4), init/ (random UNet, trained VAE), runs/pretrain (`full`
    on 0-4) and pretrained/ (the exported pipeline). Returns the record of what was made, also in pretrained.json."""
    from restune_sd.export import export_pipeline
    from restune_sd.train import TrainConfig, train

    digits = digits_data.load()
    train_set, _ = digits_data.split(digits, digits_data.PRETRAIN_DIGITS)
    data = digits_data.write_captioned(folder / "data" / "pretrain", train_set, RESOLUTION)
    vae, record = train_vae(train_set.images, settings)
    initial = write_initial_pipeline(folder / "init", vae)
    run = folder / "runs" / "pretrain"
    result = train(TrainConfig(
        model=str(initial), data=f"folder:{data}", tuner="full", output=str(run), max_steps=settings.unet_steps,
        batch_size=settings.unet_batch, learning_rate=settings.unet_learning_rate, lr_scheduler="cosine",
        warmup_steps=settings.unet_steps // 20, caption_dropout=settings.caption_dropout, seed=settings.seed,
        report_to="none"))
    pipeline = folder / "pretrained"
    export_pipeline(run, pipeline, initial)
    record |= {"settings": asdict(settings), "pipeline": str(pipeline), "unet_params": result["total_params"],
               "unet_seconds": round(result["wall_seconds"], 1), "unet_final_loss": round(result["mean_loss_last_10"], 4),
               "train_images": len(train_set.labels)}
    (folder / "pretrained.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
