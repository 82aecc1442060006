"""Structured pruning of MLP hidden channels: `ligerfx.prune_(model, mlp=0.5, calibration=...)`.

Removing hidden channel j of an elementwise MLP (found by data flow, compress/channels.py)
removes row j of every producing linear (gate/up, with their biases) and column j of the
consuming linear (down): a smaller dense model, faster on any hardware without special kernels.

Which channels, and what the consumer becomes, are decided per MLP from H = X^T X of the
consumer's inputs X (calibration batches; measured block by block on the already-pruned earlier
blocks' outputs, compress/calibrate.py `layerwise`):
- select="obs" (default with reconstruct): greedy backward elimination that accounts for
  correlations between channels: the channel whose removal (with the rest re-fitted) costs least
  output error, ||W[:, j]||^2 / [H^-1]_jj, is dropped, the weight and H^-1 updated (Optimal Brain
  Surgeon), and so on.  select="energy" (default with remove): keep the channels that carry most
  output energy ||W[:, j]||^2 H_jj.
- method="reconstruct" (default): the consumer's kept columns re-fitted by least squares to the
  unpruned layer's output, W_S = W H[:, S] (H[S, S] + damp I)^-1 (float64, solved, not inverted).
  method="remove": the kept columns as they were.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
import torch.nn as nn

from . import channels
from .calibrate import compress_layers

METHODS = ("reconstruct", "remove")
SELECTS = ("obs", "energy")
# Channels dropped per OBS step: on a 576 x 1536 down projection (768 dropped) blocks of 4, 16
# and 64 left 0.35%, 0.353% and 0.354% relative output error (energy selection 0.365%) at 44 s,
# 13 s and 5 s; exact greedy (1) would take minutes per layer.
OBS_BLOCK = 32


def energy_order(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Channel indices, least output energy first."""
    return torch.argsort(W.double().pow(2).sum(0) * torch.diagonal(H))


def obs_order(W: torch.Tensor, H: torch.Tensor, n_drop: int, damp: float, block: int = 1) -> torch.Tensor:
    """The first `n_drop` channels dropped by greedy OBS elimination, in order; `block` channels
    (the cheapest) are dropped together per step, with the joint OBS update (block=1: exact
    greedy; larger blocks trade a little of the selection for block-fold fewer updates)."""
    I = H.shape[0]
    Hd = H + _damp(H, damp) * torch.eye(I, dtype=H.dtype, device=H.device)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
    Wc = W.double().clone()
    alive = torch.ones(I, dtype=torch.bool, device=H.device)
    dropped = []
    while len(dropped) < n_drop:
        cost = Wc.pow(2).sum(0) / torch.diagonal(Hinv)
        cost[~alive] = float("inf")
        J = torch.topk(cost, min(block, n_drop - len(dropped)), largest=False).indices
        rows = Hinv[J]  # [b, I]
        step = torch.linalg.solve(rows[:, J], rows)  # (Hinv_JJ)^-1 Hinv_J:
        Wc -= Wc[:, J] @ step
        Hinv -= rows.t() @ step
        # Exactly zero, not rounding noise, so a dropped channel never looks cheap again.
        Wc[:, J] = 0
        Hinv[J, :] = 0
        Hinv[:, J] = 0
        Hinv[J, J] = 1
        alive[J] = False
        dropped += J.tolist()
    return torch.tensor(dropped, dtype=torch.long)


def _damp(H: torch.Tensor, damp: float) -> float:
    d = float(torch.diagonal(H).mean())
    return damp * (d if d > 0 else 1.0)


def refit(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """W_S = W H[:, S] (H[S, S] + damp I)^-1 (float64): the kept columns that best reproduce
    W x on the calibration inputs."""
    Hs = H[keep][:, keep]
    A = Hs + _damp(Hs, damp) * torch.eye(len(keep), dtype=H.dtype, device=H.device)
    rhs = H[keep] @ W.double().t()  # H[S, :] W^T  [|S|, out]
    return torch.linalg.solve(A, rhs).t()


def keep_channels(W, H, k: int, select: str, damp: float) -> torch.Tensor:
    """Sorted indices of the `k` channels kept."""
    I = W.shape[1]
    if select == "energy":
        drop = energy_order(W, H)[: I - k]
    else:
        drop = obs_order(W, H, I - k, damp, block=OBS_BLOCK)
    mask = torch.ones(I, dtype=torch.bool)
    mask[drop.cpu()] = False
    return torch.nonzero(mask).flatten().to(H.device)


def _rows(lin: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(keep), bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight[keep])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[keep])
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def _columns(lin: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    new = nn.Linear(weight.shape[1], lin.out_features, bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.to(lin.weight.dtype))
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def _validate(mlp, heads, calibration, method, select, damp):
    if isinstance(mlp, bool) or not isinstance(mlp, (int, float)) or not 0.0 <= mlp < 1.0:
        raise ValueError(f"prune_: mlp is the fraction of each MLP's hidden channels removed, a "
                         f"number in [0, 1); got {mlp!r}")
    if isinstance(heads, bool) or not isinstance(heads, (int, float)) or not 0.0 <= heads < 1.0:
        raise ValueError(f"prune_: heads is a fraction in [0, 1); got {heads!r}")
    if heads > 0:
        raise NotImplementedError(
            "prune_: pruning attention heads (heads > 0) is not implemented yet: only MLP hidden "
            "channels are pruned; pass heads=0")
    if method not in METHODS:
        raise ValueError(f"prune_: method must be one of {', '.join(METHODS)}; got {method!r}")
    if select not in SELECTS:
        raise ValueError(f"prune_: select must be one of {', '.join(SELECTS)}; got {select!r}")
    if calibration is None:
        raise ValueError("prune_: pass calibration=batches (token-id tensors or dicts of model "
                         "keyword arguments): the channels kept are chosen by their effect on the "
                         "MLP's output on those inputs")
    if isinstance(calibration, (torch.Tensor, dict)):
        raise ValueError("prune_: calibration is an iterable of batches; wrap a single batch in a "
                         "list: calibration=[batch]")
    if not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"prune_: damp must be a positive number (relative to H's mean diagonal); "
                         f"got {damp!r}")


def prune_(model: nn.Module, mlp: float = 0.5, heads: float = 0.0, calibration: Optional[Iterable] = None,
           method: str = "reconstruct", select: Optional[str] = None, damp: float = 0.01,
           sequential: bool = True) -> dict:
    """Remove the fraction `mlp` of every elementwise MLP's hidden channels, in place.

    Returns {module name: reason} for every module with two or more linears that was not pruned
    (not an elementwise MLP, shared, ...).  Each pruned MLP keeps round((1 - mlp) * width)
    channels; its linears are replaced by smaller `nn.Linear`s, so the model stays dense and its
    state_dict loads into a model pruned by the same call.  A model with a Hugging Face style
    `config.intermediate_size` equal to the width of every pruned MLP (all pruned alike, none
    refused) gets it updated, so save_pretrained / from_pretrained round-trip.

    `calibration`: batches the model is run on (token-id tensors, or dicts of keyword arguments).
    `method`: "reconstruct" re-fits the consuming linear on the kept channels; "remove" only
    drops them.  `select`: "obs" (greedy, correlation-aware; the default with "reconstruct") or
    "energy" (per channel; the default with "remove").
    `damp`: ridge added to H, relative to its mean diagonal.  `sequential`: measure each block on
    the outputs of the already-pruned blocks before it (else all on the unpruned model).
    """
    if select is None:  # OBS's costs assume the re-fit; plain removal keeps the most energy
        select = "obs" if method == "reconstruct" else "energy"
    _validate(mlp, heads, calibration, method, select, damp)
    found, refused = channels.find(model)
    if not found:
        warnings.warn("prune_: no elementwise MLP found; nothing pruned", stacklevel=2)
        return refused
    # The consumer of each MLP is the layer visited; it also rewrites that MLP's producers.
    by_consumer = {f"{name}.{spec.consumer}" if name else spec.consumer: (name, spec)
                   for name, spec in found.items()}
    widths = {}

    def visit(cname, consumer, H):
        mname, spec = by_consumer[cname]
        k = spec.width - int(round(mlp * spec.width))
        widths[mname] = k
        if k == spec.width:  # nothing removed: leave the MLP exactly as it was
            return None
        W = consumer.weight.detach()
        H = H.to(W.device)
        keep = keep_channels(W, H, k, select, damp)
        Wk = refit(W, H, keep, damp) if method == "reconstruct" else W[:, keep]
        owner = model.get_submodule(mname) if mname else model
        for p in spec.producers:
            parent, _, child = p.rpartition(".")
            holder = owner.get_submodule(parent) if parent else owner
            setattr(holder, child, _rows(getattr(holder, child), keep))
        _shrink_attrs(owner, spec.width, k)
        return _columns(consumer, Wk)

    compress_layers(model, list(by_consumer), list(calibration), visit,
                    f"prune_ (mlp={mlp}, {method})", sequential)
    _update_config(model, found, widths)
    return refused


def _shrink_attrs(mod: nn.Module, old: int, new: int) -> None:
    """Integer attributes of the MLP module equal to its old width (a recorded intermediate size)
    follow the new width, so the module's own bookkeeping stays true."""
    for k, v in list(vars(mod).items()):
        if type(v) is int and v == old and not k.startswith("_"):
            setattr(mod, k, new)


def _update_config(model, found, widths) -> None:
    """config.intermediate_size follows the pruned width when every MLP of that width was
    pruned alike (no linear still reads `intermediate_size` features)."""
    config = getattr(model, "config", None)
    old = getattr(config, "intermediate_size", None)
    news = {widths[n] for n, spec in found.items() if n in widths and spec.width == old}
    if type(old) is not int or not news or news == {old}:
        return
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features == old]
    if len(news) == 1 and not left:
        config.intermediate_size = news.pop()
    else:
        warnings.warn(f"prune_: config.intermediate_size ({old}) was left as it was: the MLPs of that "
                      f"width were not all pruned to one width ({sorted(news)}"
                      f"{'; still ' + str(old) + ' wide: ' + left[0] if left else ''}), so "
                      "from_pretrained will not rebuild this model; load its state_dict into a "
                      "model pruned by the same call", stacklevel=3)
