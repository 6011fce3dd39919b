"""Many classification tasks on one frozen ViT: bypass tuners share a single backbone forward per batch.

A Res-Tuning-Bypass task needs only the frozen backbone's features (the first layer's input and every layer's
output), so one forward serves every task's ladder and head. Tuners of other kinds change the backbone itself and
run on a copy of their own.
"""

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from restune_sd.bypass import BypassLadder, Tap
from restune_sd.config import TuningConfig
from restune_sd.inject import class_token, vit_ladder
from restune_sd.io import load_tuner, read_fitting_tuner, read_weights

LADDER = "restune_bypass.ladder."
HEAD = "classifier."


@dataclass
class Task:
    """One tuner: a ladder and a head beside the shared backbone, or (other kinds) a tuned copy of the backbone."""

    name: str
    id2label: dict[int, str]
    ladder: BypassLadder | None = None
    head: nn.Linear | None = None
    model: nn.Module | None = field(default=None, repr=False)


def _bypass_task(backbone, name: str, folder, meta: dict) -> Task:
    state = read_weights(folder, meta)
    ladder = vit_ladder(backbone, TuningConfig.from_dict(meta["tuning"]).bypass)
    ladder.load_state_dict({k.removeprefix(LADDER): v for k, v in state.items() if k.startswith(LADDER)})
    head = nn.Linear(backbone.config.hidden_size, meta["head"]["num_labels"])
    head.load_state_dict({k.removeprefix(HEAD): v for k, v in state.items() if k.startswith(HEAD)})
    device = next(backbone.parameters()).device
    id2label = {int(k): v for k, v in meta["head"]["id2label"].items()}
    return Task(name, id2label, ladder.to(device).eval(), head.to(device).eval())


class MultiTask:
    """Runs every task's tuner on a batch; bypass tasks share one no-grad forward of `backbone` (left untouched)."""

    def __init__(self, backbone, tuners: dict[str, str]):
        self.backbone = backbone.eval()
        self.tasks = []
        for name, path in tuners.items():
            folder, meta = read_fitting_tuner(path, backbone)
            if meta["tuning"].get("bypass") and "head" in meta:
                self.tasks.append(_bypass_task(backbone, name, folder, meta))
            else:
                model = load_tuner(copy.deepcopy(backbone), folder).eval()
                self.tasks.append(Task(name, dict(model.config.id2label), model=model))
        self._tap = Tap(select=class_token)  # the ladders read the class token alone: only it is kept
        layers = list(backbone.vit.layers)
        self._handles = self._tap.attach(layers[0], layers) if self.shared else []

    @property
    def shared(self) -> list[Task]:
        return [task for task in self.tasks if task.ladder is not None]

    @property
    def separate(self) -> list[Task]:
        return [task for task in self.tasks if task.ladder is None]

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per task name, in the order the tuners were given."""
        logits = {}
        if self.shared:
            self.backbone.vit(pixel_values)  # one frozen forward; the tap keeps what the ladders read
            root, stems = self._tap.take()
            for task in self.shared:
                hidden = self.backbone.vit.layernorm(task.ladder(root, stems))
                logits[task.name] = task.head(hidden[:, 0])
        for task in self.separate:
            logits[task.name] = task.model(pixel_values=pixel_values).logits
        return {task.name: logits[task.name] for task in self.tasks}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
