"""restune-sd: Res-Tuning (NeurIPS 2023) for Stable Diffusion UNets and ViT classifiers."""

from restune_sd.attention import set_attention_backend
from restune_sd.config import BypassSpec, LoraSpec, TunerSpec, TuningConfig, load_config, preset
from restune_sd.errors import UserError
from restune_sd.inject import attach
from restune_sd.io import load_tuner, save_tuner
from restune_sd.summary import parameter_summary

__all__ = [
    "BypassSpec", "LoraSpec", "TunerSpec", "TuningConfig", "UserError", "attach", "load_config", "load_tuner",
    "parameter_summary", "preset", "save_tuner", "set_attention_backend",
]
