"""Res-Tuning-Bypass: a ladder of Res-Adapters beside a backbone that runs without autograd (docs/method.md §2).

`x_l` are the frozen stem features (computed under no_grad, so detached), `x_0` the root, `h_l`/`v_l` the
horizontal/vertical Res-Adapters (zero-initialised up-projections), `up` nearest upsampling and `P_l` a 1x1
projection where the channels change (identity elsewhere). Two forms (`BypassSpec.form`):

- `correction` (default; this project's): the ladder carries its accumulated correction `d_l = x_l^b - x_l`
  from stage to stage, so the bypass state reaches the target by an identity path, and the output equals the
  frozen model's at initialisation:

      d_0 = 0,   d_l = P_l(up(d_{l-1})) + lam_l h_l(x_l) + (1 - lam_l) v_l(P_l(up(x_{l-1}^b))),   x_l^b = x_l + d_l

- `paper`: the paper's `x_l^b = lam_l H_l(x_l) + (1 - lam_l) V_l(P_l(up(x_{l-1}^b)))` with `H = id + h` and
  `V = id + v`, as the authors' public code builds its adapters; at initialisation it is a mix of the stems,
  not the frozen model's output.

Both start from `x_0^b = x_0`; the final `x_L^b` replaces the backbone's final feature. In either form every
stage's adapters and every projection get a gradient at the first step; the `correction` form's lambdas,
adapter down-projections and scales multiply branches that are zero at initialisation, so they get theirs from
the second step on (as LoRA's A matrix does).
"""

import torch
import torch.nn.functional as F
from torch import nn

from restune_sd.config import BypassSpec
from restune_sd.kernels import PlainKernels
from restune_sd.sites import hidden_input
from restune_sd.tuners import GroupedLinear, ResAdapter


class BypassLadder(nn.Module):
    """The ladder over L stems with channel widths `channels` (the root has `root_channels`).

    The adapters keep separate weights per channel group with a hidden width of C/2 (grouped 1x1 convs). The
    authors' code expands x2 inside each group instead; both give `C^2/4 + 3C/4` parameters for 4 groups, and
    the grouped bottleneck is the adapter the rest of the project uses.
    """

    def __init__(self, root_channels: int, channels: list[int], spec: BypassSpec):
        super().__init__()

        def adapter(c):
            return ResAdapter(c, spec.bottleneck or c // spec.reduction, groups=spec.groups)

        self.form = spec.form
        self.horizontal = nn.ModuleList(adapter(c) for c in channels)
        self.vertical = nn.ModuleList(adapter(c) for c in channels)
        widths = [root_channels, *channels]
        self.project = nn.ModuleList(
            nn.Identity() if c_in == c_out else GroupedLinear(c_in, c_out) for c_in, c_out in zip(widths, widths[1:])
        )
        self.lam = nn.Parameter(torch.full((len(channels),), float(spec.lam)))

    def _bring(self, project: nn.Module, state: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`P_l(up(state))`: the previous stage's tensor at this stem's resolution and width.

        Computed as `up(P_l(state))`, the same map (a 1x1 projection commutes with nearest upsampling) at a quarter of
        the cost, and what it keeps for backward is the smaller tensor.
        """
        state = project(state)
        if state.ndim == 4 and state.shape[-2:] != like.shape[-2:]:
            state = F.interpolate(state, size=like.shape[-2:], mode="nearest")
        return state

    def forward(self, root: torch.Tensor, stems: list[torch.Tensor]) -> torch.Tensor:
        if len(stems) != len(self.horizontal):
            raise RuntimeError(f"bypass expected {len(self.horizontal)} stem features, got {len(stems)}")
        dtype = self.lam.dtype  # the ladder runs in its own (fp32) precision whatever the backbone's
        state = root.to(dtype)
        correction = torch.zeros_like(state)
        for lam, h, v, project, stem in zip(self.lam, self.horizontal, self.vertical, self.project, stems):
            x = stem.to(dtype)
            below = self._bring(project, state, x)
            if self.form == "paper":
                state = lam * (x + h(x)) + (1 - lam) * (below + v(below))
            else:
                correction = self._bring(project, correction, x) + h(x, lam) + v(below, 1 - lam)
                state = x + correction
        return state.to(stems[-1].dtype)


class Tap:
    """Keeps what one backbone forward shows a ladder: the root's input and every stem's output, in order.

    With `select`, only the selected part is kept (a ViT's class token), so the backbone's full hidden states are
    freed as its forward goes on instead of being held until the ladder runs.
    """

    def __init__(self, select=None):
        self.select = select or (lambda hidden: hidden)
        self.root = None
        self.stems = []

    def attach(self, root: nn.Module, stems: list[nn.Module]) -> list:
        return [root.register_forward_pre_hook(self._capture_root, with_kwargs=True),
                *(stem.register_forward_hook(self._capture_stem) for stem in stems)]

    def _capture_root(self, module, args, kwargs):
        self.root, self.stems = self.select(hidden_input(args, kwargs)), []

    def _capture_stem(self, module, args, output):
        self.stems.append(self.select(output[0] if isinstance(output, tuple) else output))

    def take(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The features captured since the root ran; the tap is empty afterwards, so nothing outlives a forward."""
        taken, self.root, self.stems = (self.root, self.stems), None, []
        return taken


class Bypass(nn.Module):
    """Attaches a BypassLadder to a backbone with hooks: grad off at `entry`, features tapped at `root` and `stems`,
    grad back on and the ladder's output substituted at `target`'s input.

    `select` picks what the ladder runs on (ViT classifiers: the class token alone, since the ladder works token
    by token and the head reads only that token); the substituted feature is what it returns. A stacked bypass
    (restune_sd.stacking; UNet only) has a `strength` w and instead adds w times its contribution, `ladder - x_L`, to
    the target's input, so several bypasses add up; alone at w = 1 its output is the ladder's, as unstacked.
    """

    def __init__(self, ladder: BypassLadder, select=None):
        super().__init__()
        self.ladder = ladder
        self._tap = Tap(select)
        self.strength = None  # None: replace the target's input (unstacked); a number: a stacked bypass's weight
        self._grad_was = []
        self._plain = []  # per frozen forward in progress: whether it still counts in the kernels' `active`
        self._kernels = None
        self._handles = []

    def attach(self, entry: nn.Module, root: nn.Module, stems: list[nn.Module], target: nn.Module,
               plain_kernels: bool = False) -> "Bypass":
        """Hooks on `entry` (grad off), `root` and `stems` (taps) and `target` (the ladder's output); with
        `plain_kernels`, a training step's frozen forward runs heavy-weight CPU convolutions without oneDNN
        (kernels.py; measured on SD)."""
        self._handles += [
            entry.register_forward_pre_hook(self._enter),
            entry.register_forward_hook(self._leave, always_call=True),
            target.register_forward_pre_hook(self._substitute),
            *self._tap.attach(root, stems),
        ]
        self._kernels = PlainKernels.for_backbone(entry, self.ladder) if plain_kernels else PlainKernels()
        return self

    @property
    def select(self):
        """What the ladder runs on, taken from each tapped feature as it is captured."""
        return self._tap.select

    @select.setter
    def select(self, select) -> None:
        self._tap.select = select or (lambda hidden: hidden)

    def _enter(self, module, args):
        self._grad_was.append(torch.is_grad_enabled())
        self._tap.take()
        torch.set_grad_enabled(False)  # the backbone saves no activations and gets no gradient
        training = self._grad_was[-1]  # sampling keeps oneDNN, so it draws exactly what a stock pipeline draws
        self._kernels.active += training
        self._plain.append(training)

    def _end_frozen(self) -> None:
        if self._plain and self._plain[-1]:
            self._kernels.active -= 1
            self._plain[-1] = False

    def _substitute(self, module, args):
        if not self._grad_was:  # the target called on its own, outside a backbone forward
            return None
        torch.set_grad_enabled(self._grad_was[-1])
        self._end_frozen()
        root, stems = self._tap.take()
        out = self.ladder(root, stems)
        if self.strength is None or (self.strength == 1.0 and args[0] is stems[-1]):  # nothing added before it
            return (out, *args[1:])
        return (args[0] + self.strength * (out - stems[-1]), *args[1:])

    def _leave(self, module, args, output):
        torch.set_grad_enabled(self._grad_was.pop())
        self._end_frozen()
        self._plain.pop()
        self._tap.take()
