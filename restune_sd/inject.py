"""One injector per backbone: match blocks, build the tuners at their sites, freeze everything else.

`attach(model, config)` works on a diffusers `UNet2DConditionModel` (or a pipeline holding one) and a
transformers `ViTForImageClassification`. The backbone's own modules and state-dict keys stay as they are;
tuners are children named `restune_*` (or a UNet attention's `processor`), LoRA layers are PEFT's own.
"""

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from restune_sd.attention import install_processor
from restune_sd.bypass import Bypass, BypassLadder
from restune_sd.config import TunerSpec, TuningConfig
from restune_sd.errors import UserError
from restune_sd.sites import AdapterSite, ViTAttentionTokens
from restune_sd.tuners import PrefixTokens, PromptTokens, ResAdapter

LORA_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "vit": ["q_proj", "k_proj", "v_proj", "o_proj"]}
HEAD = "classifier"


@dataclass
class Tuned:
    """What `attach` did to a model; kept on it as `model.restune` (a plain attribute, not a module)."""

    backbone: str
    config: TuningConfig
    param_names: list[str] = field(default_factory=list)  # trainable tuner parameters, the head excluded
    head_names: list[str] = field(default_factory=list)
    stack: list = field(default_factory=list)  # (tuner, weight) of every tuner stacked on it (restune_sd.stacking)
    text_encoder_lora: object = None  # a TextEncoderLora trained or loaded with it (restune_sd.text_encoder_lora)


def is_tuner_param(name: str) -> bool:
    """Parameters that `attach` adds: restune_* sites, UNet attention processors, PEFT's LoRA layers."""
    return "restune_" in name or ".processor." in name or "lora_" in name


def backbone_kind(model) -> str:
    from diffusers import UNet2DConditionModel
    from transformers import ViTForImageClassification

    if isinstance(model, UNet2DConditionModel):
        return "unet"
    if isinstance(model, ViTForImageClassification):
        return "vit"
    raise UserError(f"cannot tune a {type(model).__name__}: pass a diffusers UNet2DConditionModel, a Stable Diffusion "
                    "pipeline, or a transformers ViTForImageClassification")


def unwrap(model):
    """A pipeline's UNet, or the model itself."""
    return getattr(model, "unet", model)


def transformer_blocks(model, kind: str) -> dict[str, nn.Module]:
    """The tunable transformer blocks by module path: the UNet's BasicTransformerBlocks, the ViT's layers."""
    if kind == "vit":
        return {f"vit.layers.{i}": layer for i, layer in enumerate(model.vit.layers)}
    from diffusers.models.attention import BasicTransformerBlock

    return {name: m for name, m in model.named_modules() if isinstance(m, BasicTransformerBlock)}


def match_blocks(blocks: dict[str, nn.Module], pattern: str) -> dict[str, nn.Module]:
    """Blocks whose path fully matches `pattern` as a regex, or ends with it as a name suffix."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise UserError(f"blocks pattern {pattern!r} is not a valid regex: {error}") from None
    chosen = {n: b for n, b in blocks.items() if regex.fullmatch(n) or n.endswith(pattern)}
    if not chosen:
        example = next(iter(blocks), "none")
        raise UserError(f"blocks pattern '{pattern}' matches no transformer block (they are named like {example!r})")
    return chosen


def _attention_layers(kind: str, block: nn.Module, site: str) -> list[tuple[str, nn.Module]]:
    if kind == "vit":
        return [("attention", block.attention)]
    names = {"self_attn": ["attn1"], "cross_attn": ["attn2"], "attn": ["attn1", "attn2"]}[site]
    return [(n, getattr(block, n)) for n in names if getattr(block, n, None) is not None]


def _site(block: nn.Module, name: str, make) -> nn.Module:
    if not hasattr(block, name):
        block.add_module(name, make())
    return getattr(block, name)


def _add_adapters(kind: str, block: nn.Module, spec: TunerSpec, width: int):
    reads = "input" if spec.kind == "res-adapter" else "output"
    scale = 1.0 if spec.scale is None else spec.scale
    if spec.site in ("ffn", "block"):
        target = block if spec.site == "block" else (block.mlp if kind == "vit" else block.ff)
        targets = [(spec.site, target)]
    else:
        targets = _attention_layers(kind, block, spec.site)
    for site_name, target in targets:
        site = _site(block, f"restune_{site_name}_{reads}", lambda: AdapterSite(reads).attach(target))
        site.adapters.append(ResAdapter(width, spec.dim, spec.groups, scale))


def _add_tokens(kind: str, model, block_name: str, block: nn.Module, spec: TunerSpec):
    bound = spec.kind in ("prefix", "prompt")
    # A bound original is the exact softmax split over [tuner; frozen] keys (docs/method.md §1): no free scale.
    gate = "lambda" if bound else spec.gate
    for attn_name, attn in _attention_layers(kind, block, spec.site):
        to_k = attn.k_proj if kind == "vit" else attn.to_k
        inner = to_k.out_features
        if spec.kind.endswith("prefix"):
            tuner = PrefixTokens(spec.dim, inner, 1.0 if spec.scale is None else spec.scale, gate)
        else:
            tuner = PromptTokens(spec.dim, to_k.in_features, 0.0 if spec.scale is None else spec.scale, gate)
        if kind == "vit":
            heads = block.attention.config.num_attention_heads
            _site(block, "restune_attn_tokens", lambda: ViTAttentionTokens(heads).attach(attn)).tokens.append(tuner)
        else:
            processor = install_processor(model, f"{block_name}.{attn_name}", attn)
            (processor.bound if bound else processor.tokens).append(tuner)


def _width(kind: str, block: nn.Module) -> int:
    return block.attention.q_proj.in_features if kind == "vit" else block.norm1.normalized_shape[0]


def class_token(hidden: torch.Tensor) -> torch.Tensor:
    """A ViT classifier's head reads only the class token, and the ladder works token by token: run it on that.

    A copy, not a view: a view would keep the whole hidden state's storage alive."""
    return hidden[:, :1].clone()


def vit_ladder(model, spec) -> BypassLadder:
    """A ViT's ladder: root = the first layer's input, one stem per layer, all at the hidden width."""
    width = model.config.hidden_size
    return BypassLadder(width, [width] * len(model.vit.layers), spec)


def unet_ladder(model, spec) -> BypassLadder:
    """A UNet's ladder: root = the mid block's input, stems = the mid block and every up block."""
    widths = [model.config.block_out_channels[-1]]
    widths += [block.resnets[-1].out_channels for block in model.up_blocks]
    return BypassLadder(model.config.block_out_channels[-1], widths, spec)


def _attach_bypass(kind: str, model, spec, name: str = "restune_bypass") -> None:
    if kind == "vit":
        layers = list(model.vit.layers)
        bypass = Bypass(vit_ladder(model, spec), select=class_token)
        setattr(model, name, bypass.attach(model.vit, layers[0], layers, model.vit.layernorm))
        return
    stems = [model.mid_block, *model.up_blocks]
    setattr(model, name, Bypass(unet_ladder(model, spec)).attach(model, model.mid_block, stems, model.conv_norm_out,
                                                                 plain_kernels=True))


def _attach_lora(kind: str, model, spec, adapter_name: str = "default") -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = spec.targets or LORA_TARGETS[kind]
    lora = LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=targets, init_lora_weights=True)
    try:
        inject_adapter_in_model(lora, model, adapter_name=adapter_name)
    except ValueError as error:
        raise UserError(f"LoRA targets {targets} match no module of this {kind}: {str(error).splitlines()[0]}") from None


def attach(model, config: TuningConfig):
    """Freeze `model` and attach the tuners `config` describes; returns the tuned model (the same object)."""
    model = unwrap(model)
    kind = backbone_kind(model)
    if getattr(model, "restune", None) is not None:
        raise UserError("this model already carries a restune tuner: load a fresh backbone to attach another")
    model.requires_grad_(False)
    add_tuners(model, kind, config)

    params = dict(model.named_parameters())
    if config.full:
        tuner_names = [n for n in params if not n.startswith(HEAD)]
    else:
        tuner_names = [n for n in params if is_tuner_param(n)]
    head_names = [n for n in params if n.startswith(f"{HEAD}.")] if kind == "vit" and config.train_head else []
    for name in tuner_names + head_names:
        params[name].requires_grad_(True)
    if not tuner_names and not head_names:
        raise UserError(f"tuner config {config.name!r} trains no parameter: add tuners, lora, bypass, full or train_head")
    model.restune = Tuned(kind, config, tuner_names, head_names)
    return model


def add_tuners(model, kind: str, config: TuningConfig, lora_name: str = "default", bypass_name: str = "restune_bypass"):
    """Build `config`'s tuners into `model` beside any it has: adapters join their sites' lists, prefix/prompt tokens
    their attention's processor, the LoRA is PEFT adapter `lora_name`, the bypass the child `bypass_name`."""
    device = next(model.parameters()).device
    blocks = transformer_blocks(model, kind)
    for spec in config.tuners:
        for name, block in match_blocks(blocks, spec.blocks).items():
            if spec.kind in ("res-adapter", "adapter"):
                _add_adapters(kind, block, spec, _width(kind, block))
            else:
                _add_tokens(kind, model, name, block, spec)
    if config.lora:
        _attach_lora(kind, model, config.lora, lora_name)
    if config.bypass:
        _attach_bypass(kind, model, config.bypass, bypass_name)
    model.to(device)
