"""The backend's options: one documented dataclass, validated with errors that list valid values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ligerfx.compress.schemes import QUANT_SCHEMES, OptionsError, validate_quantize, validate_sparsity

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
VALIDATE_MODES = (False, True, "raise")


def _validate_default():
    """`validate`'s default: False, or what the LIGERFX_VALIDATE environment variable asks for
    ("1"/"true": True, "raise": "raise", "0"/"false"/unset: False), so a test suite can turn
    translation validation on for every compile without changing its code."""
    import os

    v = os.environ.get("LIGERFX_VALIDATE", "").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v == "raise":
        return "raise"
    if v in ("1", "true", "yes", "on"):
        return True
    raise OptionsError(f"LIGERFX_VALIDATE must be 1, 0 or raise, got {v!r}")

@dataclass(frozen=True)
class Options:
    """Options of the liger backend (`torch.compile(..., options={...})`).

    inner: backend that compiles the rewritten graph: "inductor" (default), "aot_eager" or "eager".
    patterns: names of the only patterns to apply (default: all registered patterns).
    exclude: names of patterns not to apply.
    log_report: log the rewrite report through the `ligerfx` logger (INFO) after each graph.
    quantize: None, "int8", "int4" or "fp8": replace frozen linear layers by low-bit matmuls.
    group_size: int4 group along K: 32, 64 or 128.
    quantize_skip: module-name globs (fnmatch) of linears not to quantize (or sparsify).
    quantize_lm_head: also quantize (or sparsify) the lm head (skipped by default).
    sparsity: None, "2:4" or "2:4+int8": serve frozen linears whose weights are already 2:4
        sparse from compressed storage (lossless; "+int8" also quantizes the kept values); the
        others are left alone (or quantized by `quantize`) with a near miss.
    skip_logits: when the lm head + loss is fused and the model also returns the logits, do not
        compute them: that output becomes an empty tensor (the report says so).  Training only.
    upcast_statistics: statistics (norm statistics, the loss's log-softmax) that the code computes
        in fp16/bf16 may be computed in fp32 by the kernels: more accurate, not bit-equal to
        eager; each rewrite that used it is listed in the report's notes.  Default False: such
        code is left alone with a near miss.
    validate: translation validation (ligerfx/compiler/validate.py).  True: when a graph is
        compiled (on the first call, with that call's real inputs) each rewritten region is also
        run as the original code, forward and backward (on a random upstream gradient), and
        compared within eager's own rounding; a region that differs is dropped with a warning and
        a near miss, and the graph is compiled without it.  "raise": raise
        `ligerfx.compiler.validate.ValidationError` instead of dropping (for test suites).
        Default False, or the LIGERFX_VALIDATE environment variable (1 / raise).
    """

    inner: str = "inductor"
    patterns: tuple | None = None
    exclude: tuple = ()
    log_report: bool = True
    quantize: str | None = None
    group_size: int = 128
    quantize_skip: tuple = ()
    quantize_lm_head: bool = False
    skip_logits: bool = False
    upcast_statistics: bool = False
    sparsity: str | None = None
    validate: bool | str = field(default_factory=_validate_default)
    _extra: tuple = field(default=(), repr=False)

    @classmethod
    def from_any(cls, options: "Options | Mapping[str, Any] | None") -> "Options":
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, Mapping):
            raise OptionsError(f"options must be a dict or ligerfx.Options, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        unknown = [k for k in options if k not in valid]
        if unknown:
            raise OptionsError(f"unknown liger option(s) {', '.join(map(repr, unknown))}; "
                               f"valid options are: {', '.join(valid)}")
        kw = dict(options)
        for key in ("patterns", "exclude", "quantize_skip"):
            if key in kw and kw[key] is not None:
                kw[key] = _names(key, kw[key])
        opts = cls(**kw)
        opts.check()
        return opts

    def check(self) -> None:
        """Raise OptionsError naming the option and its valid values for anything invalid."""
        if self.inner not in INNER_BACKENDS:
            raise OptionsError(f"option 'inner' must be one of {', '.join(INNER_BACKENDS)}; "
                               f"got {self.inner!r}")
        for flag in ("log_report", "skip_logits", "upcast_statistics"):
            if not isinstance(getattr(self, flag), bool):
                raise OptionsError(f"option {flag!r} must be True or False, "
                                   f"got {getattr(self, flag)!r}")
        if not any(self.validate is m or (isinstance(m, str) and self.validate == m)
                   for m in VALIDATE_MODES):
            raise OptionsError(f"option 'validate' must be True, False or \"raise\", "
                               f"got {self.validate!r}")
        if not isinstance(self.quantize_lm_head, bool):
            raise OptionsError(f"option 'quantize_lm_head' must be True or False, "
                               f"got {self.quantize_lm_head!r}")
        if self.sparsity is not None:
            validate_sparsity(self.sparsity)
        if self.quantize is None:
            if self.group_size != 128 or (self.sparsity is None and (self.quantize_skip or self.quantize_lm_head)):
                raise OptionsError("options 'group_size', 'quantize_skip' and 'quantize_lm_head' "
                                   "need 'quantize' (one of " + ", ".join(QUANT_SCHEMES) + ")"
                                   + ("" if self.sparsity is not None else
                                      " or, for the last two, 'sparsity'"))
        else:
            validate_quantize(self.quantize, self.group_size)
        from .compiler.pattern import REGISTRY
        from . import builtins  # noqa: F401

        known = REGISTRY.names()
        for key in ("patterns", "exclude"):
            names = getattr(self, key) or ()
            bad = [n for n in names if n not in known]
            if bad:
                raise OptionsError(f"option {key!r} names unknown pattern(s) "
                                   f"{', '.join(map(repr, bad))}; registered patterns are: "
                                   f"{', '.join(known)}")


def _names(key: str, v: Any) -> tuple:
    what = "module-name globs" if key == "quantize_skip" else "pattern names"
    if isinstance(v, str):
        v = [v]
    try:
        names = tuple(v)
    except TypeError:
        raise OptionsError(f"option {key!r} must be a list of {what}, got {v!r}") from None
    if not all(isinstance(n, str) for n in names):
        raise OptionsError(f"option {key!r} must be a list of {what}, got {v!r}")
    return names
