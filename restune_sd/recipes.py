"""The training recipe behind each ViT preset's VTAB-1K row (docs/method.md §4, "Recipes"): the learning rate and
gradient clipping that row was produced with. A recipe only fills the settings a user left out; a flag always wins."""

from dataclasses import dataclass

NOAH_SCRIPTS = "NOAH (github.com/ZhangYuanhan-AI/NOAH) configs/{}/VTAB/slurm_train_{}_vtab.sh"


@dataclass(frozen=True)
class Recipe:
    """What a preset trains with unless told otherwise."""

    learning_rate: float
    max_grad_norm: float  # 0: no clipping
    source: str


# Res-Tuning's own rows, and the presets without a row of their own: this project's defaults.
PROJECT = Recipe(1e-3, 1.0, "this project's default (the paper's own optimiser settings are not in its text here)")
# The baselines' rows come from NOAH's scripts: AdamW, weight decay 1e-4, batch 64, 100 epochs, no clipping (timm's
# --clip-grad defaults to none). VPT's script sweeps lr over {5e-3, 1e-3}; 1e-3 is its single-run value here.
VIT_RECIPES: dict[str, Recipe] = {
    "res-tuning": PROJECT,
    "res-tuning-s1": PROJECT,
    "bypass": PROJECT,
    "prefix": PROJECT,
    "full": PROJECT,
    "linear": PROJECT,
    "adapter": Recipe(5e-3, 0.0, NOAH_SCRIPTS.format("Adapter", "adapter") + ": lr 5e-3, no clipping"),
    "lora": Recipe(5e-3, 0.0, NOAH_SCRIPTS.format("LoRA", "lora") + ": lr 5e-3, no clipping"),
    "prompt": Recipe(1e-3, 0.0, NOAH_SCRIPTS.format("VPT", "vpt") + ": lr swept over {5e-3, 1e-3}, no clipping"),
}
RECIPE_FIELDS = ("learning_rate", "max_grad_norm")


def recipe(tuner: str) -> Recipe:
    """The recipe of a ViT preset; a tuner config file (or any other name) trains with this project's defaults."""
    return VIT_RECIPES.get(tuner, PROJECT)


def fill_recipe(cfg) -> None:
    """Set each recipe field `cfg` leaves as None to its preset's value, in place."""
    chosen = recipe(cfg.tuner)
    for name in RECIPE_FIELDS:
        if getattr(cfg, name) is None:
            setattr(cfg, name, getattr(chosen, name))
