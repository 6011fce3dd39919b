"""What a diffusion run trains with beside its tuner's weights (prediction type, zero terminal SNR, clip skip):
applied to the frozen pipeline parts for training, recorded in the tuner, and repeated by `sample` and the validation
images."""

import inspect

from restune_sd.encoders import long_captions, text_embeddings
from restune_sd.errors import UserError
from restune_sd.files import warn

# diffusers' advice for a zero-terminal-SNR model ("Common Diffusion Noise Schedules and Sample Steps are Flawed"):
# rescaled betas, steps spaced from the last timestep, and the guided prediction rescaled by 0.7.
ZERO_SNR_GUIDANCE_RESCALE = 0.7
UNRECORDED = {"clip_skip": 0, "zero_terminal_snr": False}  # what a tuner without the record was trained with


def sampling_record(cfg) -> dict:
    """The fields a run's tuner records beside its prediction type, where the run used them (a TrainConfig)."""
    return {**({"clip_skip": cfg.clip_skip} if cfg.clip_skip else {}),
            **({"zero_terminal_snr": True} if cfg.zero_terminal_snr else {})}


def require_clip_skip(clip_skip: int, layers: int | None, what: str = "--clip-skip") -> None:
    """A clip skip below the text encoder's depth (when it is known): skipping every layer leaves none to read."""
    if layers is not None and clip_skip >= layers:
        raise UserError(f"{what} {clip_skip} skips the text encoder's every layer: it has {layers}, so the clip skip "
                        f"must be 0 to {layers - 1} (1 is the penultimate layer)")


def apply_settings(comps, cfg, dataset, session) -> None:
    """A run's settings applied to its loaded parts (train.Components): prediction type and zero terminal SNR in the
    noise scheduler, the clip skip checked against the text encoder; then one warning line each (main process) for
    captions the text encoder cuts and for settings that do nothing here."""
    from diffusers import DDPMScheduler

    if cfg.prediction_type:
        comps.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    if cfg.zero_terminal_snr:  # a new scheduler: the betas are rescaled when one is made
        comps.noise_scheduler = DDPMScheduler.from_config(comps.noise_scheduler.config, rescale_betas_zero_snr=True)
    require_clip_skip(cfg.clip_skip, comps.text_encoder.config.num_hidden_layers)
    if not session.accelerator.is_main_process:
        return
    if line := long_captions((c for i in range(len(dataset)) for c in dataset.captions_of(i)), comps.tokenizer):
        warn(line)
    if cfg.gradient_checkpointing and session.tuning.bypass:
        warn("--gradient-checkpointing has no effect with the bypass tuner: its backbone runs without autograd and "
             "keeps no activations to recompute")
    if cfg.cache and cfg.tags.active:
        warn("--cache keeps latents but not text embeddings here: with --shuffle-tags or --tag-dropout a caption "
             "changes at every draw")
    elif cfg.cache and cfg.text_encoder_lora is not None:
        warn("--cache keeps latents but not text embeddings here: with --text-encoder-lora the text encoder trains, so "
             "a caption's embedding changes at every step")


def trained_with(tuner: str | None) -> dict:
    """The clip skip and zero terminal SNR a --tuner value's runs trained with (UNRECORDED for the plain model, LoRA
    files of other tools and tuners saved outside a run); the tuners of a stack must agree, or it is refused."""
    from restune_sd.stacking import parse_tuners, stack_configs

    configs = stack_configs(parse_tuners(tuner)) if tuner else []
    found = {}
    for name, default in UNRECORDED.items():
        values = {meta.get(name, default): member.path for member, meta in configs}
        if len(values) > 1:
            (a, path_a), (b, path_b) = sorted(values.items())[:2]
            raise UserError(f"--tuner {path_a} was trained with {name}={a} and {path_b} with {name}={b}: one pipeline "
                            "samples with one, so they cannot stack")
        found[name] = next(iter(values), default)
    return found


def check_sampling(tuner: str | None, schedulers: set[str], layers: int | None) -> None:
    """What sampling with `tuner` can refuse before anything is written: a clip skip deeper than the model's text
    encoder (`layers`, when known), and with zero terminal SNR a scheduler that cannot rescale its betas."""
    trained = trained_with(tuner)
    require_clip_skip(trained["clip_skip"], layers, f"--tuner {tuner} was trained with a clip skip of")
    if trained["zero_terminal_snr"]:
        require_zero_snr_schedulers(schedulers, f"--tuner {tuner} was trained with zero terminal SNR")


def require_zero_snr_schedulers(schedulers: set[str], why: str) -> None:
    """Schedulers (by name) that can rescale their betas to zero terminal SNR; `why` begins the one line otherwise."""
    from restune_sd.schedulers import scheduler_class, scheduler_spec

    for name in sorted(schedulers):
        cls = scheduler_spec(name)[0]
        if "rescale_betas_zero_snr" not in inspect.signature(scheduler_class(cls).__init__).parameters:
            raise UserError(f"{why}, which scheduler {name} ({cls}) cannot sample with: use ddim, euler, euler_a, "
                            "dpm++_2m, unipc or another that has rescale_betas_zero_snr")


def scheduler_config(config, zero_terminal_snr: bool):
    """The model's scheduler config as a tuner trained with zero terminal SNR samples with it, else as it is."""
    if not zero_terminal_snr:
        return config
    return {**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def prompt_embeddings(pipe, prompts: list[str], negative_prompt: list[str] | None, clip_skip: int) -> dict:
    """A pipeline call's prompt_embeds and negative_prompt_embeds, both `clip_skip` layers before the text encoder's
    last, as training embeds every caption ("" too). diffusers' own `clip_skip` leaves the negative prompt's layers
    alone, and fails on transformers >= 5.6, whose CLIPTextModel has no `text_model` (diffusers issue 14124)."""
    def embed(texts: list[str]):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        return text_embeddings(pipe.text_encoder, ids.to(pipe.device), clip_skip).to(pipe.text_encoder.dtype)

    return {"prompt_embeds": embed(prompts), "negative_prompt_embeds": embed(negative_prompt or [""] * len(prompts))}


def call_settings(trained: dict, guidance_rescale: float | None = None) -> dict:
    """The pipeline call's settings that follow from `trained`: its clip skip, and the guidance rescale (given, else
    ZERO_SNR_GUIDANCE_RESCALE with zero terminal SNR, else none)."""
    if guidance_rescale is None:
        guidance_rescale = ZERO_SNR_GUIDANCE_RESCALE if trained["zero_terminal_snr"] else 0.0
    return {"clip_skip": trained["clip_skip"] or None, "guidance_rescale": guidance_rescale}
