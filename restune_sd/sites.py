"""Containers that attach tuners beside a frozen module through forward hooks, keeping its state-dict keys.

`AdapterSite` adds adapter branches to a module's output (reading its input: Res-Adapter; or its output: the
sequential Adapter). `ViTAttentionTokens` adds prefix/prompt branches inside a transformers ViT attention,
between its softmax attention and its frozen output projection.
"""

import torch
from torch import nn

from restune_sd.tuners import merge_heads, mix_unbound, split_heads


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a module was called with, whether positional or passed as `hidden_states=`."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _add_to_output(output, branch):
    if isinstance(output, tuple):
        return (output[0] + branch, *output[1:])
    return output + branch


class AdapterSite(nn.Module):
    """Adapters beside (reads="input") or after (reads="output") a frozen module: `out = OP(x) + sum_k A_k(.)`."""

    def __init__(self, reads: str = "input"):
        super().__init__()
        self.reads = reads
        self.adapters = nn.ModuleList()
        self._handles = []

    def attach(self, module: nn.Module) -> "AdapterSite":
        self._handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def _hook(self, module, args, kwargs, output):
        if self.reads == "input":
            x = hidden_input(args, kwargs)
        else:
            x = output[0] if isinstance(output, tuple) else output
        return _add_to_output(output, sum(adapter(x) for adapter in self.adapters))


class ViTAttentionTokens(nn.Module):
    """Prefix/prompt tuners inside a transformers ViT attention layer (q_proj/k_proj/v_proj/o_proj).

    Hooks capture Q (and K, V when a lambda-gated tuner needs the frozen scores) from the frozen projections;
    a pre-hook on `o_proj` adds the branches to the attention output, so they pass through the frozen `W_o`.
    The captured tensors are dropped as soon as they are used, so nothing is held between forwards.
    """

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads
        self.tokens = nn.ModuleList()
        self._captured = {}
        self._handles = []

    def attach(self, attention: nn.Module) -> "ViTAttentionTokens":
        self._attention = [attention]  # a list keeps it out of this module's children
        for name in ("q_proj", "k_proj", "v_proj"):
            proj = getattr(attention, name)
            self._handles.append(proj.register_forward_hook(lambda m, a, out, key=name: self._captured.__setitem__(key, out)))
        self._handles.append(attention.o_proj.register_forward_pre_hook(self._add_branches))
        return self

    def _add_branches(self, o_proj, args):
        captured, self._captured = self._captured, {}
        attention = self._attention[0]
        main = split_heads(args[0], self.heads)
        q = split_heads(captured["q_proj"], self.heads)
        k = split_heads(captured["k_proj"], self.heads)
        v = split_heads(captured["v_proj"], self.heads)
        out = mix_unbound(q, k, v, main, self.tokens, attention.k_proj, attention.v_proj, self.heads)
        return (merge_heads(out).to(args[0].dtype), *args[1:])
