"""The tuners themselves: plain nn.Modules that read a frozen operation's input and return a branch to add.

Res-Adapter, Res-Prefix and Res-Prompt follow docs/method.md §1 (`out = OP(x) + sum_k ResTuner_k(x)`);
the bound originals reuse the same parameter containers with the original wiring.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from restune_sd.errors import UserError


class GroupedLinear(nn.Module):
    """A linear map over channels, block-diagonal in `groups` groups (a grouped 1x1 conv).

    Tokens (..., C) go through `F.linear` (one group) or a grouped einsum; feature maps (B, C, H, W) through a 1x1
    `conv2d` in place, so no channels-last copy of the input is made or kept for backward.
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1, bias: bool = True):
        super().__init__()
        if in_features % groups or out_features % groups:
            raise UserError(f"groups={groups} must divide both the width {in_features} and {out_features}: choose groups that do")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, in_features // groups, out_features // groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        bound = 1 / math.sqrt(in_features // groups)  # nn.Linear's default init, per group
        nn.init.uniform_(self.weight, -bound, bound)

    def matrix(self) -> torch.Tensor:
        """The weight as (out, in / groups), output channels in group order: F.linear's and conv2d's layout."""
        return self.weight.transpose(1, 2).flatten(0, 1)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x` through this map, or through `weight`/`bias` given in `matrix()`'s layout (e.g. with a gain folded in)."""
        if weight is None:
            weight, bias = self.matrix(), self.bias
        if x.ndim == 4:
            return F.conv2d(x, weight[..., None, None], bias, groups=self.groups)
        if self.groups == 1:
            return F.linear(x, weight, bias)
        y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (self.groups, -1)), weight.unflatten(0, (self.groups, -1)))
        return y.flatten(-2) + bias if bias is not None else y.flatten(-2)


class ResAdapter(nn.Module):
    """`s * W_up(GELU(W_down x + b_down)) + b_up` over channels; zero-initialised W_up, b_up give a zero branch.

    Works on tokens (..., C) and on feature maps (B, C, H, W). Parameters: 2*C*L/groups + L + C + 1 (the scale).
    A `gain` (the bypass's lambda) multiplies the branch; it and `s` are folded into W_up and b_up, so no
    full-width tensor is kept for their gradients, only the bottleneck activations. `strength` (1: none) is a stacked
    tuner's weight (restune_sd.stacking), folded in the same way.
    """

    def __init__(self, channels: int, bottleneck: int, groups: int = 1, scale: float = 1.0):
        super().__init__()
        self.down = GroupedLinear(channels, bottleneck, groups)
        self.up = GroupedLinear(bottleneck, channels, groups, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels))  # b_up, outside the scale as in docs/method.md §1
        self.act = nn.GELU()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.strength = 1.0
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.act(self.down(x.to(self.down.weight.dtype)))
        if self.strength != 1.0:
            gain = self.strength if gain is None else gain * self.strength
        up_gain, bias = (self.scale, self.bias) if gain is None else (self.scale * gain, self.bias * gain)
        return self.up(hidden, self.up.matrix() * up_gain, bias).to(x.dtype)


def _free_scale(scale: float, gate: str) -> nn.Parameter | None:
    """The learnable scale `s` of a free-scale branch; gated and bound tuners mix by softmax weights and have none."""
    return nn.Parameter(torch.tensor(float(scale))) if gate == "scale" else None


class PrefixTokens(nn.Module):
    """Learned key/value tokens `K_pre, V_pre` (length x inner_dim) in the attention's projected space."""

    def __init__(self, length: int, inner_dim: int, scale: float = 1.0, gate: str = "scale"):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(length, inner_dim) * inner_dim**-0.5)
        # Zero values make the free-scale branch exactly zero at step 0 while the keys still get gradients later.
        self.values = nn.Parameter(torch.zeros(length, inner_dim))
        self.scale = _free_scale(scale, gate)
        self.gate = gate
        self.strength = 1.0  # a stacked tuner's weight on its free-scale branch (restune_sd.stacking)

    def keys_values(self, to_k: nn.Module, to_v: nn.Module, dtype: torch.dtype):
        return self.keys.to(dtype), self.values.to(dtype)


class PromptTokens(nn.Module):
    """Learned prompt tokens `P` (length x input_dim), projected by the frozen `W_k, W_v` of the attention.

    The frozen projections may carry a bias, so the free-scale branch starts at scale 0 to be a zero branch.
    """

    def __init__(self, length: int, input_dim: int, scale: float = 0.0, gate: str = "scale"):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(length, input_dim) * 0.02)
        self.scale = _free_scale(scale, gate)
        self.gate = gate
        self.strength = 1.0  # a stacked tuner's weight on its free-scale branch (restune_sd.stacking)

    def keys_values(self, to_k: nn.Module, to_v: nn.Module, dtype: torch.dtype):
        tokens = self.tokens.to(dtype)
        return to_k(tokens), to_v(tokens)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*dh) -> (B, heads, N, dh)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, dh) -> (B, N, heads*dh)."""
    return x.transpose(1, 2).flatten(2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None):
    """Plain softmax attention that also returns the log-sum-exp of the scores (per query and head)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores.float(), dim=-1, keepdim=True)
    weights = torch.exp(scores.float() - lse).to(v.dtype)
    return weights @ v, lse


def per_head_rows(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """(T, heads*d) token keys or values as a block-diagonal (heads*T, heads*d) matrix: row (h, t) holds token t's
    head-h slice in head h's columns."""
    count, width = tokens.shape
    eye = torch.eye(heads, dtype=tokens.dtype, device=tokens.device)
    return torch.einsum("thd,hg->htgd", tokens.view(count, heads, width // heads), eye).reshape(heads * count, width)


def few_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """`softmax(Q K^T / sqrt(d)) V` per head over a few tokens `k, v` (T, heads*d), with Q and the result in the
    merged (B, N, heads*d) layout: two linear maps through block-diagonal token matrices, so backward keeps Q itself
    (no head-split copy) and the small (B, N, heads*T) weights, never a full-size output."""
    scores = F.linear(q, per_head_rows(k, heads) * (k.shape[-1] // heads) ** -0.5)
    weights = torch.softmax(scores.unflatten(-1, (heads, -1)), dim=-1).flatten(-2)
    return F.linear(weights, per_head_rows(v, heads).t())


def branch_outputs(q: torch.Tensor, tokens: list[nn.Module], to_k, to_v, heads: int) -> list[torch.Tensor]:
    """Each free-scale prefix/prompt tuner's `s * Attn(Q, K_b, V_b)` in (B, heads, N, d), for Q in that layout.

    The scale (times a stacked tuner's strength) multiplies the few value tokens (`Attn(Q, K, s V) = s Attn(Q, K, V)`),
    so no full-size branch output is kept for its gradient.
    """
    merged = merge_heads(q)
    outs = []
    for tuner in tokens:
        k, v = tuner.keys_values(to_k, to_v, q.dtype)
        scale = tuner.scale if tuner.strength == 1.0 else tuner.scale * tuner.strength
        outs.append(split_heads(few_token_attention(merged, k, v * scale.to(v.dtype), heads), heads))
    return outs


def mix_unbound(q, main_k, main_v, main_out, tokens, to_k, to_v, heads, mask=None):
    """Frozen attention output plus every Res-Prefix/Res-Prompt branch, in (B, heads, N, dh).

    Free-scale tuners add `s * Attn(Q, K_b, V_b)` to the untouched frozen output. Tuners with gate="lambda"
    use the exact softmax split of docs/method.md §1, so together they reproduce the bound (concatenated) original:
    `w_0 Attn(Q,K,V) + sum_b w_b Attn(Q,K_b,V_b)` with `w_i = exp(lse_i) / sum_j exp(lse_j)`.
    """
    free = [t for t in tokens if t.gate == "scale"]
    gated = [t for t in tokens if t.gate == "lambda"]
    out = main_out
    if gated:
        main, lse_main = attention_with_lse(q, main_k, main_v, mask)
        parts, lses = [main], [lse_main]
        for tuner in gated:
            k, v = tuner.keys_values(to_k, to_v, q.dtype)
            k = split_heads(k.unsqueeze(0), heads).expand(q.shape[0], -1, -1, -1)
            v = split_heads(v.unsqueeze(0), heads).expand(q.shape[0], -1, -1, -1)
            part, lse = attention_with_lse(q, k, v)
            parts.append(part)
            lses.append(lse)
        weights = torch.softmax(torch.cat(lses, dim=-1), dim=-1).to(q.dtype)
        out = sum(weights[..., i : i + 1] * part for i, part in enumerate(parts))
    for branch in branch_outputs(q, free, to_k, to_v, heads):
        out = out + branch
    return out


def bound_keys_values(k, v, tokens, to_k, to_v, heads):
    """The original (bound) prefix/prompt tuning: prepend the tuners' keys and values to the frozen ones."""
    ks, vs = [k], [v]
    for tuner in tokens:
        tk, tv = tuner.keys_values(to_k, to_v, k.dtype)
        ks.insert(0, split_heads(tk.unsqueeze(0), heads).expand(k.shape[0], -1, -1, -1))
        vs.insert(0, split_heads(tv.unsqueeze(0), heads).expand(v.shape[0], -1, -1, -1))
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)
