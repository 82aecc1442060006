"""Low-bit weights: schemes, the per-parameter cache the compile pass uses, and `quantize_`.

Schemes (formats in the kernel files): "int8" (symmetric per output channel, W8A16), "int4"
(asymmetric, group-wise along K, two values per byte, W4A16), "fp8" (e4m3 weights with
per-channel scales, per-token dynamic activation scaling, W8A8).

`quantize_(model, scheme)` swaps eligible `nn.Linear` modules for `QuantizedLinear` modules that
hold only the packed weight as buffers (the full-precision weight is freed); their forward calls
the `liger::<scheme>_linear` op, so the model runs eagerly (the op's dequantizing torch path, or
the kernels on CUDA) and a compiled graph already contains the kernel calls.

The compile pass quantizes a frozen parameter once, at compile time, through `frozen_weight`;
the graph then calls `liger::frozen_quantized_weight(weight, key, ...)`, which returns the cached
packed tensors and re-quantizes when the parameter was changed in place (its version counter or
storage moved), so a compiled model never uses a stale copy.
"""

from __future__ import annotations

import fnmatch
import itertools
import threading
import weakref
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .calibrate import compress_layers, replace_module
from .schemes import validate_quantize
from ligerfx.kernels import fp8_matmul, int4_matmul, int8_matmul, sparse24_matmul

SCHEMES = ("int8", "int4", "fp8")
MIN_FEATURES = 16  # layers narrower than a 16-wide tensor-core tile are left alone
SPARSE_SCHEMES = ("2:4", "2:4+int8")
OP_NAMES = {"int8": "int8_linear", "int4": "int4_linear", "fp8": "fp8_linear",
            "2:4": "sparse24_linear", "2:4+int8": "sparse24_int8_linear"}


def _fp8():
    return fp8_matmul


def unsupported_reason(scheme: str, out_features: int, in_features: int, group_size: int = 128) -> Optional[str]:
    """Why this scheme cannot serve an [out, in] weight, or None."""
    if min(out_features, in_features) < MIN_FEATURES:
        return (f"layer too small to quantize ({out_features}x{in_features}; both dims must be at "
                f"least {MIN_FEATURES})")
    if scheme == "int4":
        return int4_matmul.int4_unsupported(in_features, group_size)
    return None


def pack(weight: torch.Tensor, scheme: str, group_size: int = 128,
         scale_dtype: Optional[torch.dtype] = None) -> tuple:
    """The packed tensors of `weight` [N, K] in `scheme` (the op's arguments after x)."""
    if scheme == "int8":
        return int8_matmul.pack_int8(weight, scale_dtype)
    if scheme == "int4":
        return int4_matmul.pack_int4(weight, group_size, scale_dtype)
    if scheme == "fp8":
        return _fp8().pack_fp8(weight)  # fp32 scales whatever scale_dtype
    if scheme == "2:4":
        return sparse24_matmul.pack_24(weight)  # ValueError if the weight is not 2:4
    if scheme == "2:4+int8":
        return sparse24_matmul.pack_24_int8(weight, scale_dtype)
    raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")


def linear(scheme: str, x: torch.Tensor, packed: tuple, bias: Optional[torch.Tensor]) -> torch.Tensor:
    op = getattr(torch.ops.liger, OP_NAMES[scheme])
    return op(x, *packed, bias)


def check_fp8_device(device: torch.device) -> None:
    """Raise on CUDA GPUs without fp8 tensor cores (compute capability < 8.9)."""
    _fp8().check_device(device)


# ----------------------------------------------------------------------------- compile-time cache


class _Entry:
    __slots__ = ("param", "ptr", "version", "packed", "args", "reason")

    def __init__(self, param, args):
        self.param = weakref.ref(param)
        self.args = args  # (scheme, group_size, scale_dtype)
        self.ptr = self.version = self.packed = None
        self.reason = None  # why the current weight cannot be packed (a 2:4 scheme only)


_entries: dict[int, _Entry] = {}
# id(param) -> {format: key}.  Not a WeakKeyDictionary: its lookups compare tensors with ==,
# which is elementwise (a second graph using the same parameter raised "Boolean value of Tensor
# ... is ambiguous").  A finalizer drops the entry when the parameter dies, before its id is reused.
_keys: dict[int, dict] = {}
_lock = threading.Lock()
_counter = itertools.count(1)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return -1


def _refresh(entry: _Entry, weight: torch.Tensor) -> bool:
    """Re-pack `weight` into `entry` if it changed since the last call; True if it did.  A weight
    a 2:4 scheme cannot pack leaves `entry.packed` None and the reason in `entry.reason` (checked
    again only when the weight changes again)."""
    ptr, ver = weight.data_ptr(), _version(weight)
    if entry.ptr == ptr and entry.version == ver and (entry.packed is not None or entry.reason):
        return False
    scheme, group_size, scale_dtype = entry.args
    entry.packed = entry.reason = None
    try:
        with torch.no_grad():
            entry.packed = pack(weight, scheme, group_size, scale_dtype)
    except ValueError as e:
        if scheme not in SPARSE_SCHEMES:
            raise
        entry.reason = str(e)
    entry.ptr, entry.version = ptr, ver
    return True


def cached_packed(key: int, weight: torch.Tensor, scheme: str, group_size: int,
                  scale_dtype: torch.dtype) -> tuple:
    """(packed tensors or None, why not, whether `weight` was checked afresh by this call) for the
    cache entry `key` of `weight`.  A weight without an entry (a graph outliving its parameters'
    entries) is packed afresh every call."""
    entry = _entries.get(key)
    if entry is None:
        entry = _Entry(weight, (scheme, group_size, scale_dtype))
        _refresh(entry, weight)
        return entry.packed, entry.reason, True
    with _lock:
        fresh = _refresh(entry, weight)
        return entry.packed, entry.reason, fresh


def frozen_weight(param: torch.Tensor, scheme: str, group_size: int, scale_dtype: torch.dtype) -> int:
    """Quantize `param` now (once per parameter and format) and return its cache key."""
    args = (scheme, group_size if scheme == "int4" else 0, scale_dtype)
    with _lock:
        per = _keys.get(id(param))
        if per is None:
            per = _keys[id(param)] = {}
            weakref.finalize(param, _keys.pop, id(param), None)
        key = per.get(args)
        if key is None:
            key = per[args] = next(_counter)
            _entries[key] = _Entry(param, args)
            weakref.finalize(param, _entries.pop, key, None)
        _refresh(_entries[key], param)
    return key


@torch.library.custom_op("liger::frozen_quantized_weight", mutates_args=())
def frozen_quantized_weight(weight: torch.Tensor, key: int, scheme: str, group_size: int,
                            scale_dtype: torch.dtype) -> list[torch.Tensor]:
    """The packed form of a frozen weight, from the cache (re-quantized if it changed)."""
    entry = _entries.get(key)
    if entry is None:  # e.g. a graph outliving its parameters' cache entries
        with torch.no_grad():
            return [t.clone() for t in pack(weight, scheme, group_size, scale_dtype)]
    with _lock:
        _refresh(entry, weight)
        if entry.packed is None:
            raise ValueError(entry.reason)
        # Fresh views of the cached tensors: no copy (decode reads each weight byte once).
        return [t.view(t.shape) for t in entry.packed]


@frozen_quantized_weight.register_fake
def _(weight, key, scheme, group_size, scale_dtype):
    N, K = weight.shape
    if scheme == "int8":
        return [weight.new_empty((N, K), dtype=torch.int8), weight.new_empty((N,), dtype=scale_dtype)]
    if scheme == "int4":
        n = int4_matmul.n_groups(K, group_size)
        return [weight.new_empty((N, K // 2), dtype=torch.uint8),
                weight.new_empty((N, n), dtype=scale_dtype), weight.new_empty((N, n), dtype=scale_dtype)]
    if scheme in SPARSE_SCHEMES:
        values = weight.new_empty((N, K // 2), dtype=torch.int8 if scheme == "2:4+int8" else weight.dtype)
        meta = weight.new_empty((N, K // 8), dtype=torch.uint8)
        return [values, meta] if scheme == "2:4" else [values, meta, weight.new_empty((N,), dtype=scale_dtype)]
    return [weight.new_empty((N, K), dtype=torch.float8_e4m3fn),
            weight.new_empty((N,), dtype=torch.float32)]


# ----------------------------------------------------------------------------- eager API


class QuantizedLinear(nn.Module):
    """An `nn.Linear` whose weight is stored packed (buffers `qweight`, `scale`[, `offset`])."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = 128,
                 bias: bool = True, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        N, K = out_features, in_features
        kw = dict(device=device)
        if scheme == "int8":
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, **kw))
            self.register_buffer("scale", torch.zeros(N, dtype=dtype, **kw))
        elif scheme == "int4":
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, **kw))
            n = int4_matmul.n_groups(K, group_size)
            self.register_buffer("scale", torch.zeros(N, n, dtype=dtype, **kw))
            self.register_buffer("offset", torch.zeros(N, n, dtype=dtype, **kw))
        else:
            # fp8 bits kept as uint8: `model.to(dtype)` casts floating buffers, fp8 included.
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.uint8, **kw))
            self.register_buffer("scale", torch.zeros(N, dtype=torch.float32, **kw))
        self.bias = nn.Parameter(torch.zeros(N, dtype=dtype, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, scheme: str, group_size: int = 128,
                    packed: Optional[tuple] = None) -> "QuantizedLinear":
        """`packed`: the weight already packed in `scheme` (by a calibrated method); else it is
        rounded to nearest here."""
        w = lin.weight
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features, q.scheme, q.group_size = lin.in_features, lin.out_features, scheme, group_size
        if packed is None:
            packed = pack(w, scheme, group_size, w.dtype)
        if scheme == "fp8":
            packed = (packed[0].view(torch.uint8), packed[1])
        for name, t in zip(("qweight", "scale", "offset"), packed):
            q.register_buffer(name, t)
        q.bias = lin.bias
        return q

    def packed(self) -> tuple:
        if self.scheme == "int8":
            return self.qweight, self.scale
        if self.scheme == "int4":
            return self.qweight, self.scale, self.offset
        return self.qweight.view(torch.float8_e4m3fn), self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.scheme, x, self.packed(), self.bias)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        if self.scheme == "int8":
            return int8_matmul.unpack_int8(self.qweight, self.scale, dtype)
        if self.scheme == "int4":
            return int4_matmul.unpack_int4(self.qweight, self.scale, self.offset, dtype)
        return _fp8().unpack_fp8(self.qweight.view(torch.float8_e4m3fn), self.scale, dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}{g}")


def lm_head_like(model: nn.Module) -> set:
    """Names of linears that act as the lm head: weight tied to an embedding, or out_features equal
    to an embedding's vocabulary size."""
    emb_weights, vocab = set(), set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            emb_weights.add(id(m.weight))
            vocab.add(m.num_embeddings)
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and (id(m.weight) in emb_weights or m.out_features in vocab)}


def matches_any(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


METHODS = ("rtn", "gptq")


def quantize_(model: nn.Module, scheme: str, group_size: int = 128, skip: Iterable[str] = (),
              quantize_lm_head: bool = False, calibration: Optional[Iterable] = None,
              method: Optional[str] = None, sequential: bool = True) -> dict:
    """Replace eligible `nn.Linear` modules of `model` in place by packed `QuantizedLinear`s.

    Skipped: modules whose name matches a glob in `skip`, the lm head (found by structure) unless
    `quantize_lm_head`, and shapes the scheme cannot serve.  Returns {module name: reason} for
    every linear left alone.  Load a saved quantized state_dict into a model that went through
    the same `quantize_` call.

    `calibration`: an iterable of batches (token-id tensors, or dicts of the model's keyword
    arguments) the model is run on first; with it the default `method` is "gptq" (each weight
    rounded against its layer's inputs, compressed/gptq.py), without it "rtn" (round to
    nearest).  GPTQ serves int4 and int8; the packed format, and so the kernels, are the same.
    `sequential` (default): calibrate block by block, each block's linears rounded against the
    inputs the already-quantized blocks before it produce (compress/calibrate.py `layerwise`;
    blocks that do not chain fall back to one-shot, with a warning naming why); False measures
    every layer on the unquantized model in one pass.
    """

    validate_quantize(scheme, group_size)
    if method is None:
        method = "gptq" if calibration is not None and scheme in ("int4", "int8") else "rtn"
    if method not in METHODS:
        raise ValueError(f"quantize_: method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "gptq" and (calibration is None or scheme not in ("int4", "int8")):
        raise ValueError("quantize_: method='gptq' needs calibration batches (calibration=...) "
                         f"and scheme 'int4' or 'int8' (got scheme={scheme!r}"
                         f"{', no calibration' if calibration is None else ''})")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    heads = set() if quantize_lm_head else lm_head_like(model)
    skipped, chosen = {}, []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        reason = None
        if matches_any(name, skip):
            reason = "matches quantize_skip"
        elif name in heads:
            reason = "lm head (tied to an embedding or vocabulary-sized); pass quantize_lm_head=True"
        else:
            reason = unsupported_reason(scheme, mod.out_features, mod.in_features, group_size)
        if reason is None and scheme == "fp8":
            check_fp8_device(mod.weight.device)
        if reason is not None:
            skipped[name] = reason
        else:
            chosen.append(name)
    if method == "gptq" and chosen:
        from .gptq import gptq_pack

        def visit(name, mod, H):
            return QuantizedLinear.from_linear(
                mod, scheme, group_size,
                packed=gptq_pack(mod.weight, H, scheme, group_size, mod.weight.dtype))

        compress_layers(model, chosen, calibration, visit, f"quantize_ ({scheme}, gptq)", sequential)
        return skipped
    for name in chosen:
        replace_module(model, name, QuantizedLinear.from_linear(model.get_submodule(name), scheme, group_size))
    return skipped
