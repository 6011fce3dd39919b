"""Backbones: the real SD v1.5 UNet and ViT-B/16 architectures with random weights, and loading local folders.

`build_architecture("sd15")` builds the 859.52M-parameter SD v1.5 UNet from its config (no download);
on the `meta` device it costs no memory, which is how `restune-sd info` counts parameters.
"""

import json
from pathlib import Path

import torch

from restune_sd.errors import UserError

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
VIT_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               image_size=224, patch_size=16, num_labels=100)
ARCHITECTURES = ("sd15", "vit-b16")
# The parts of a diffusers SD pipeline folder that `train` and `sample` load, and the files each must hold
# (a tuple: any one of them; "*" patterns: any matching file).
PIPELINE_PARTS = {
    "unet": ("config.json", ("*.safetensors", "*.bin")), "vae": ("config.json", ("*.safetensors", "*.bin")),
    "text_encoder": ("config.json", ("*.safetensors", "*.bin")), "tokenizer": ("vocab.json", "merges.txt"),
    "scheduler": ("scheduler_config.json",),
}


def build_architecture(name: str, device: str = "meta", num_labels: int | None = None):
    """A randomly initialised SD v1.5 UNet (`sd15`) or ViT-B/16 classifier (`vit-b16`)."""
    if name not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}: use one of {', '.join(ARCHITECTURES)} or a model folder")
    with torch.device(device):
        if name == "sd15":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**SD15_UNET)
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(**{**VIT_B16, "num_labels": num_labels or VIT_B16["num_labels"]}))


def model_kind(path) -> str:
    """'sd' for a diffusers pipeline folder, 'unet' for a bare UNet folder, 'vit' for a transformers ViT folder."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return "sd"
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.get("_class_name") == "UNet2DConditionModel":
            return "unet"
        if data.get("model_type") == "vit":
            return "vit"
    raise UserError(f"{path} is not a diffusers Stable Diffusion pipeline (no model_index.json) nor a UNet or ViT folder")


def check_pipeline(model: str) -> None:
    """Fail up front, naming the missing part, when `model` is a local folder without every part of an SD pipeline."""
    path = Path(model).expanduser()
    if not path.exists():
        if model.startswith(("/", ".", "~")) or model.count("/") > 1:  # hub ids are NAME or OWNER/NAME
            raise UserError(f"model folder {model} does not exist: pass a diffusers Stable Diffusion pipeline folder")
        return
    if model_kind(path) != "sd":
        raise UserError(f"{model} is not a diffusers Stable Diffusion pipeline folder (it has no model_index.json)")
    for part, needs in PIPELINE_PARTS.items():
        for need in needs:
            options = need if isinstance(need, tuple) else (need,)
            if not any(next((path / part).glob(option), None) for option in options):
                raise UserError(f"the pipeline folder {model} is incomplete: {part}/{options[0]} is missing; copy its "
                                f"{part}/ folder again")


def native_resolution(unet_config, vae_config) -> int:
    """A pipeline's own image size: the UNet's sample size times the VAE's downsampling factor."""
    return unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_factor(model: str) -> int | None:
    """A local pipeline's VAE downsampling factor (8 for SD v1.5), read from its config; None if it cannot be read."""
    try:
        vae = json.loads((Path(model) / "vae" / "config.json").read_text())
        return 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pipeline_resolution(model: str) -> int | None:
    """A local pipeline's own image size, read from its configs; None if it is not a local folder."""
    path = Path(model)
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return native_resolution(unet, vae)


def quiet_loading() -> None:
    """No per-component 'Loading weights' bars: a run's own progress bar is the one to read."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def load_unet(model: str, device: str = "cpu", dtype=torch.float32):
    """The UNet of a pipeline folder, a bare UNet folder, `sd15` (random weights) or a hub id."""
    from diffusers import UNet2DConditionModel

    if model == "sd15":
        return build_architecture("sd15", device="cpu").to(device, dtype)
    path = Path(model)
    if path.exists():
        subfolder = "unet" if model_kind(path) == "sd" else None
        if model_kind(path) == "vit":
            raise UserError(f"{path} is a ViT classifier, not a Stable Diffusion model")
        return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, dtype=dtype).to(device)
    try:
        return UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype).to(device)
    except Exception as error:
        raise UserError(f"cannot load a UNet from {model!r} (not a local folder; hub: {str(error).splitlines()[0]})") from None


def load_vit(model: str, device: str = "cpu", num_labels: int | None = None):
    """A ViT classifier from a transformers folder, `vit-b16` (random weights) or a hub id; new head if num_labels differs."""
    from transformers import ViTForImageClassification

    if model == "vit-b16":
        return build_architecture("vit-b16", device="cpu", num_labels=num_labels).to(device)
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
    if Path(model).exists() and model_kind(model) != "vit":
        raise UserError(f"{model} is a Stable Diffusion model, not a ViT classifier")
    try:
        return ViTForImageClassification.from_pretrained(model, **kwargs).to(device)
    except OSError as error:
        raise UserError(f"cannot load a ViT from {model!r}: {str(error).splitlines()[0]}") from None
