"""Range checks for the numbers a user gives: each failure is one line naming the option and the accepted range."""

import math

from restune_sd.errors import UserError

# Far above any Stable Diffusion model's own size (512-1024), far below sizes that exhaust a machine's memory.
MAX_RESOLUTION = 4096
# Seeds stay within a signed 64-bit integer, which torch's generators (and JSON readers) take as they are.
MAX_SEED = 2**63 - 1
# Far above what anyone samples with (SD's usual guidance is 5-15) and far below values that overflow to NaN images.
MAX_GUIDANCE = 100
MAX_SAMPLING_STEPS = 1000  # a scheduler's training timesteps: no sampler takes more


def require_number(name: str, value, *, minimum=None, above=None, maximum=None, integer: bool = False):
    """`value` if it is a finite number (an integer when `integer`) within the bounds; a UserError otherwise."""
    kind = "a whole number" if integer else "a number"
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if wrong_type or not math.isfinite(value):
        raise UserError(f"{name} must be {kind}, not {value!r}")
    if (minimum is not None and value < minimum) or (above is not None and value <= above) or (
            maximum is not None and value > maximum):
        low = f">= {minimum}" if minimum is not None else f"> {above}" if above is not None else ""
        high = f"<= {maximum}" if maximum is not None else ""
        raise UserError(f"{name} must be {' and '.join(b for b in (low, high) if b)}, not {value!r}")
    return value


def check_bounds(obj, bounds: dict[str, dict], flag=lambda name: f"--{name.replace('_', '-')}") -> None:
    """Check every field of `obj` listed in `bounds` (None is allowed where the field's default is None)."""
    for name, limits in bounds.items():
        value = getattr(obj, name)
        if value is None and limits.get("optional"):
            continue
        require_number(flag(name), value, **{k: v for k, v in limits.items() if k != "optional"})


def require_resolution(name: str, value: int, factor: int) -> int:
    """An image side the VAE can encode: a multiple of its downsampling `factor`, at most MAX_RESOLUTION."""
    require_number(name, value, minimum=factor, maximum=MAX_RESOLUTION, integer=True)
    if value % factor:
        lower, upper = value // factor * factor, (value // factor + 1) * factor
        raise UserError(f"{name} must be a multiple of {factor} (the VAE's downsampling factor), not {value}: "
                        f"use {lower or upper} or {upper}")
    return value
