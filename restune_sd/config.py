"""Tuning configs: typed dataclasses validated on construction, read from YAML/JSON, and the named presets.

A `TuningConfig` says which tuners go where; `preset(name, backbone)` gives the recipes that reproduce the
paper's budgets (README, "Presets"). Every field carries its help text in `metadata["help"]`.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from restune_sd.errors import UserError

UNBOUND_KINDS = ("res-adapter", "res-prefix", "res-prompt")
BOUND_KINDS = ("adapter", "prefix", "prompt")
SITES = ("self_attn", "cross_attn", "attn", "ffn", "block")
BACKBONES = ("unet", "vit")


def _help(text: str, default=dataclasses.MISSING, default_factory=dataclasses.MISSING):
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class TunerSpec:
    """One kind of tuner placed at one site of every matching transformer block."""

    kind: str = _help(f"tuner kind: one of {', '.join(UNBOUND_KINDS + BOUND_KINDS)}")
    site: str = _help(f"where beside the frozen block it sits: one of {', '.join(SITES)} (attn = self and cross)")
    blocks: str = _help("regex (full match) or name suffix of the transformer-block paths to tune", ".*")
    dim: int = _help("bottleneck L for adapters, number of tokens l for prefix/prompt", 10)
    scale: float | None = _help("initial value of the learnable scale s (default: 1 for adapters/prefix, 0 for prompt)", None)
    gate: str = _help("'scale' (free learnable s) or 'lambda' (exact softmax split; prefix/prompt only)", "scale")
    groups: int = _help("channel groups of the adapter's projections", 1)

    def __post_init__(self):
        if self.kind not in UNBOUND_KINDS + BOUND_KINDS:
            raise UserError(f"unknown tuner kind {self.kind!r}: use one of {', '.join(UNBOUND_KINDS + BOUND_KINDS)}")
        if self.site not in SITES:
            raise UserError(f"unknown site {self.site!r} for {self.kind}: use one of {', '.join(SITES)}")
        if self.kind.endswith(("prefix", "prompt")) and self.site not in ("self_attn", "cross_attn", "attn"):
            raise UserError(f"{self.kind} lives beside attention: set site to self_attn, cross_attn or attn, not {self.site!r}")
        if self.gate not in ("scale", "lambda"):
            raise UserError(f"gate must be 'scale' or 'lambda', not {self.gate!r}")
        if self.gate == "lambda" and self.kind not in ("res-prefix", "res-prompt"):
            raise UserError(f"gate 'lambda' applies to res-prefix and res-prompt only, not {self.kind}")
        if self.dim < 1 or self.groups < 1:
            raise UserError(f"{self.kind}: dim and groups must be positive (got dim={self.dim}, groups={self.groups})")


@dataclass
class LoraSpec:
    """LoRA through PEFT on the named linear layers."""

    rank: int = _help("LoRA rank r", 4)
    alpha: float | None = _help("LoRA alpha (default: equal to the rank, a scale of 1)", None)
    targets: list[str] | None = _help("module-name suffixes or a regex; default: the backbone's attention projections", None)

    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"LoRA rank must be positive, got {self.rank}")


@dataclass
class BypassSpec:
    """Res-Tuning-Bypass: a ladder of horizontal and vertical Res-Adapters beside a backbone run without autograd."""

    bottleneck: int = _help("adapter bottleneck; 0 means channels // reduction", 0)
    reduction: int = _help("with bottleneck 0: hidden width = channels // reduction", 2)
    groups: int = _help("channel groups of every adapter projection", 1)
    lam: float = _help("initial mix lambda between horizontal and vertical branches", 0.5)

    def __post_init__(self):
        if self.bottleneck < 0 or self.reduction < 1 or self.groups < 1:
            raise UserError("bypass: bottleneck must be >= 0, reduction and groups >= 1")


@dataclass
class TuningConfig:
    """Everything that says how a frozen backbone is tuned; saved as JSON next to every tuner."""

    name: str = _help("a label: the preset's name or 'custom'", "custom")
    tuners: list[TunerSpec] = _help("unbound or bound tuners beside blocks", default_factory=list)
    lora: LoraSpec | None = _help("LoRA through PEFT", None)
    bypass: BypassSpec | None = _help("Res-Tuning-Bypass ladder", None)
    full: bool = _help("train every backbone parameter (full fine-tuning)", False)
    train_head: bool = _help("classifiers: train the classification head", True)

    def __post_init__(self):
        self.tuners = [t if isinstance(t, TunerSpec) else _build(TunerSpec, t, "tuners[]") for t in self.tuners]
        if isinstance(self.lora, dict):
            self.lora = _build(LoraSpec, self.lora, "lora")
        if isinstance(self.bypass, dict):
            self.bypass = _build(BypassSpec, self.bypass, "bypass")
        if self.bypass and (self.tuners or self.lora or self.full):
            raise UserError("bypass runs the backbone without autograd: it cannot be combined with tuners inside it")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TuningConfig":
        return _build(cls, data, "config")


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as error:
        raise UserError(f"{where}: {error}") from None


def load_config(path) -> TuningConfig:
    """Read a TuningConfig from a YAML or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tuner config {path} does not exist: pass a YAML or JSON file")
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise UserError(f"tuner config {path} is not valid {path.suffix.lstrip('.').upper()}: {error}".splitlines()[0]) from None
    data.setdefault("name", path.stem)
    return TuningConfig.from_dict(data)


# The recipes behind each preset. SD v1.5 (16 transformer blocks: 5 at 320, 5 at 640, 6 at 1280 channels):
#   res-tuning: Res-Adapter L=97 beside every FFN (2,485,072) + Res-Prefix l=4 beside every self-attention (99,840)
#   bypass:     5 rungs of grouped Res-Adapters (4 groups, hidden C/2) + 1x1 projections 1280->640->320
#   adapter:    sequential Adapter L=100 after every FFN (the paper's 2.51M)
#   prefix:     prefix tuning l=100 on all 32 attentions (the paper's 4.99M)
#   prompt:     prompt tuning l=100 on the 16 self-attentions (the paper's 1.25M)
#   lora:       r=4 on to_q/to_k/to_v/to_out.0 of all 32 attentions (797,184)
# ViT-B/16 (12 layers of 768): res-tuning = Res-Adapter L=10 (FFN) + Res-Prefix l=10 + Res-Prompt l=10 (attention);
#   bypass = 12 horizontal + 12 vertical Res-Adapters L=10; lora = r=8 on q_proj/v_proj; linear = the head alone.
_PRESETS = {
    "unet": {
        "res-tuning": dict(tuners=[dict(kind="res-adapter", site="ffn", dim=97), dict(kind="res-prefix", site="self_attn", dim=4)]),
        "bypass": dict(bypass=dict(reduction=2, groups=4)),
        "adapter": dict(tuners=[dict(kind="adapter", site="ffn", dim=100)]),
        "prefix": dict(tuners=[dict(kind="prefix", site="attn", dim=100)]),
        "prompt": dict(tuners=[dict(kind="prompt", site="self_attn", dim=100)]),
        "lora": dict(lora=dict(rank=4)),
        "full": dict(full=True),
    },
    "vit": {
        "res-tuning": dict(tuners=[dict(kind="res-adapter", site="ffn", dim=10), dict(kind="res-prefix", site="attn", dim=10),
                                   dict(kind="res-prompt", site="attn", dim=10)]),
        "bypass": dict(bypass=dict(bottleneck=10)),
        "adapter": dict(tuners=[dict(kind="adapter", site="ffn", dim=10)]),
        "prefix": dict(tuners=[dict(kind="prefix", site="attn", dim=10)]),
        "prompt": dict(tuners=[dict(kind="prompt", site="attn", dim=10)]),
        "lora": dict(lora=dict(rank=8, targets=["q_proj", "v_proj"])),
        "full": dict(full=True),
        "linear": dict(),
    },
}


def preset_names(backbone: str) -> list[str]:
    return list(_PRESETS[backbone])


def preset(name: str, backbone: str) -> TuningConfig:
    """The named recipe for a backbone kind ('unet' or 'vit')."""
    if name not in _PRESETS[backbone]:
        raise UserError(f"unknown tuner {name!r} for a {backbone}: use one of {', '.join(_PRESETS[backbone])} or a config file")
    return TuningConfig.from_dict(dict(name=name, **json.loads(json.dumps(_PRESETS[backbone][name]))))


def resolve_tuner(name_or_path: str, backbone: str) -> TuningConfig:
    """A preset name, or a path to a YAML/JSON config file."""
    if name_or_path in _PRESETS[backbone]:
        return preset(name_or_path, backbone)
    if Path(name_or_path).suffix in (".yaml", ".yml", ".json") or Path(name_or_path).exists():
        return load_config(name_or_path)
    raise UserError(f"unknown tuner {name_or_path!r}: use one of {', '.join(_PRESETS[backbone])} or a YAML/JSON config file")
