"""A LoRA on a pipeline's CLIP text encoder beside any UNet tuner (`train --text-encoder-lora RANK`): PEFT layers on
its attention and MLP projections, as kohya's default network puts them; trained with its own learning rate, kept in
the tuner folder as `text_encoder_lora.safetensors` (its rank, alpha and targets in the tuner's config) and applied
again by `load_tuner` on a pipeline.

Its tensors are named as PEFT names the text encoder's parameters in transformers >= 5.6, whose CLIPTextModel has no
`text_model` level (`encoder.layers.0.mlp.fc1.lora_A.default.weight`): a text encoder of either layout reads them.
"""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from restune_sd.config import LoraSpec
from restune_sd.errors import UserError

# kohya's default LoRA network on SD 1.x's text encoder: every CLIPAttention and CLIPMLP linear layer.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TEXT_ENCODER_LORA_FILE = "text_encoder_lora.safetensors"
CHECKPOINT_PREFIX = "text_encoder."  # its weights' names in a checkpoint's tuner dict, beside the UNet tuner's
TEXT_MODEL = "text_model."  # the level transformers < 5.6 has above the encoder (kohya's and diffusers' key names keep it)


@dataclass
class TextEncoderLora:
    """A text encoder carrying a LoRA, and the LoRA's rank, alpha and targets; kept on the tuned UNet's `restune`."""

    module: torch.nn.Module
    spec: LoraSpec

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The LoRA's parameters by their saved names (see the module docstring), in module order."""
        return {canonical(name): p for name, p in self.module.named_parameters() if "lora_" in name}

    def record(self) -> dict:
        """What the tuner's config says of it (the weights' checksum is added when they are written)."""
        return {"rank": self.spec.rank, "alpha": self.spec.alpha or self.spec.rank, "targets": list(self.spec.targets),
                "params": sum(p.numel() for p in self.parameters().values())}


def canonical(name: str) -> str:
    return name.removeprefix(TEXT_MODEL)


def text_encoder_spec(rank: int, alpha: float | None) -> LoraSpec:
    return LoraSpec(rank=rank, alpha=alpha, targets=list(TEXT_ENCODER_TARGETS))


def add_text_encoder_lora(text_encoder, spec: LoraSpec, trainable: bool) -> TextEncoderLora:
    """PEFT's LoRA (adapter "default") on `text_encoder`'s target layers, its frozen weights frozen; `trainable` LoRA
    weights are kept in float32 whatever the text encoder's precision (as the UNet tuner's are)."""
    from peft import LoraConfig, inject_adapter_in_model

    text_encoder.requires_grad_(False)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=spec.targets,
                        init_lora_weights=True)
    try:
        inject_adapter_in_model(config, text_encoder, adapter_name="default")
    except ValueError as error:
        raise UserError(f"text-encoder LoRA targets {spec.targets} match no layer of this text encoder: "
                        f"{str(error).splitlines()[0]}") from None
    tuned = TextEncoderLora(text_encoder, spec)
    for p in tuned.parameters().values():
        if trainable:
            p.data = p.data.float()
        p.requires_grad_(trainable)
    return tuned


def attach_text_encoder_lora(unet, text_encoder, rank: int, alpha: float | None) -> TextEncoderLora:
    """Train a LoRA on `text_encoder` with the tuner attached to `unet`: saved, checkpointed and loaded with it."""
    tuned = add_text_encoder_lora(text_encoder, text_encoder_spec(rank, alpha), trainable=True)
    unet.restune.text_encoder_lora = tuned
    return tuned


def check_text_encoder_settings(cfg) -> None:
    """--text-encoder-lr and --text-encoder-lora-alpha only with --text-encoder-lora (their ranges are TrainConfig's
    BOUNDS)."""
    given = [flag for flag, value in (("--text-encoder-lr", cfg.text_encoder_lr),
                                      ("--text-encoder-lora-alpha", cfg.text_encoder_lora_alpha)) if value is not None]
    if given and cfg.text_encoder_lora is None:
        raise UserError(f"{given[0]} sets up the text encoder's LoRA: add --text-encoder-lora RANK (e.g. 4)")


def require_text_encoder_gradient(cfg, tuning) -> None:
    """The text encoder's LoRA learns from the gradient that reaches the captions' embeddings through the UNet's
    cross-attention; the bypass runs the UNet without autograd, so none would reach it."""
    if cfg.text_encoder_lora is not None and tuning.bypass:
        raise UserError("--text-encoder-lora cannot train beside the bypass tuner: the bypass runs the UNet, whose "
                        "cross-attention reads the text embeddings, without autograd, so no gradient reaches the text "
                        "encoder; use another --tuner (res-tuning, lora, ...) or leave --text-encoder-lora out")


def text_encoder_groups(unet, text_encoder, cfg) -> list[dict]:
    """With --text-encoder-lora, the LoRA on the text encoder (attached to the tuner on `unet`) as the optimizer's
    param group, at --text-encoder-lr (default --learning-rate); none without it."""
    if cfg.text_encoder_lora is None:
        return []
    tuned = attach_text_encoder_lora(unet, text_encoder, cfg.text_encoder_lora, cfg.text_encoder_lora_alpha)
    lr = cfg.learning_rate if cfg.text_encoder_lr is None else cfg.text_encoder_lr
    return [{"params": list(tuned.parameters().values()), "lr": lr}]


def tuned_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Every weight a run trains and checkpoints, by name: the tuner's and the head's, then those of the text
    encoder's LoRA (prefixed `text_encoder.`)."""
    tuned = model.restune
    params = dict(model.named_parameters())
    chosen = {name: params[name] for name in tuned.param_names + tuned.head_names}
    if tuned.text_encoder_lora:
        chosen |= {CHECKPOINT_PREFIX + name: p for name, p in tuned.text_encoder_lora.parameters().items()}
    return chosen


def outside_parameters(job) -> list:
    """The trainable weights of a training job's own param groups (loop.Job.param_groups): those of the text encoder's
    LoRA, outside the UNet that accelerate prepares."""
    return [p for group in job.param_groups for p in group["params"]]


def average_gradients(accelerator, params: list) -> None:
    """Gradients of weights outside the prepared model, averaged over the processes as DDP averages the model's."""
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:  # None on every process or on none: they all run the same graph
                p.grad = accelerator.reduce(p.grad, reduction="mean")


def write_text_encoder_lora(tuned: TextEncoderLora, folder: Path) -> dict:
    """Its weights as `folder/text_encoder_lora.safetensors`; returns its record for the tuner's config."""
    path = folder / TEXT_ENCODER_LORA_FILE
    save_file({name: p.detach().contiguous().cpu() for name, p in tuned.parameters().items()}, str(path))
    return {**tuned.record(), "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def load_text_encoder_lora(pipe, folder: Path, record: dict) -> TextEncoderLora:
    """The saved text-encoder LoRA on the pipeline's text encoder, its weights checked against the record's checksum."""
    from restune_sd.io import read_safetensors

    state = read_safetensors(folder / TEXT_ENCODER_LORA_FILE, record["weights_sha256"])
    tuned = add_text_encoder_lora(pipe.text_encoder, LoraSpec(**{k: record[k] for k in ("rank", "alpha", "targets")}),
                                  trainable=False)
    copy_state(tuned, state, folder)
    return tuned


def copy_state(tuned: TextEncoderLora, state: dict[str, torch.Tensor], where) -> None:
    """Copy saved tensors into the LoRA's parameters, which they must match one for one and shape for shape."""
    params = tuned.parameters()
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise UserError(f"the text-encoder LoRA of {where} does not fit this text encoder: {len(missing)} missing and "
                        f"{len(unexpected)} unexpected weights (e.g. {(missing or unexpected)[0]})")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise UserError(f"the text-encoder LoRA of {where} does not fit this text encoder: {name} has shape "
                                f"{tuple(tensor.shape)}, the text encoder expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def kohya_modules(pairs: dict) -> dict:
    """Module paths as kohya names SD 1.x's text encoder (transformers 4's layout, under `text_model.`)."""
    return {TEXT_MODEL + module: pair for module, pair in pairs.items()}


def diffusers_layers(pairs: dict) -> dict[str, torch.Tensor]:
    """The `text_encoder_lora_layers` diffusers' training scripts hand `save_lora_weights`: PEFT's state dict of the
    text encoder converted with convert_state_dict_to_diffusers, named under `text_model.` as transformers 4 names
    them (what files on the hub hold; diffusers loads them into either layout)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    peft_state = {f"{TEXT_MODEL}{module}.{part}.weight": tensor for module, (down, up) in pairs.items()
                  for part, tensor in (("lora_A", down), ("lora_B", up))}
    return convert_state_dict_to_diffusers(peft_state)


def diffusers_metadata(record: dict) -> dict:
    return {"r": record["rank"], "lora_alpha": record["alpha"], "target_modules": list(record["targets"])}


SHA256 = re.compile(r"[0-9a-f]{64}")


def is_record(value) -> bool:
    """Whether a tuner config's `text_encoder_lora` field is one `write_text_encoder_lora` writes."""
    def whole(v, high):
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= high

    if not isinstance(value, dict) or set(value) != {"rank", "alpha", "targets", "params", "weights_sha256"}:
        return False
    alpha, targets, checksum = value["alpha"], value["targets"], value["weights_sha256"]
    return (whole(value["rank"], 1024) and whole(value["params"], 10**12)
            and isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha <= 1e6
            and isinstance(targets, list) and 0 < len(targets) <= 64
            and all(isinstance(t, str) and 0 < len(t) <= 100 for t in targets)
            and isinstance(checksum, str) and bool(SHA256.fullmatch(checksum)))
