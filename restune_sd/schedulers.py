"""Sampling schedulers by name: a diffusers class the pipeline's `scheduler.compatibles` offers, or the name a UI or
kohya's sd-scripts gives it ("Euler a", "DPM++ 2M Karras", "k_euler_a"), made from the model's own scheduler config."""

import inspect

from restune_sd.errors import UserError

# A UI name -> (diffusers class, the config that makes it that sampler). Names are compared as `key()` writes them.
NAMED = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm": ("DPMSolverMultistepScheduler", {}),  # this project's earlier name for DPM++ 2M
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverSDEScheduler", {}),
    "dpm++_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}
# kohya's sample-prompt samplers (`--ss`, `--sample_sampler`) that are not UI names above.
KOHYA = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "dpmsolver++": "dpm++_2m", "dpm_2": "dpm2",
         "k_dpm_2": "dpm2", "dpm_2_a": "dpm2_a", "k_dpm_2_a": "dpm2_a"}


def key(name: str) -> str:
    """A scheduler name as the tables hold it: "DPM++ 2M Karras" -> dpm++_2m_karras, "Euler a" -> euler_a."""
    return "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())


def sd_scheduler_classes() -> list[str]:
    """The class names every SD v1.x scheduler lists in `compatibles` (checked without loading a model)."""
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    return [member.name for member in KarrasDiffusionSchedulers]


def scheduler_spec(name: str, karras_sigmas: bool = False, option: str = "--scheduler") -> tuple[str, dict]:
    """The diffusers class name and config of scheduler `name` (with Karras sigmas where asked); one line otherwise."""
    classes = {c.lower(): c for c in sd_scheduler_classes()}
    wanted = key(name)
    if wanted in classes:
        cls, extra = classes[wanted], {}
    elif KOHYA.get(wanted, wanted) in NAMED:
        cls, extra = NAMED[KOHYA.get(wanted, wanted)]
        extra = dict(extra)
    else:
        raise UserError(f"unknown {option} {name!r}: use one of {', '.join(NAMED)} (or A1111's names such as "
                        f"'Euler a', 'DPM++ 2M Karras'), or a diffusers class: {', '.join(sd_scheduler_classes())}")
    if karras_sigmas:
        if "use_karras_sigmas" not in inspect.signature(scheduler_class(cls).__init__).parameters:
            raise UserError(f"{option} {name} ({cls}) has no Karras sigmas: drop --karras-sigmas or use a scheduler "
                            "that has them (lms, euler, heun, dpm2, dpm++_2m, unipc, deis)")
        extra["use_karras_sigmas"] = True
    if cls == "DPMSolverSDEScheduler":
        from diffusers.utils import is_torchsde_available

        if not is_torchsde_available():
            raise UserError(f"{option} {name} ({cls}) needs the torchsde package: pip install torchsde")
    return cls, extra


def scheduler_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def make_scheduler(config, name: str, karras_sigmas: bool = False, prediction_type: str | None = None,
                   compatibles: list | None = None):
    """Scheduler `name` made from a model's scheduler `config` (its betas, steps offset, clip_sample), predicting
    `prediction_type` where given; refused in one line when the model's scheduler does not list it as compatible."""
    cls_name, extra = scheduler_spec(name, karras_sigmas)
    cls = scheduler_class(cls_name)
    if compatibles is not None and cls not in compatibles:
        offered = ", ".join(sorted(c.__name__ for c in compatibles))
        raise UserError(f"scheduler {name} ({cls_name}) is not compatible with this model's scheduler: use one of {offered}")
    return cls.from_config(config, **extra, **({"prediction_type": prediction_type} if prediction_type else {}))
