"""Res-Tuning-Bypass: a ladder of Res-Adapters beside a backbone that runs without autograd (METHOD.md §2).

The ladder, in residual form so that it equals the frozen model at initialisation:

    x_0^b = x_0
    x_l^b = x_l + lam_l * h_l(x_l) + (1 - lam_l) * v_l(P_l(up(x_{l-1}^b)))      l = 1..L

`x_l` are the frozen stem features (computed under no_grad, so detached); h_l, v_l are zero-initialised
Res-Adapters, `up` nearest upsampling and `P_l` a 1x1 projection where the channels change. This is the paper's
`lam H(x_l) + (1 - lam) V(x_{l-1}^b)` with H = identity + h and the vertical branch written as a correction.
The final `x_L^b` replaces the backbone's final feature.
"""

import torch
import torch.nn.functional as F
from torch import nn

from restune_sd.config import BypassSpec
from restune_sd.sites import hidden_input
from restune_sd.tuners import GroupedLinear, ResAdapter, _channels_back, _channels_last


class BypassLadder(nn.Module):
    """The ladder over L stems with channel widths `channels` (the root has `root_channels`)."""

    def __init__(self, root_channels: int, channels: list[int], spec: BypassSpec):
        super().__init__()

        def adapter(c):
            return ResAdapter(c, spec.bottleneck or c // spec.reduction, groups=spec.groups)

        self.horizontal = nn.ModuleList(adapter(c) for c in channels)
        self.vertical = nn.ModuleList(adapter(c) for c in channels)
        widths = [root_channels, *channels]
        self.project = nn.ModuleList(
            nn.Identity() if c_in == c_out else GroupedLinear(c_in, c_out) for c_in, c_out in zip(widths, widths[1:])
        )
        self.lam = nn.Parameter(torch.full((len(channels),), float(spec.lam)))

    def forward(self, root: torch.Tensor, stems: list[torch.Tensor]) -> torch.Tensor:
        if len(stems) != len(self.horizontal):
            raise RuntimeError(f"bypass expected {len(self.horizontal)} stem features, got {len(stems)}")
        xb = root
        for lam, h, v, project, x in zip(self.lam, self.horizontal, self.vertical, self.project, stems):
            if x.ndim == 4 and xb.shape[-2:] != x.shape[-2:]:
                xb = F.interpolate(xb, size=x.shape[-2:], mode="nearest")
            xb = _channels_back(project(_channels_last(xb).to(self.lam.dtype)), xb)
            xb = x + (lam * h(x) + (1 - lam) * v(xb)).to(x.dtype)
        return xb


class Bypass(nn.Module):
    """Attaches a BypassLadder to a backbone with hooks: grad off at `entry`, features captured at `root` and
    `stems`, grad back on and the ladder's output substituted at `target`'s input."""

    def __init__(self, ladder: BypassLadder):
        super().__init__()
        self.ladder = ladder
        self._root = None
        self._stems = []
        self._grad_was = []
        self._handles = []

    def attach(self, entry: nn.Module, root: nn.Module, stems: list[nn.Module], target: nn.Module) -> "Bypass":
        hooks = [
            entry.register_forward_pre_hook(self._enter),
            entry.register_forward_hook(self._leave, always_call=True),
            root.register_forward_pre_hook(self._capture_root, with_kwargs=True),
            target.register_forward_pre_hook(self._substitute),
        ]
        hooks += [stem.register_forward_hook(self._capture_stem) for stem in stems]
        self._handles.extend(hooks)
        return self

    def _enter(self, module, args):
        self._grad_was.append(torch.is_grad_enabled())
        self._root, self._stems = None, []
        torch.set_grad_enabled(False)  # the backbone saves no activations and gets no gradient

    def _capture_root(self, module, args, kwargs):
        self._root = hidden_input(args, kwargs)

    def _capture_stem(self, module, args, output):
        self._stems.append(output[0] if isinstance(output, tuple) else output)

    def _substitute(self, module, args):
        if not self._grad_was:  # the target called on its own, outside a backbone forward
            return None
        torch.set_grad_enabled(self._grad_was[-1])
        root, stems, self._root, self._stems = self._root, self._stems, None, []
        return (self.ladder(root, stems), *args[1:])

    def _leave(self, module, args, output):
        torch.set_grad_enabled(self._grad_was.pop())
        self._root, self._stems = None, []
