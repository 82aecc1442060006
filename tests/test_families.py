"""Every model family Liger-Kernel patches (issue 13 §4), built tiny from configs, rewritten whole.

Built like Liger-Kernel's convergence suite (2 layers, hidden 64, vocab 256, from configs, no
downloads: tests/models/families.py).  For each family the expectations come from the model's own
structure, one rule for all (`find_sites`: the norm modules that run, the attention calls that
apply a rotary function, the gated / ReLU² MLPs, the loss), never from per-model numbers:

- every norm is rewritten (`rms_norm` / `layer_norm`, or their residual-add forms), every gated
  norm into `gated_rms_norm`, every attention's q and k into one `rope` (a rotation with no
  partner by the same angles into `rope_single`: DeepSeek-V4's compressor), every dense gated MLP
  (and expert block written as one gated product) into its activation's op, the loss into
  `fused_linear_cross_entropy` / `cross_entropy`, with no near miss;
- one training step (loss and every gradient) equals eager in fp32 (relative error < 1e-4);
- separately, every norm fed by a residual add becomes one `add_rms_norm` / `add_layer_norm`.

Families whose forms other items of issue 13 add are marked xfail(strict=True) in `NEEDS`, the one
table to edit when those items land (strict: the xfail fails once the form works, so the entry
cannot be forgotten).  Families that plain aot_eager cannot train either run with inner="eager"
(see the note in tests/models/families.py `FAMILIES`).
"""

from __future__ import annotations

import functools

import pytest
import torch

import ligerfx.backend
from tests.compare import compare_training_step
from tests.models.families import FAMILIES, MLP_OPS, build_family, extra, find_sites, unrewritten

pytest.importorskip("transformers")

# The one table: family -> what it waits for (items of issue 13 that other work adds).
# Flip an entry (delete it) when its item lands; strict xfail fails the run until then.
NEEDS: dict = {}
# Every family's residual adds wait for item §1 (add_rms_norm / add_layer_norm).
ADD_NORM_NEEDS = "needs add_rms_norm / add_layer_norm (issue 13 §1)"
ADD_NORM_LANDED = True  # §1 landed
# Over a minute each on 2 CPU cores (Mamba / compressed-attention reference code): not needed
# for the guarantee the others give, which share their norm / rope / MLP / loss forms.
SLOW = {"falcon_h1", "deepseek_v4"}


def _param(name: str, reason: str | None):
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    if name in SLOW:
        marks.append(pytest.mark.slow)
    return pytest.param(name, marks=marks)


@functools.lru_cache(maxsize=None)
def _step(name):
    """(sites, report, error) of one compiled training step, shared by both tests."""
    try:
        model, inputs, inner = build_family(name)
    except (ValueError, KeyError, ImportError) as e:  # a family this transformers lacks
        pytest.skip(f"transformers cannot build {name}: {e}")
    sites = find_sites(model, inputs)
    try:
        return sites, compare_training_step(model, inputs, options={"inner": inner}), None
    except AssertionError as e:
        return sites, ligerfx.backend.last_report, str(e)


@pytest.mark.parametrize("family", [_param(f, NEEDS.get(f)) for f in FAMILIES])
def test_family_rewritten_and_eager_equal(family):
    sites, report, error = _step(family)
    want = sites.expected()
    # the oracle found the structure (a site count of 0 would make the rule below vacuous)
    assert want["norm"] + want["gated_norm"] > 0 and want["rope"] > 0 and want["loss"] == 1, want
    assert error is None, f"training step differs from eager: {error}"
    missing = unrewritten(report.counts, sites, add_norm=False)
    assert not missing, (f"(rewrites, sites) per kind: {missing}; counts {report.counts}; "
                         f"near misses: {[str(m) for m in report.near_misses]}")
    # more rewrites than sites only for gated products outside MLP modules (Mamba's gate)
    assert set(extra(report.counts, sites)) <= set(MLP_OPS) | {"add_norm"}, report.counts
    # a near miss at a site is a fusion the site lost (e.g. a norm's add refused); elsewhere it
    # explains a look-alike that is not a site (Qwen3-Next's linear attention L2-normalises q/k)
    site_modules = ({m for m, _, _ in sites.norms} | set(sites.rope) | set(sites.rope_single)
                    | {m for m, _ in sites.mlps})
    at_sites = [str(m) for m in report.near_misses if m.location.module in site_modules]
    assert not at_sites, at_sites


@pytest.mark.parametrize("family", [
    _param(f, None if ADD_NORM_LANDED else ADD_NORM_NEEDS) for f in FAMILIES])
def test_family_residual_adds_fused(family):
    sites, report, _ = _step(family)
    if not sites.expected()["add_norm"]:
        pytest.skip("no norm of this family reads a residual add")
    assert "add_norm" not in unrewritten(report.counts, sites), report.counts


def test_site_rule_counts_what_is_missing_and_what_is_extra():
    """The comparison both tests and tools/census.py use: fewer rewrites than sites is missing,
    a norm fused with its add still counts as the norm, a gated norm needs its own op."""
    from tests.models.families import Sites

    sites = Sites(norms=[("a", False, False), ("b", False, True), ("c", True, False)],
                  rope=["attn"], mlps=[("mlp", "swiglu"), ("moe", "gated tanh")], loss=1)
    assert sites.expected() == dict(norm=2, gated_norm=1, add_norm=1, rope=1, rope_single=0,
                                    loss=1, swiglu=1)
    counts = {"rms_norm": 1, "add_rms_norm": 1, "rope": 1, "swiglu": 2, "cross_entropy": 1}
    assert unrewritten(counts, sites) == {"gated_norm": (0, 1)}
    assert extra(counts, sites) == {"swiglu": (2, 1)}
    counts = {"rms_norm": 3, "rope_single": 2, "fused_linear_cross_entropy": 1}
    assert unrewritten(counts, sites) == {"gated_norm": (0, 1), "add_norm": (0, 1),
                                          "rope": (0, 1), "swiglu": (0, 1)}
    assert "add_norm" not in unrewritten(counts, sites, add_norm=False)
    # rotations the oracle finds paired are not covered by singles; singles beyond the lone
    # rotations are extra
    assert extra(counts, sites) == {"norm": (3, 2), "rope_single": (2, 0)}
    lone = Sites(rope_single=["compressor", "compressor"], loss=1)
    assert unrewritten({"rope_single": 1, "cross_entropy": 1}, lone) == {"rope_single": (1, 2)}
    assert not unrewritten({"rope_single": 2, "cross_entropy": 1}, lone)


def test_rotation_sites_pair_equal_tables_only():
    """The oracle's rotary rule: one call rotating two tensors, or two calls with equal tables
    and q/k-compatible tensors, is a pair; other tables (other positions, -sin) leave singles."""
    from tests.models.families import _rotation_sites

    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 1, 6, 8)
    cos, sin = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    assert _rotation_sites([((q, k), [cos, sin])]) == (1, 0)
    # DeepSeek-V4's attention: q and kv one call each (tables recomputed: equal values), the
    # output rotated back by (cos, -sin)
    calls = [((q,), [cos, sin]), ((k,), [cos.clone(), sin.clone()]), ((q,), [cos, -sin])]
    assert _rotation_sites(calls) == (1, 1)
    # its indexer: keys at window positions (other tables), queries at token positions
    win = torch.randn(2, 1, 3, 8)
    assert _rotation_sites([((win,), [cos[:, :3], sin[:, :3]]), ((q,), [cos, sin])]) == (0, 2)
    # equal tables but tensors no launch takes as q and k (they differ in more than the heads)
    assert _rotation_sites([((q,), [cos, sin]), ((q[:1, :2],), [cos, sin])]) == (0, 2)


def test_tiny_config_keeps_each_layer_kind():
    from ligerfx.dump.hf_targets import _covering

    assert _covering(["lin", "lin", "lin", "full"] * 4, 2) == ["lin", "full"]
    assert _covering(["a", "a", "a"], 2) == ["a", "a"]
    assert _covering([1, 1, 0, 1], 3) == [1, 1, 0]
