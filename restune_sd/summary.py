"""Parameter counts of a tuned model: tuner, trainable and total, with a per-module breakdown."""

import re

from restune_sd.inject import unwrap


def _group(name: str) -> str:
    """The tuner module a parameter belongs to: a restune_* site, a processor, a LoRA-wrapped layer, or a top-level block."""
    for pattern in (r"^(.*?restune_[a-z0-9_]+)\.", r"^(.*?\.processor)\.", r"^(.*?)\.lora_"):
        found = re.match(pattern, name)
        if found:
            return found.group(1)
    return ".".join(name.split(".")[:2])


def parameter_summary(model) -> dict:
    """`tuner_params` (the head excluded), `head_params`, `trainable_params`, `total_params` and `modules`."""
    model = unwrap(model)
    tuned = getattr(model, "restune", None)
    tuner_names = set(tuned.param_names) if tuned else set()
    head_names = set(tuned.head_names) if tuned else set()
    params = dict(model.named_parameters())
    modules: dict[str, int] = {}
    for name in (n for n in params if n in tuner_names or n in head_names):  # in module order
        modules[_group(name)] = modules.get(_group(name), 0) + params[name].numel()
    return {
        "tuner": tuned.config.name if tuned else None,
        "tuner_params": sum(params[n].numel() for n in tuner_names),
        "head_params": sum(params[n].numel() for n in head_names),
        "trainable_params": sum(p.numel() for p in params.values() if p.requires_grad),
        "total_params": sum(p.numel() for p in params.values()),
        "modules": [{"module": k, "params": v} for k, v in modules.items()],
    }
