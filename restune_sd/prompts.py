"""Prompts with their own sampling settings, written as kohya sd-scripts writes sample prompts, one a line:
`a photo of a cat --n blurry --w 512 --h 768 --l 7.5 --s 28 --d 1234 --ss euler_a`, and the pipeline arguments and
seeds that `sample` and validation images draw each image with."""

from collections import Counter
from dataclasses import dataclass, field, fields

from restune_sd.bounds import MAX_GUIDANCE, MAX_RESOLUTION, MAX_SAMPLING_STEPS, MAX_SEED, require_number
from restune_sd.errors import UserError
from restune_sd.files import read_text

# kohya's option letters -> Prompt fields (kohya: n negative prompt, w/h size, l guidance scale, s steps, d seed,
# ss sampler); its options for other models (--g, --cn, --ctr, --rcfg, --fs, --f) are refused, not ignored.
OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "l": "guidance_scale", "s": "steps", "d": "seed",
           "ss": "scheduler"}
WHOLE_BOUNDS = {"width": (8, MAX_RESOLUTION), "height": (8, MAX_RESOLUTION), "steps": (1, MAX_SAMPLING_STEPS),
                "seed": (0, MAX_SEED)}


@dataclass(frozen=True)
class Prompt:
    """A prompt and the settings its own line gives (None: the command's)."""

    text: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    seed: int | None = None
    scheduler: str | None = None
    where: str = field(default="", compare=False)  # "FILE line N", naming the line in messages
    line: str = field(default="", compare=False)  # the line as written

    @property
    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("text", "where", "line") and getattr(self, f.name) is not None}


def parse_prompt_line(line: str, where: str) -> Prompt:
    """One kohya prompt line: the text before the first ` --`, then `--LETTER value` options, each checked."""
    text, *options = line.strip().split(" --")
    settings = {}
    for option in options:
        letter, _, value = option.strip().partition(" ")
        name, value = OPTIONS.get(letter.lower()), value.strip()
        if name is None:
            raise UserError(f"{where}: unknown option --{letter} (read: {', '.join('--' + o for o in OPTIONS)}, as "
                            "kohya's sample prompts write them)")
        if not value:
            raise UserError(f"{where}: --{letter} needs a value")
        settings[name] = option_value(name, value, f"{where}: --{letter}")
    if not text.strip():
        raise UserError(f"{where}: the line has options but no prompt before them")
    return Prompt(text.strip(), **settings, where=where, line=" ".join(line.split()))


def option_value(name: str, value: str, flag: str):
    """A prompt option's value, checked as the command's own flag is."""
    if name == "negative_prompt":
        return value
    if name == "scheduler":
        from restune_sd.schedulers import scheduler_spec

        scheduler_spec(value, option=flag)
        return value
    if name == "guidance_scale":
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"{flag} must be a number, not {value!r}") from None
        return require_number(flag, number, minimum=0, maximum=MAX_GUIDANCE)
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{flag} must be a whole number, not {value!r}") from None
    low, high = WHOLE_BOUNDS[name]
    return require_number(flag, number, minimum=low, maximum=high, integer=True)


def read_prompt_file(path, option: str, errors: str = "strict") -> list[Prompt]:
    """A prompts file: one prompt a line with kohya's options; blank lines and lines starting with # are skipped,
    as kohya skips them. A bad option is one line naming the file and the line."""
    text = read_text(path, option, "save it as UTF-8 text with one prompt a line", errors=errors)
    return [parse_prompt_line(line, f"{option} {path} line {n}")
            for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]


def check_draws(prompts: list[Prompt], sizes: dict[str, int | None], factor: int, karras_sigmas: bool) -> None:
    """Before anything is drawn: the command's `sizes` (flag -> value) and each line's --w/--h multiples of the VAE's
    downsampling `factor`, and each line's --ss a scheduler with Karras sigmas where the command asks for them."""
    from restune_sd.bounds import require_resolution
    from restune_sd.schedulers import scheduler_spec

    for flag, value in sizes.items():
        if value is not None:
            require_resolution(flag, value, factor)
    for prompt in prompts:
        for name, letter in (("width", "w"), ("height", "h")):
            if getattr(prompt, name) is not None:
                require_resolution(f"{prompt.where}: --{letter}", getattr(prompt, name), factor)
        if prompt.scheduler and karras_sigmas:
            scheduler_spec(prompt.scheduler, True, option=f"{prompt.where}: --ss")


def image_seeds(prompts: list[Prompt], seed: int) -> list[int]:
    """Image i's seed: `seed + i`, or for a line with --d D, D + k for its k-th image."""
    drawn, seeds = Counter(), []
    for i, prompt in enumerate(prompts):
        if prompt.seed is None:
            seeds.append(seed + i)
        else:
            seeds.append(prompt.seed + drawn[prompt.where])
            drawn[prompt.where] += 1
    if max(seeds, default=0) > MAX_SEED:
        i = max(range(len(seeds)), key=seeds.__getitem__)
        raise UserError(f"image {i} would have seed {seeds[i]}, above {MAX_SEED}: use a smaller --seed (or --d)")
    return seeds


def draw_settings(prompt: Prompt, defaults: dict) -> dict:
    """What one image is drawn with: `defaults` (negative_prompt, width, height, guidance_scale, steps, scheduler,
    karras_sigmas) with the prompt's own options over them."""
    return {**defaults, **{k: v for k, v in prompt.options.items() if k in defaults}}


def pipeline_arguments(settings: dict, count: int) -> dict:
    """`draw_settings` as a StableDiffusionPipeline call of `count` images takes them (the scheduler is set on the
    pipeline itself)."""
    negative = settings["negative_prompt"]
    return {"negative_prompt": [negative] * count if negative else None, "width": settings["width"],
            "height": settings["height"], "guidance_scale": settings["guidance_scale"], "num_inference_steps": settings["steps"]}


def batches(indices: list[int], settings: list[dict], size: int) -> list[list[int]]:
    """`indices` cut into runs of at most `size` that share their draw settings (one pipeline call each)."""
    runs = []
    for i in indices:
        if runs and len(runs[-1]) < size and settings[runs[-1][-1]] == settings[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
