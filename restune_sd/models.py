"""Backbones: the real SD v1.5 UNet and ViT-B/16 architectures with random weights, and loading local folders.

`build_architecture("sd15")` builds the 859.52M-parameter SD v1.5 UNet from its config (no download);
on the `meta` device it costs no memory, which is how `restune-sd info` counts parameters.
"""

import json
import reprlib
from pathlib import Path

import torch

from restune_sd.bounds import MAX_RESOLUTION
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
# The parts of a diffusers SD pipeline folder that `train` and `sample` load; the libraries decide what each needs.
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Single-file checkpoints (as A1111 and ComfyUI users have them): every weight of an SD v1.x pipeline in one file.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Whose configs diffusers builds an SD v1.x single file with when it is given none (from the cache, or downloaded).
SD1_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONFIG_HELP = "a local diffusers SD v1.x pipeline folder: its configs, tokenizer and scheduler are read, not its weights"


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


def is_single_file(model) -> bool:
    return Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES


def model_kind(path) -> str:
    """'sd' for a diffusers pipeline folder or a single-file checkpoint, 'unet' for a bare UNet folder, 'vit' for a
    transformers ViT folder."""
    path = Path(path)
    if (path / "model_index.json").is_file() or (path.is_file() and is_single_file(path)):
        return "sd"
    config = path / "config.json"
    if config.is_file():
        data = read_model_json(config)
        if data.get("_class_name") == "UNet2DConditionModel":
            return "unet"
        if data.get("model_type") == "vit":
            return "vit"
    raise UserError(f"{path} is not a diffusers Stable Diffusion pipeline (no model_index.json) nor a UNet or ViT folder")


def looks_local(name: str) -> bool:
    """Whether a name that is not on disk was meant as a local path: hub ids are NAME or OWNER/NAME."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def read_model_json(path: Path) -> dict:
    """A model folder's JSON file as a mapping; a damaged one is one line naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{path} is damaged ({reason(error)}): copy the model folder again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a mapping: copy the model folder again")
    return data


def reason(error: BaseException) -> str:
    """An exception's message on one short line."""
    return " ".join(str(error).split())[:300] or type(error).__name__


def check_weights(folder: Path) -> None:
    """That the weights in `folder` can be read: each .safetensors file's header and size (not its data), or else each
    pickled .bin through torch's weights-only loader (memory-mapped, so its data is not read either)."""
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        found = sorted(folder.glob("*.bin"))
        if not found:
            raise UserError(f"{folder} holds no weights (no .safetensors or .bin file): copy it again")
    for path in found:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt"):
                    pass
            else:
                torch.load(path, map_location="meta", weights_only=True, mmap=True)
        except Exception as error:  # safetensors, zipfile and the weights-only unpickler raise many types
            fix = "copy it again" if path.suffix == ".safetensors" else (
                "a .bin is read with weights_only=True, which refuses objects other than tensors: use a .safetensors copy")
            raise UserError(f"{path} cannot be read ({reason(error)}): {fix}") from None


def require_sizes(path: Path, config: dict, keys: tuple[str, ...], maximum: int = 2**20) -> None:
    """Config fields that size a model: whole numbers from 1 to `maximum` (lists of them for block widths)."""
    for key in keys:
        value = config.get(key)
        values = value if isinstance(value, list) and value else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= maximum for v in values):
            raise UserError(f"{path}: {key} must be a whole number from 1 to {maximum}, not {reprlib.repr(value)}: "
                            "copy the model folder again")


def part_loaders() -> dict:
    """How `train` and `sample` read each pipeline part, without its weights: the libraries' own config and tokenizer
    loaders, so whatever files they accept (tokenizer.json alone, vocab.json and merges.txt) are accepted here."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    return {"unet": UNet2DConditionModel.load_config, "vae": AutoencoderKL.load_config,
            "text_encoder": CLIPTextConfig.from_pretrained, "tokenizer": CLIPTokenizer.from_pretrained,
            "scheduler": DDPMScheduler.load_config}


def check_pipeline_parts(folder: Path, weights: bool = True, what: str = "the pipeline folder") -> None:
    """Each part of the SD pipeline at `folder` loads through its library (weights: their headers); the first that does
    not is a UserError naming it and why."""
    read_model_json(folder / "model_index.json")
    for part, load in part_loaders().items():
        if not (folder / part).is_dir():
            raise UserError(f"{what} {folder} is incomplete: {part}/ is missing; copy its {part}/ folder again")
        try:
            loaded = load(folder / part)
        except Exception as error:  # the libraries raise OSError, ValueError, KeyError, JSON errors, ...
            raise UserError(f"{what} {folder}: its {part}/ cannot be loaded ({reason(error)}): copy its {part}/ "
                            "folder again") from None
        if part == "unet":
            require_sizes(folder / "unet" / "config.json", loaded, ("sample_size", "block_out_channels"), 4096)
        if part == "vae":
            require_sizes(folder / "vae" / "config.json", loaded, ("block_out_channels",), 4096)
            if len(loaded["block_out_channels"]) > 8:
                raise UserError(f"{folder / 'vae' / 'config.json'}: more block_out_channels than any VAE has: copy "
                                "the vae/ folder again")
        if weights and part in ("unet", "vae", "text_encoder"):
            check_weights(folder / part)


def check_pipeline(model: str, config: str | None = None) -> None:
    """Fail up front, naming the missing part, when `model` is a local folder without every part of an SD pipeline,
    or a single-file checkpoint that is missing or whose `config` folder lacks a part."""
    path = Path(model).expanduser()
    if is_single_file(model):
        if not path.is_file():
            raise UserError(f"checkpoint file {model} does not exist: pass an SD v1.x .safetensors or .ckpt file")
        check_model_config(config)
        return
    if config is not None:
        raise UserError(f"--model-config goes with a single-file --model (.safetensors or .ckpt), and {model} is "
                        "not one: leave --model-config out")
    if not path.exists():
        if looks_local(model):
            raise UserError(f"model folder {model} does not exist: pass a diffusers Stable Diffusion pipeline folder")
        return
    if model_kind(path) != "sd":
        raise UserError(f"{model} is not a diffusers Stable Diffusion pipeline folder (it has no model_index.json)")
    check_pipeline_parts(path)


def check_model_config(config: str | None) -> None:
    """A single file's `--model-config`: a local diffusers SD pipeline folder with every config, or a hub id."""
    if config is None:
        return
    path = Path(config).expanduser()
    if not path.exists():
        if looks_local(config):
            raise UserError(f"--model-config folder {config} does not exist: pass {CONFIG_HELP}")
        return  # a hub id: diffusers fetches its configs where the machine is online
    if not (path / "model_index.json").is_file():
        raise UserError(f"--model-config {config} is not a diffusers pipeline folder (no model_index.json): pass {CONFIG_HELP}")
    check_pipeline_parts(path, weights=False, what="--model-config")


def check_vit_folder(model: str) -> None:
    """A local ViT folder's config.json (through transformers), preprocessor_config.json and weights can be used; the
    first that cannot is a UserError naming it. Hub ids and `vit-b16` are left to transformers."""
    from transformers import ViTConfig

    path = Path(model)
    if not path.is_dir():
        return
    config = path / "config.json"
    read_model_json(config)
    try:
        loaded = ViTConfig.from_pretrained(path).to_dict()
    except Exception as error:  # transformers raises OSError, ValueError, TypeError, ... for a config it cannot use
        raise UserError(f"{config} cannot be loaded ({reason(error)}): copy the model folder again") from None
    require_sizes(config, loaded, ("image_size",), MAX_RESOLUTION)
    require_sizes(config, loaded, ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size"), 65536)
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        data = read_model_json(preprocessor)
        for key, low in (("image_mean", -10), ("image_std", 1e-4)):
            value = data.get(key, [0.5] * 3)
            if not (isinstance(value, list) and len(value) == 3 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= 10 for v in value)):
                raise UserError(f"{preprocessor}: {key} must be three numbers from {low} to 10, not "
                                f"{reprlib.repr(value)}: copy the model folder again")
    check_weights(path)


def native_resolution(unet_config, vae_config) -> int:
    """A pipeline's own image size: the UNet's sample size times the VAE's downsampling factor."""
    return unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)


def config_folder(model: str, config: str | None = None) -> Path:
    """Where a model's configs are: its own folder, or a single-file checkpoint's `--model-config` folder."""
    return Path(config) if config and is_single_file(model) else Path(model)


def vae_factor(model: str, config: str | None = None) -> int | None:
    """A local pipeline's VAE downsampling factor (8 for SD v1.5), read from its config; None if it cannot be read."""
    try:
        vae = json.loads((config_folder(model, config) / "vae" / "config.json").read_text())
        return 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def text_encoder_layers(model: str, config: str | None = None) -> int | None:
    """A local pipeline's text encoder depth (12 for SD v1.5's CLIP), read from its config; None if it cannot be read."""
    try:
        text = json.loads((config_folder(model, config) / "text_encoder" / "config.json").read_text())
        return int(text["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pipeline_resolution(model: str, config: str | None = None) -> int | None:
    """A local pipeline's own image size, read from its configs; None if it is not a local folder."""
    path = config_folder(model, config)
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return native_resolution(unet, vae)


def require_single_file_configs(model: str, config: str | None) -> None:
    """Offline, a single file given no `--model-config` needs diffusers' SD v1.5 configs in the Hugging Face cache."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(SD1_CONFIG_REPO, "model_index.json"), str)
    if is_single_file(model) and config is None and is_offline_mode() and not cached:
        raise UserError(f"{model} is a single-file checkpoint: building its pipeline needs the configs of an SD v1.x "
                        f"pipeline, and offline none is cached: pass --model-config DIR, {CONFIG_HELP}")


def single_file_pipeline(model: str, config: str | None, dtype=torch.float32):
    """An SD v1.x pipeline from a single-file checkpoint through diffusers' `from_single_file` (which reads a .ckpt with
    weights_only=True), built with the configs of `config`, or without one diffusers' SD v1.5 configs."""
    from diffusers import StableDiffusionPipeline

    check_pipeline(model, config)
    require_single_file_configs(model, config)
    try:
        return StableDiffusionPipeline.from_single_file(model, config=config, dtype=dtype, safety_checker=None,
                                                        requires_safety_checker=False)
    except Exception as error:  # diffusers raises many types for a file or configs it cannot use
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        unpickled = Path(model).suffix.lower() == ".ckpt" and "Unable to load weights" in reason
        hint = ("; a .ckpt is read with weights_only=True, and one holding objects other than tensors is refused: use "
                "a .safetensors copy" if unpickled else "")
        where = f"with the configs of {config}" if config else f"(offline, pass --model-config DIR, {CONFIG_HELP})"
        raise UserError(f"cannot build an SD v1.x pipeline from {model} {where}: {reason}{hint}") from None


def quiet_loading() -> None:
    """No per-component 'Loading weights' bars: a run's own progress bar is the one to read."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def load_unet(model: str, device: str = "cpu", dtype=torch.float32, config: str | None = None):
    """The UNet of a pipeline folder, a bare UNet folder, a single-file checkpoint (built with the configs of
    `config`), `sd15` (random weights) or a hub id."""
    from diffusers import UNet2DConditionModel

    if model == "sd15":
        return build_architecture("sd15", device="cpu").to(device, dtype)
    if is_single_file(model):
        return single_file_pipeline(model, config, dtype).unet.to(device)
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
    check_vit_folder(model)
    try:
        return ViTForImageClassification.from_pretrained(model, **kwargs).to(device)
    except OSError as error:
        raise UserError(f"cannot load a ViT from {model!r}: {str(error).splitlines()[0]}") from None
