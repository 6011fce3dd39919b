"""Tuning configs: typed dataclasses validated on construction, read from YAML/JSON, and the named presets.

A `TuningConfig` says which tuners go where; `preset(name, backbone)` gives the recipes that reproduce the
paper's budgets (README, "Presets"). Every field carries its help text in `metadata["help"]`.
"""

import dataclasses
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from restune_sd.errors import UserError
from restune_sd.files import read_text

# What a received config may ask for: far above the paper's recipes (L <= 100, l <= 100, r <= 8), far below sizes
# that exhaust a machine's memory (dim 2e9 would ask for 128 GB).
FIELD_BOUNDS = {"dim": (1, 4096), "groups": (1, 4096), "rank": (1, 1024), "bottleneck": (0, 4096), "reduction": (1, 4096)}
MAX_PATTERN_LENGTH = 200
# Variable repeats a blocks pattern may hold: with k of them a full match costs at most ~n^k steps on a name of n
# characters, so 4 keeps the worst case well under a second on block names.
MAX_VARIABLE_REPEATS = 4
# What a YAML file's aliases may expand to: far above any config (a few hundred values), far below a "billion laughs"
# (eight nested lists of ten aliases each, 300 bytes that stand for 10**8 values).
MAX_YAML_VALUES = 100_000

UNBOUND_KINDS = ("res-adapter", "res-prefix", "res-prompt")
BOUND_KINDS = ("adapter", "prefix", "prompt")
SITES = ("self_attn", "cross_attn", "attn", "ffn", "block")
BACKBONES = ("unet", "vit")
BYPASS_FORMS = ("correction", "paper")


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
        _check_bounds(self, f"{self.kind}")
        if self.dim % self.groups:
            raise UserError(f"{self.kind}: groups={self.groups} must divide dim={self.dim}")
        if self.scale is not None and not math.isfinite(self.scale):
            raise UserError(f"{self.kind}: scale must be a finite number, not {self.scale}")
        _check_pattern(self.blocks)


@dataclass
class LoraSpec:
    """LoRA through PEFT on the named linear layers."""

    rank: int = _help("LoRA rank r", 4)
    alpha: float | None = _help("LoRA alpha (default: equal to the rank, a scale of 1)", None)
    targets: list[str] | None = _help("module-name suffixes or a regex; default: the backbone's attention projections", None)

    def __post_init__(self):
        _check_bounds(self, "lora")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"lora: alpha must be a positive number, not {self.alpha}")


@dataclass
class BypassSpec:
    """Res-Tuning-Bypass: a ladder of horizontal and vertical Res-Adapters beside a backbone run without autograd."""

    bottleneck: int = _help("adapter bottleneck; 0 means channels // reduction", 0)
    reduction: int = _help("with bottleneck 0: hidden width = channels // reduction", 2)
    groups: int = _help("channel groups of every adapter projection", 1)
    lam: float = _help("initial mix lambda between horizontal and vertical branches", 0.5)
    form: str = _help("'correction' (carries x^b - x from stage to stage; equals the frozen model at init) or "
                      "'paper' (lam*H(x) + (1-lam)*V(x^b) with identity inside H and V)", "correction")

    def __post_init__(self):
        if self.bottleneck < 0 or self.reduction < 1 or self.groups < 1:
            raise UserError("bypass: bottleneck must be >= 0, reduction and groups >= 1")
        if self.form not in BYPASS_FORMS:
            raise UserError(f"bypass: form must be one of {', '.join(BYPASS_FORMS)}, not {self.form!r}")


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
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise UserError(f"{where}: {name} must be {_describe(hints[name])}, not {reprlib.repr(value)}")
    try:
        built = cls(**data)
    except TypeError as error:
        raise UserError(f"{where}: {error}") from None
    _check_bounds(built, where)
    return built


def _fits(value, hint) -> bool:
    """Whether a value read from YAML/JSON has a field's declared type (a bool is not a number; numbers are finite)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) in (list, tuple):
        (arg, *_) = typing.get_args(hint) or (object,)
        return isinstance(value, (list, tuple)) and all(_fits(item, arg) for item in value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint is object or isinstance(value, hint)


def _describe(hint) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    names = {int: "a whole number", float: "a finite number", str: "a string", bool: "true or false", type(None): "null"}
    if typing.get_origin(hint) in (list, tuple):
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
    return names.get(hint, f"a mapping of {getattr(hint, '__name__', hint)} fields")


def _check_bounds(spec, where: str) -> None:
    for name, (low, high) in FIELD_BOUNDS.items():
        value = getattr(spec, name, None)
        if isinstance(value, int) and not low <= value <= high:
            raise UserError(f"{where}: {name} must be between {low} and {high}, not {value}")


def _check_pattern(pattern: str) -> None:
    """Refuse a blocks regex that could backtrack without end: a repeat or alternation inside a repeat, or many repeats."""
    try:
        import re._constants as sre
        import re._parser as sre_parse
    except ImportError:  # Python 3.10
        import sre_constants as sre
        import sre_parse

    if len(pattern) > MAX_PATTERN_LENGTH:
        raise UserError(f"blocks pattern is {len(pattern)} characters long; keep it under {MAX_PATTERN_LENGTH}")
    try:
        tree = sre_parse.parse(pattern)
    except re.error as error:
        raise UserError(f"blocks pattern {pattern!r} is not a valid regex: {error}") from None
    variable = 0
    repeats = (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None))

    def walk(items, in_repeat: bool) -> None:
        nonlocal variable
        for op, arg in items:
            if op in repeats:
                low, high, sub = arg
                if in_repeat and high > 1:
                    raise UserError(f"blocks pattern {pattern!r} nests one repeat inside another, which can backtrack "
                                    "without end: write it without nested repeats (e.g. 'up_blocks\\..*')")
                variable += high != low
                walk(sub, in_repeat or high > 1)
            elif op is sre.BRANCH:
                if in_repeat:
                    raise UserError(f"blocks pattern {pattern!r} repeats an alternation, which can backtrack without "
                                    "end: list the alternatives outside the repeat")
                for branch in arg[1]:
                    walk(branch, in_repeat)
            elif op is sre.SUBPATTERN:
                walk(arg[-1], in_repeat)
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                walk(arg[1], in_repeat)
            elif op is getattr(sre, "ATOMIC_GROUP", None):
                walk(arg, in_repeat)

    walk(tree, False)
    if variable > MAX_VARIABLE_REPEATS:
        raise UserError(f"blocks pattern {pattern!r} has {variable} variable repeats; use at most "
                        f"{MAX_VARIABLE_REPEATS} so that matching stays fast")


class AliasBomb(yaml.YAMLError):
    """A YAML document whose aliases refer to themselves or expand beyond MAX_YAML_VALUES values."""


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts what a document's aliases (*name) expand to before it builds anything."""

    def construct_document(self, node):
        expanded_size(node, {}, set())
        return super().construct_document(node)


def expanded_size(node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for with every alias written out; each node is measured once, so a bomb is cheap."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise AliasBomb("an alias refers to itself (it is used inside its own anchor)")
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    size = 1 + sum(expanded_size(child, sizes, open_nodes) for child in children)
    if size > MAX_YAML_VALUES:
        raise AliasBomb(f"its aliases (*name) would expand to more than {MAX_YAML_VALUES:,} values: write the values out")
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


def read_mapping(path, what: str, example: str, expected: type = dict) -> dict | list:
    """A YAML (.yaml/.yml) or JSON file holding one mapping (`expected=list`: one list), read safely; `what` and
    `example` word the errors."""
    path = Path(path)
    text = read_text(path, what, "pass a YAML or JSON file")
    try:
        data = yaml.load(text, Loader=BoundedLoader) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except AliasBomb as error:
        raise UserError(f"{what} {path} is refused: {error}") from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to read: a config needs a few levels at most") from None
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {error}".splitlines()[0]) from None
    if data is None:
        raise UserError(f"{what} {path} is empty: give at least {example}")
    if not isinstance(data, expected):
        held = "a mapping of fields" if expected is dict else "a list"
        raise UserError(f"{what} {path} holds a {type(data).__name__}, not {held} such as {example}")
    return data


def load_config(path) -> TuningConfig:
    """Read a TuningConfig from a YAML or JSON file."""
    data = read_mapping(path, "tuner config", "one of tuners, lora, bypass or full")
    data.setdefault("name", Path(path).stem)
    return TuningConfig.from_dict(data)


# What a run's config.json holds beside its settings: read back as --config, these are passed over.
RUN_RECORD_KEYS = ("tuning", "num_processes", "dataset_size", "total_steps", "attention_backend", "tuner_params",
                   "head_params", "trainable_params", "total_params", "image_mean", "image_std", "resize_crop",
                   "latent_cache", "class_images", "class_images_generated")


def read_run_settings(path, fields: set[str], aliases: dict[str, tuple[str, bool]] | None = None) -> dict:
    """Settings for a run from a YAML/JSON file (`--config`): names as the settings' or the options' (dashes or
    underscores). `aliases` maps an option's other names to (setting, negated), e.g. validation_prompt ->
    (validation_prompts, False) and no_center_crop -> (center_crop, True).

    A run's own config.json is accepted as it is (its record of the run is passed over, and it never resumes), so a
    run can be repeated from it; any other name that is not a setting is refused.
    """
    aliases = aliases or {}
    data = read_mapping(path, "run config", "model: ..., data: ..., output: ...")
    is_run_record = "tuning" in data and "total_steps" in data
    settings, written = {}, {}
    for key, value in data.items():
        name, negated = aliases.get(str(key).replace("-", "_"), (str(key).replace("-", "_"), False))
        if name in written:
            raise UserError(f"run config {path}: {name} is given twice (as {written[name]} and {key}): keep one")
        if negated and not isinstance(value, bool):
            raise UserError(f"run config {path}: {key} must be true or false, not {reprlib.repr(value)}")
        settings[name], written[name] = (not value if negated else value), key
    unknown = sorted(k for k in settings if k not in fields and not (is_run_record and k in RUN_RECORD_KEYS))
    if unknown:
        raise UserError(f"run config {path}: {', '.join(unknown)} is not a setting of this command; "
                        f"see --help for the names (dashes or underscores)")
    return {k: v for k, v in settings.items() if k in fields and not (is_run_record and k == "resume")}


# The recipes behind each preset, counted on the real architectures (tests/test_bypass_and_io.py checks each).
# SD v1.5 (16 transformer blocks: 5 at 320, 5 at 640, 6 at 1280 channels), the paper's COCO2017 rows:
#   res-tuning: Res-Adapter L=97 beside every FFN (2,435,168) + Res-Prefix l=4 beside every self-attention
#               (99,856) = 2,535,024; a reconstruction of the paper's unpublished 2.54M recipe
#   bypass:     5 rungs of grouped Res-Adapters (4 groups, hidden C/2) + 1x1 projections 1280->640->320 = 3,752,975;
#               a reconstruction of the paper's 3.76M
#   adapter:    sequential Adapter L=100 after every FFN = 2,510,096 (paper 2.51M)
#   prefix:     prefix tuning l=100 on all 32 attentions = 4,992,000 (paper 4.99M)
#   prompt:     prompt tuning l=100 on the 16 self-attentions = 1,248,000 (paper 1.25M)
#   lora:       r=50 on to_q/to_k/to_v/to_out.0 of all 32 attentions = 9,964,800 (paper 9.96M); lora-r4 is the
#               community default r=4 on the same layers (797,184)
# ViT-B/16 (12 layers of 768); the paper's VTAB-1K rows count the head, 38,050 on average over the 19 tasks:
#   res-tuning: Res-Adapter L=10 (FFN, scale 4 at init) + Res-Prefix l=10 + Res-Prompt l=10 (attention) = 470,172
#               (reconstructed); res-tuning-s1 the same with the adapter's scale at 1
#   bypass:     12 horizontal + 12 vertical Res-Adapters L=10 = 387,348 (reconstructed)
#   adapter:    Pfeiffer-style Adapter after every MLP, reduction 8 (L=96) = 1,779,852 + head = 1.82M (paper 1.82M)
#   prompt:     VPT-Deep, l=61 prompt tokens in every layer = 562,176 + head = 0.60M (paper 0.60M; VPT picks l per task,
#               61 is the one length with the same average budget)
#   prefix:     prefix tuning l=10; lora: r=8 on q_proj/v_proj = 294,912; linear: the head alone
_PRESETS = {
    "unet": {
        "res-tuning": dict(tuners=[dict(kind="res-adapter", site="ffn", dim=97), dict(kind="res-prefix", site="self_attn", dim=4)]),
        "bypass": dict(bypass=dict(reduction=2, groups=4)),
        "adapter": dict(tuners=[dict(kind="adapter", site="ffn", dim=100)]),
        "prefix": dict(tuners=[dict(kind="prefix", site="attn", dim=100)]),
        "prompt": dict(tuners=[dict(kind="prompt", site="self_attn", dim=100)]),
        "lora": dict(lora=dict(rank=50)),
        "lora-r4": dict(lora=dict(rank=4)),
        "full": dict(full=True),
    },
    "vit": {
        # The Res-Adapter's scale starts at 4: on the digits transfer (evaluation/results/digits/vit-gap, 4 seeds) s0 = 1
        # trails LoRA by 5.8 points at lr 1e-3; s0 = 4 leads it at lr 1e-3, 3e-3 and 1e-2 and is 0.6 under at 3e-2. The
        # branch is still zero at step 0 (W_up starts at zero): only how fast it learns changes. res-tuning-s1: the former.
        "res-tuning": dict(tuners=[dict(kind="res-adapter", site="ffn", dim=10, scale=4.0),
                                   dict(kind="res-prefix", site="attn", dim=10), dict(kind="res-prompt", site="attn", dim=10)]),
        "res-tuning-s1": dict(tuners=[dict(kind="res-adapter", site="ffn", dim=10), dict(kind="res-prefix", site="attn", dim=10),
                                      dict(kind="res-prompt", site="attn", dim=10)]),
        "bypass": dict(bypass=dict(bottleneck=10)),
        "adapter": dict(tuners=[dict(kind="adapter", site="ffn", dim=96)]),
        "prefix": dict(tuners=[dict(kind="prefix", site="attn", dim=10)]),
        "prompt": dict(tuners=[dict(kind="prompt", site="attn", dim=61)]),
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
