"""DreamBooth's prior preservation (`train --class-data DIR --class-prompt P`): the class images, the missing ones
generated into DIR with the frozen base model before training (resumably), and the loss that adds
--prior-loss-weight times the class images' loss to the instance images', as diffusers' train_dreambooth.py does."""

import dataclasses
import os
from pathlib import Path

import torch

from restune_sd.bounds import MAX_SEED
from restune_sd.encoders import keys_of, latent_key
from restune_sd.errors import UserError
from restune_sd.files import write_atomic, writing

# How class image k is drawn: what `restune-sd sample --model M --prompt P --seed SEED+k --steps 25 --scheduler ddim
# --guidance-scale 7.5 --resolution R` draws (--no-fp16 for the same bits on a GPU). Fixed, not options: a folder
# filled over several runs then holds one kind of image. 25 DDIM steps are what validation images default to.
CLASS_STEPS = 25
CLASS_SCHEDULER = "ddim"
CLASS_GUIDANCE = 7.5
CLASS_FILE = "class-{:05d}.png"  # the names this tool gives the images it adds; a name already taken is skipped
CLASS_DRAW = 1  # a class sample's draws are seeded by (seed, step, position, CLASS_DRAW): apart from its instance's
MAX_CLASS_IMAGES = 1_000_000
PRIOR_FLAGS = {"class_prompt": "--class-prompt", "num_class_images": "--num-class-images",
               "prior_loss_weight": "--prior-loss-weight"}


def check_prior_settings(cfg) -> None:
    """The prior preservation options go together: --class-data needs --class-prompt, and the others need both."""
    if cfg.class_data is None:
        defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in PRIOR_FLAGS}
        for name, flag in PRIOR_FLAGS.items():
            if getattr(cfg, name) != defaults[name]:
                raise UserError(f"{flag} is a prior preservation setting and goes with --class-data DIR (the folder of "
                                f"class images): add --class-data or leave {flag} out")
        return
    if not str(cfg.class_data).strip():
        raise UserError("--class-data names no folder: pass the folder of class images (made if missing)")
    if cfg.class_prompt is None or not str(cfg.class_prompt).strip():
        raise UserError("--class-data needs --class-prompt, e.g. --class-prompt 'a photo of a dog': it captions the class "
                        "images in training and generates the missing ones")


def class_folder(cfg) -> Path:
    return Path(cfg.class_data).expanduser()


def class_image_files(folder: Path) -> list[Path]:
    """The images in a --class-data folder, by name; hidden files (a write in progress) are left out."""
    from restune_sd.datasets.finegrained import IMAGE_SUFFIXES

    if not folder.is_dir():
        return []
    try:
        return sorted(p for p in folder.iterdir()
                      if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    except OSError as error:
        raise UserError(f"cannot read --class-data {folder} ({(error.strerror or type(error).__name__).lower()}): "
                        "pass a folder you can read") from None


def check_class_data(cfg) -> None:
    """Before any model loads: --class-data is a folder (or is missing, and made), outside --output, and writable
    when images are missing there."""
    if cfg.class_data is None:
        return
    folder = class_folder(cfg)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--class-data {folder} is a file, not a folder: pass the folder of class images (made if missing)")
    output = Path(cfg.output).expanduser().resolve()
    if folder.resolve() == output or output in folder.resolve().parents:
        raise UserError(f"--class-data {folder} lies inside --output {cfg.output}: keep the class images in a folder of "
                        "their own, outside the run")
    if len(class_image_files(folder)) < cfg.num_class_images:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"--class-data {folder} holds fewer than --num-class-images {cfg.num_class_images} images and "
                            f"the missing ones cannot be written there ({existing} is not a writable folder): pass a "
                            "folder you can write, or one that holds enough images")


def free_numbers(folder: Path, count: int) -> list[int]:
    """The first `count` numbers k whose CLASS_FILE name is not taken in `folder` (by any file, the user's included)."""
    numbers, k = [], 0
    while len(numbers) < count:
        if not os.path.lexists(folder / CLASS_FILE.format(k)):
            numbers.append(k)
        k += 1
    return numbers


def fill_class_images(comps, session) -> int:
    """Generate the class images --class-data lacks (main process; the others wait): image k with the frozen pipeline
    from the seed SEED + k, each written whole under a name not yet taken, so a killed run leaves whole images and a
    rerun adds the rest. Returns how many this process generated (0 without --class-data)."""
    cfg, accelerator = session.cfg, session.accelerator
    if cfg.class_data is None:
        return 0
    generated = 0
    if accelerator.is_main_process:
        folder = class_folder(cfg)
        missing = cfg.num_class_images - len(class_image_files(folder))
        if missing > 0:
            generated = generate_class_images(comps, session, folder, missing)
    accelerator.wait_for_everyone()
    return generated


def generate_class_images(comps, session, folder: Path, missing: int) -> int:
    from tqdm.auto import tqdm

    from restune_sd.sample import draw, use_scheduler
    from restune_sd.validation import components_pipeline

    cfg = session.cfg
    with writing(folder, "pass a --class-data folder you can write"):
        folder.mkdir(parents=True, exist_ok=True)
    numbers = free_numbers(folder, missing)
    if cfg.seed + numbers[-1] > MAX_SEED:
        raise UserError(f"--seed {cfg.seed} is too large: class image {numbers[-1]} would have seed "
                        f"{cfg.seed + numbers[-1]}, above {MAX_SEED}; use a smaller --seed")
    pipe = components_pipeline(comps, comps.unet)  # the frozen UNet: no tuner is attached yet
    use_scheduler(pipe, CLASS_SCHEDULER)  # predicting what the model's own scheduler says
    done = cfg.num_class_images - missing
    with tqdm(total=cfg.num_class_images, initial=done, desc="class images", unit="image") as progress:
        for k in numbers:
            generator = torch.Generator(session.device).manual_seed(cfg.seed + k)
            with session.accelerator.autocast():
                images, non_finite = draw(pipe, [cfg.class_prompt], [generator], num_inference_steps=CLASS_STEPS,
                                          guidance_scale=CLASS_GUIDANCE, height=cfg.resolution, width=cfg.resolution)
            path = folder / CLASS_FILE.format(k)
            if non_finite:
                raise UserError(f"class image {path} came out NaN or infinite and was not written: the model gives "
                                "non-finite values, or overflows in half precision (try --mixed-precision no); the "
                                "class images already written are kept")
            write_atomic(path, lambda tmp: images[0].save(tmp, format="PNG"),
                         "the class images already written are kept: free some space and run the same command again")
            progress.update(1)
    return len(numbers)


def class_dataset(cfg):
    """The first --num-class-images images of --class-data (by name), each captioned with --class-prompt, with the
    instance images' crop and flip settings."""
    from restune_sd.datasets import CaptionDataset

    files = class_image_files(class_folder(cfg))[:cfg.num_class_images]
    if not files:
        raise UserError(f"--class-data {class_folder(cfg)} holds no images: pass a folder of class images, or let them "
                        "be generated there")
    return CaptionDataset([(path, [cfg.class_prompt]) for path in files], name=f"--class-data {class_folder(cfg)}",
                          resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                          seed=cfg.seed)


def prior_loss(unet, encoders, batch: dict, cfg, step: int, device) -> torch.Tensor:
    """diffusers' DreamBooth loss: the instance images and their class images in one UNet call, then the instance
    half's mean loss + --prior-loss-weight x the class half's. Class latents are cached under keys of their own."""
    from restune_sd.train import denoising_losses

    positions = [int(p) for p in batch["position"]]
    height, width = batch["pixel_values"].shape[-2:]
    class_keys = keys_of(batch["class_index"].tolist(), batch["class_flipped"].tolist(), (width, height))
    joined = {"pixel_values": torch.cat([batch["pixel_values"], batch["class_pixel_values"]]),
              "caption": [*batch["caption"], *[cfg.class_prompt] * len(positions)],
              "latent_keys": latent_key(batch) + [f"class-{key}" for key in class_keys],
              "draws": [(p,) for p in positions] + [(p, CLASS_DRAW) for p in positions]}
    if "mask" in batch:  # --masked-loss masks the instance images; a class image trains everywhere
        joined["mask"] = torch.cat([batch["mask"], torch.ones_like(batch["mask"])])
    losses = denoising_losses(unet, encoders, joined, cfg, step, device)
    return losses[:len(positions)].mean() + cfg.prior_loss_weight * losses[len(positions):].mean()


def prior_preserving(job, session, encoders, generated: int):
    """The job with prior preservation where --class-data is given (else as it is): each instance sample paired with a
    class sample (restune_sd.datasets.prior), the prior loss, and the class image counts in config.json and results."""
    from restune_sd.datasets.prior import PriorPairs

    cfg = session.cfg
    if cfg.class_data is None:
        return job
    classes = class_dataset(cfg)
    return dataclasses.replace(
        job, dataset=PriorPairs(job.dataset, classes, cfg.seed),
        loss=lambda model, batch, step: prior_loss(model, encoders, batch, cfg, step, session.device),
        record={**job.record, "class_images": len(classes), "class_images_generated": generated})
