"""What a `sample --tuner` value puts on a pipeline: a restune-sd tuner, a LoRA file of another tool, or a weighted
stack of them (`A+B:0.6`) applied at once.

In a stack each tuner's weight w scales what it adds: a LoRA's scale (PEFT's adapter scaling, as diffusers'
`set_adapters` sets it), a Res-Adapter's or free-scale Res-Prefix/Res-Prompt branch (its `strength`), and a bypass's
contribution (the ladder's output minus the frozen final feature). At w = 0 a tuner adds exactly nothing; a tuner
alone at w = 1 gives what it gives unstacked. Tuners are added beside each other (their adapters join the same sites'
lists, their LoRAs are separate PEFT adapters), so their state-dict names are offset from the ones they were saved with.
"""

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from restune_sd.bounds import require_number
from restune_sd.errors import UserError

# LoRA files in pickle formats: refused, since loading one can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_WEIGHT = 10  # far above any useful strength (UIs offer 0-2); beyond it images are noise
STACK, WEIGHT = "+", ":"
LIST_ENTRY = re.compile(r"^(.*\.(?:adapters|tokens|bound))\.(\d+)\.(.*)$")  # a tuner's place in a site's list
LORA_ADAPTER = re.compile(r"\.(lora_\w+?)\.default\.")


@dataclass(frozen=True)
class Member:
    """One tuner of a --tuner value and its weight."""

    path: str
    weight: float = 1.0


def parse_tuners(text: str) -> list[Member]:
    """`A`, `A:0.6` or `A+B:0.6` (an existing path is taken whole, whatever characters it holds)."""
    if Path(text).exists():
        return [Member(text)]
    return [parse_member(part, text) for part in text.split(STACK)]


def parse_member(part: str, text: str) -> Member:
    if not part.strip():
        raise UserError(f"--tuner {text}: an empty tuner between '+' signs; stack tuners as A+B:0.6")
    path, colon, weight = part.rpartition(WEIGHT)
    if Path(part).exists() or not colon:
        return Member(part)
    try:
        value = float(weight)
    except ValueError:
        if not Path(path).exists():
            return Member(part)  # a path with a colon: foreign_lora says it does not exist
        raise UserError(f"--tuner {text}: the weight of {path} must be a number, not {weight!r} (as in A+B:0.6)") from None
    require_number(f"--tuner {text}: the weight of {path}", value, minimum=0, maximum=MAX_WEIGHT)
    return Member(path, value)


def is_plain(members: list[Member]) -> bool:
    """One tuner at weight 1: loaded as it always was, with no stacking machinery."""
    return len(members) == 1 and members[0].weight == 1.0


def foreign_lora(tuner: str) -> Path | None:
    """The LoRA file another tool wrote that `tuner` names (a `.safetensors` file, or a folder holding diffusers'
    `pytorch_lora_weights.safetensors` and no restune-sd config), or None for a restune-sd tuner or run directory."""
    from restune_sd.io import CONFIG_FILE, LORA_FILE, WEIGHTS_FILE

    path = Path(tuner)
    if not path.exists():
        raise UserError(f"--tuner {tuner} does not exist: pass a tuner folder, a run directory or a LoRA .safetensors file")
    if path.is_dir():
        found = sorted(path.glob(LORA_FILE.replace(".safetensors", ".*")), key=lambda p: p.suffix != ".safetensors")
        if (path / CONFIG_FILE).is_file() or not found:
            return None  # a restune-sd tuner or run directory (load_tuner says what one lacks)
        path = found[0]
    if path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file():
        raise UserError(f"--tuner {tuner} is a restune-sd tuner's weights file: pass its folder {path.parent}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"--tuner {path} is a pickle ({path.suffix}), which can run code when loaded: use a .safetensors LoRA")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"--tuner {tuner} is neither a restune-sd tuner folder or run directory nor a LoRA .safetensors file")
    check_lora_names(path)
    return path


def check_lora_names(path: Path) -> None:
    """Read a LoRA file's tensor names (not its data): a damaged file, or one without LoRA weights, is refused here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"--tuner {path} is not a readable .safetensors file ({str(error).splitlines()[0]})") from None
    if not any("lora" in name for name in names):
        raise UserError(f"--tuner {path} holds no LoRA weights (no tensor name contains 'lora'): pass a LoRA file")


def load_foreign_lora(pipe, path: Path, adapter_name: str | None = None) -> None:
    """A LoRA written by another tool (diffusers or kohya keys) through the pipeline's own loader, which must apply it."""
    from diffusers.utils import logging
    from safetensors import SafetensorError

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # its "no LoRA keys for the text encoder" warning is normal for UNet-only LoRAs
    try:
        with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: in a stack it is meant to
            warnings.simplefilter("ignore", UserWarning)
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError, OSError, SafetensorError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"--tuner {path} is not a LoRA diffusers can apply to this model: {reason}") from None
    finally:
        logging.set_verbosity(level)
    if not any(pipe.get_list_adapters().values()):
        raise UserError(f"--tuner {path} holds no LoRA weights for this model's UNet or text encoder (a LoRA for another "
                        "architecture?)")


def member_identity(path: str) -> str:
    """A tuner's content digest: restune-sd's config and weights, or the foreign LoRA file's bytes."""
    from restune_sd.io import tuner_digest

    lora = foreign_lora(path)
    return hashlib.sha256(lora.read_bytes()).hexdigest() if lora else tuner_digest(path)


def tuner_identity(tuner: str | None) -> str | None:
    """A --tuner value's content digest (a stack's: its tuners' digests and weights), once it is checked to load."""
    if tuner is None:
        return None
    members = parse_tuners(tuner)
    if is_plain(members):
        return member_identity(members[0].path)
    check_stack(members)
    ids = [[member_identity(m.path), m.weight] for m in members]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def stack_configs(members: list[Member]) -> list[tuple[Member, dict]]:
    """The restune-sd tuners of a stack with their saved configs (LoRA files of other tools have none)."""
    from restune_sd.io import read_tuner_config

    return [(m, read_tuner_config(m.path)) for m in members if foreign_lora(m.path) is None]


def check_stack(members: list[Member]) -> None:
    """What can be refused before a model loads: tuners for another backbone, full fine-tunes, a weight on
    softmax-gated tokens, and tuners trained to predict different things."""
    for member, meta in stack_configs(members):
        tuning = meta["tuning"]
        if meta["backbone"]["kind"] != "unet":
            raise UserError(f"--tuner {member.path} is a tuner for a {meta['backbone']['kind']}, not for Stable Diffusion's "
                            "UNet: it cannot be sampled or stacked")
        if tuning.get("full"):
            raise UserError(f"--tuner {member.path} is a full fine-tune (it replaces the UNet's weights): it adds no branch "
                            "that a weight could scale, so it cannot be weighted or stacked; sample it alone")
        if "text_encoder_lora" in meta:
            raise UserError(f"--tuner {member.path} also holds a text-encoder LoRA, which a stack cannot weigh or combine "
                            "yet: sample it alone, at weight 1")
        gated = [s for s in tuning.get("tuners") or [] if s["kind"] in ("prefix", "prompt") or s.get("gate") == "lambda"]
        if gated and member.weight != 1.0:
            raise UserError(f"--tuner {member.path}:{member.weight:g}: its {gated[0]['kind']} tokens are softmax-gated (they "
                            "share the attention's softmax), so no weight scales them; stack it at weight 1")
    stacked_prediction_type(members)


def stacked_prediction_type(members: list[Member]) -> str | None:
    """What the stack's tuners were trained to predict (None: the model's own); tuners that disagree are refused."""
    kinds = {(meta.get("prediction_type"), m.path) for m, meta in stack_configs(members) if meta.get("prediction_type")}
    if len({k for k, _ in kinds}) > 1:
        (a, path_a), (b, path_b) = sorted(kinds)[:2]
        raise UserError(f"--tuner {path_a} was trained to predict {a} and {path_b} {b}: a scheduler samples with one, so "
                        "they cannot stack")
    return next(iter(kinds), (None,))[0]


def trained_prediction_type(tuner: str | None) -> str | None:
    """What a --tuner's UNet was trained to predict (epsilon, v_prediction or sample); None for the plain model, a LoRA
    of another tool and tuners saved outside a training run, which sample as the model's own scheduler."""
    from restune_sd.io import read_tuner_config

    if tuner is None:
        return None
    members = parse_tuners(tuner)
    if not is_plain(members):
        return stacked_prediction_type(members)
    if foreign_lora(members[0].path):
        return None
    return read_tuner_config(members[0].path).get("prediction_type")


def tuner_folder_name(tuner: str) -> str:
    """The sub-folder a --tuner value samples into when several are given: the tuner's name (a stack's joined by +)."""
    members = parse_tuners(tuner)
    if not is_plain(members):
        return STACK.join(tuner_folder_name(m.path) + (f"-{m.weight:g}" if m.weight != 1.0 else "") for m in members)
    path = Path(members[0].path)
    if path.suffix == ".safetensors":  # a foreign LoRA file
        return path.stem
    return path.parent.name if path.name == "tuner" else path.name


def apply_tuner(pipe, tuner: str) -> None:
    """Put what a --tuner value names on `pipe` (a plain StableDiffusionPipeline)."""
    from restune_sd.io import load_tuner

    members = parse_tuners(tuner)
    if not is_plain(members):
        return load_stack(pipe, members)
    lora = foreign_lora(members[0].path)
    if lora:
        load_foreign_lora(pipe, lora)
    else:
        load_tuner(pipe, members[0].path)


def load_stack(pipe, members: list[Member]) -> None:
    """Every tuner of the stack on `pipe` at its weight: restune-sd tuners first, then LoRA files of other tools."""
    check_stack(members)
    unet, adapters, owners = pipe.unet, {}, {}
    found = [(m, foreign_lora(m.path)) for m in members]
    ours = [m for m, lora in found if lora is None]
    for index, member in enumerate(ours):
        before = {id(module) for module in unet.modules()}
        adapter = add_member(pipe, member, index)
        added = [module for module in unet.modules() if id(module) not in before]
        weigh(added, member.weight)
        owners.update({id(module): member.path for module in added})
        if adapter:
            adapters[adapter] = member.weight
    check_shared_softmax(unet, owners)
    for k, (member, lora) in enumerate(found):
        if lora is not None:
            load_foreign_lora(pipe, lora, adapter_name=f"file_{k}")
            adapters[f"file_{k}"] = member.weight
    weigh_loras(pipe, adapters)
    if ours:
        unet.restune.stack = [(m.path, m.weight) for m in members]


def add_member(pipe, member: Member, index: int) -> str | None:
    """Attach one restune-sd tuner beside those already on the UNet; returns its LoRA's adapter name, if it has one."""
    from restune_sd.config import TuningConfig
    from restune_sd.inject import add_tuners, is_tuner_param
    from restune_sd.io import copy_weights, load_tuner, read_fitting_tuner, read_tuner_weights

    if index == 0:  # the first is loaded exactly as it is alone
        load_tuner(pipe, member.path)
        return "default" if pipe.unet.restune.config.lora else None
    unet = pipe.unet
    folder, meta = read_fitting_tuner(member.path, unet)
    state = read_tuner_weights(folder, meta)
    config = TuningConfig.from_dict(meta["tuning"])
    lengths, before = list_lengths(unet), set(dict(unet.named_parameters()))
    adapter, bypass = f"restune_{index}", f"restune_bypass_{index}"
    with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: here it is meant to
        warnings.simplefilter("ignore", UserWarning)
        add_tuners(unet, "unet", config, lora_name=adapter, bypass_name=bypass)
    added = {name for name, _ in unet.named_parameters() if name not in before and is_tuner_param(name)}
    copy_weights(unet, folder, meta, {stacked_name(n, lengths, adapter, bypass): t for n, t in state.items()}, added)
    return adapter if config.lora else None


def list_lengths(unet) -> dict[str, int]:
    """How many tuners each site's list (adapters, prefix/prompt tokens) already holds."""
    from torch import nn

    return {name: len(module) for name, module in unet.named_modules()
            if isinstance(module, nn.ModuleList) and LIST_ENTRY.match(f"{name}.0.x")}


def stacked_name(name: str, lengths: dict[str, int], adapter: str, bypass: str) -> str:
    """A saved tuner's parameter name where it sits in a stack: after the entries of the sites' lists before it, in
    LoRA adapter `adapter`, in bypass `bypass`."""
    name = re.sub(r"^restune_bypass\.", f"{bypass}.", name)
    name = LORA_ADAPTER.sub(lambda m: f".{m.group(1)}.{adapter}.", name)
    entry = LIST_ENTRY.match(name)
    if entry:
        name = f"{entry.group(1)}.{int(entry.group(2)) + lengths.get(entry.group(1), 0)}.{entry.group(3)}"
    return name


def weigh(modules: list, weight: float) -> None:
    """Give a tuner's branches its weight: its Res-Adapters and free-scale tokens their strength, its bypass (not the
    adapters inside its ladder) the weight of its contribution."""
    from restune_sd.bypass import Bypass
    from restune_sd.tuners import PrefixTokens, PromptTokens, ResAdapter

    in_ladders = {id(m) for bypass in modules if isinstance(bypass, Bypass) for m in bypass.modules()}
    for module in modules:
        if isinstance(module, Bypass):
            module.strength = weight
        elif isinstance(module, (ResAdapter, PrefixTokens, PromptTokens)) and id(module) not in in_ladders:
            module.strength = weight


def check_shared_softmax(unet, owners: dict[int, str]) -> None:
    """Softmax-gated tokens of two tuners in one attention would share its softmax and reweigh each other: refused."""
    from restune_sd.attention import ResTuningAttnProcessor

    for name, module in unet.named_modules():
        if isinstance(module, ResTuningAttnProcessor):
            gated = [*module.bound, *(t for t in module.tokens if t.gate == "lambda")]
            tuners = sorted({owners[id(t)] for t in gated if id(t) in owners})
            if len(tuners) > 1:
                raise UserError(f"--tuner {tuners[0]} and {tuners[1]} both put softmax-gated prefix/prompt tokens in "
                                f"{name.removesuffix('.processor')}: they would share its softmax and change each other's "
                                "attention, so they cannot stack")


def weigh_loras(pipe, adapters: dict[str, float]) -> None:
    """Every LoRA adapter active at its weight, in the UNet and the text encoder, through diffusers' own setter."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in (pipe.unet, pipe.text_encoder):
        present = {name for m in model.modules() if isinstance(m, BaseTunerLayer) for name in getattr(m, "lora_A", {})}
        names = [name for name in adapters if name in present]
        if names:
            set_weights_and_activate_adapters(model, names, [adapters[name] for name in names])
