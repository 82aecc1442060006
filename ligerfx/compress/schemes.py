"""The compression schemes the backend's options and the eager `quantize_` / `sparsify_` accept,
and the checks that name a wrong one.

`OptionsError` lives here, the lowest module that raises it, so that compress/ never imports the
front end's options module; `ligerfx.OptionsError` is this class."""

from __future__ import annotations

from typing import Any

class OptionsError(ValueError):
    """An option is unknown or has a bad value; the message lists what is valid."""


QUANT_SCHEMES = ("int8", "int4", "fp8")


GROUP_SIZES = (32, 64, 128)


def validate_quantize(scheme: Any, group_size: Any) -> None:
    """Check a quantization scheme and int4 group size (also used by `ligerfx.quantize_`)."""
    if scheme not in QUANT_SCHEMES:
        raise OptionsError(f"option 'quantize' must be one of {', '.join(QUANT_SCHEMES)}; got {scheme!r}")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise OptionsError(f"option 'group_size' must be one of {', '.join(map(str, GROUP_SIZES))}; "
                           f"got {group_size!r}")
    if scheme != "int4" and group_size != 128:
        raise OptionsError(f"option 'group_size' applies to quantize='int4' only (got "
                           f"quantize={scheme!r}, group_size={group_size!r})")


SPARSITY_SCHEMES = ("2:4", "2:4+int8")


def validate_sparsity(scheme: Any) -> None:
    """Check a sparsity scheme (also used by `ligerfx.sparsify_`)."""
    if scheme not in SPARSITY_SCHEMES:
        raise OptionsError(f"option 'sparsity' must be one of {', '.join(map(repr, SPARSITY_SCHEMES))}; "
                           f"got {scheme!r}")
