"""The diffusers attention processor that carries Res-Prefix/Res-Prompt (and the bound originals) for a UNet.

The processor is an nn.Module, so it is a registered child of its `Attention` and its tokens train and save.
diffusers replaces processors it does not know when xformers or SDPA is switched on or off; `guard_processors`
puts ours back before every forward (keeping the backend the user asked for), so a tuner is never dropped.
"""

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from restune_sd.errors import UserError
from restune_sd.tuners import bound_keys_values, merge_heads, mix_unbound, split_heads

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa")


@functools.cache
def xformers_usable() -> bool:
    """True when xformers is installed and its kernels run on this CUDA device (a wheel built for another torch does not)."""
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops

        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        return True
    except Exception as error:  # any import or kernel failure means: fall back to SDPA
        logger.warning("xformers is not usable here (%s); using PyTorch SDPA", str(error).splitlines()[0] if str(error) else error)
        return False


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"unknown attention backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "xformers" if xformers_usable() else "sdpa"
    if backend == "xformers" and not xformers_usable():
        raise UserError("xformers attention needs CUDA and an xformers build matching this torch: use --attention sdpa")
    return backend


def attend(q, k, v, backend: str, mask=None):
    """Softmax attention on (B, heads, N, dh) tensors with the chosen kernel."""
    if backend == "xformers" and mask is None:
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                                      v.transpose(1, 2).contiguous())
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class ResTuningAttnProcessor(nn.Module):
    """Attention with the frozen math of diffusers' AttnProcessor2_0, plus prefix/prompt tuners.

    `tokens` are unbound (Res-Prefix/Res-Prompt: a branch `s * Attn(Q, K_b, V_b)` added before the frozen `to_out`);
    `bound` are the originals (their keys and values concatenated to the frozen ones).
    """

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        self.tokens = nn.ModuleList()
        self.bound = nn.ModuleList()
        self.backend = backend

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        q = split_heads(attn.to_q(hidden_states), attn.heads)
        k = split_heads(attn.to_k(context), attn.heads)
        v = split_heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)

        if self.bound:
            k, v = bound_keys_values(k, v, self.bound, attn.to_k, attn.to_v, attn.heads)
            if attention_mask is not None:  # the prepended tokens are always visible
                pad = attention_mask.new_zeros(*attention_mask.shape[:-1], k.shape[2] - attention_mask.shape[-1])
                attention_mask = torch.cat([pad, attention_mask], dim=-1)
        backend = self.backend
        out = attend(q, k, v, backend, attention_mask)
        if self.tokens:
            out = mix_unbound(q, k, v, out, self.tokens, attn.to_k, attn.to_v, attn.heads, attention_mask)

        hidden_states = attn.to_out[1](attn.to_out[0](merge_heads(out).to(q.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _installed(model) -> dict:
    return model.__dict__.setdefault("_restune_processors", {})


def install_processor(model, name: str, attn) -> ResTuningAttnProcessor:
    """The ResTuningAttnProcessor of an Attention layer, creating and registering it on first use."""
    processors = _installed(model)
    if name not in processors:
        backend = "xformers" if "XFormers" in type(attn.processor).__name__ else "sdpa"
        processors[name] = (attn, ResTuningAttnProcessor(backend))
        attn.set_processor(processors[name][1])
        if not getattr(model, "_restune_guard", None):
            model._restune_guard = model.register_forward_pre_hook(_guard_hook)
    return processors[name][1]


def _guard_hook(model, args) -> None:
    guard_processors(model)


def guard_processors(model, quiet: bool = False) -> int:
    """Put back every tuner processor that diffusers replaced; returns how many were restored."""
    restored = 0
    for name, (attn, processor) in _installed(model).items():
        if attn.processor is not processor:
            processor.backend = "xformers" if "XFormers" in type(attn.processor).__name__ else "sdpa"
            if not quiet:
                logger.warning("restune: %s lost its tuner processor to %s; restored it (backend %s)",
                               name, type(attn.processor).__name__, processor.backend)
            attn.set_processor(processor)
            restored += 1
    return restored


def set_attention_backend(model, backend: str = "auto") -> str:
    """Switch a UNet (tuned or not) to xformers or SDPA attention, keeping every tuner; returns the backend used."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    backend = resolve_backend(backend)
    if backend == "xformers":
        model.enable_xformers_memory_efficient_attention()
    else:
        model.set_attn_processor(AttnProcessor2_0())
    guard_processors(model, quiet=True)  # replaced on purpose just above
    for _, processor in _installed(model).values():
        processor.backend = backend
    return backend
