"""TRL's trainers (SFT, DPO, GRPO, GKD) on a model compiled in place with backend="liger".

Each test runs a few steps of one trainer twice from the same seed on a tiny Llama built from a
config (no downloads) with a character-level tokenizer built in code and an in-memory dataset:
once eager, once after `ligerfx.compile_in_place(model, ...)`.  Every step's loss must be equal
(fp32, relative 1e-5; measured: bit-equal for SFT / DPO / GRPO, up to 5e-7 for GKD, whose fused
backward rounds the student gradients differently in the last bits: rounding, which
`validate="raise"` checks rewrite by rewrite on the first call), the logged gradient norms too,
and ligerfx's reports must show every decoder-layer pattern of the model rewritten.

What TRL 1.16 leaves to ligerfx (docs/trl.md):
- SFT, DPO, GRPO replace the model's forward with TRL's own fused lm head (`add_fused_lm_head`:
  a chunked log-prob autograd.Function that Dynamo cannot trace, so the graph breaks there and
  it runs as TRL wrote it).  ligerfx fuses the backbone (norms, RoPE, SwiGLU); the head and the
  per-token log-probs are TRL's.
- GKD's model returns logits and the generalised JSD is computed in `compute_loss`, outside the
  compiled module.  Compiling the loss as well gives ligerfx the divergence, but TRL's
  `jsd[mask]` (boolean indexing) breaks the graph between the per-token divergence and its
  reduction, so it is a near miss saying so until per-token losses are fused across a graph
  break.
- TRL's configs default to `gradient_checkpointing=True`: each decoder layer then runs under
  torch.utils.checkpoint, where Dynamo graph-breaks (transformers' hub-kernel context variable is
  written inside the checkpoint) and no layer is fused; the tests set it to False, as users must.

The kernels run on their torch path with inner="eager" (the trainers' integration is under
test; kernels and inner backends are tested elsewhere).
"""

from __future__ import annotations

import logging
import string

import pytest
import torch

import ligerfx
from tests.models.hf import HF_MODELS, build

trl = pytest.importorskip(
    "trl", reason="TRL is not installed: pip install -e '.[trl]' (the trl test extra)")
pytest.importorskip("datasets", reason="TRL's trainers need `datasets` (installed with trl)")

STEPS = 3
REL = 1e-5
# The decoder-layer patterns of one forward of the tiny Llama (its lm head is TRL's in SFT / DPO /
# GRPO, and GKD's loss is outside the model).
BACKBONE = {k: HF_MODELS["llama"]["counts"][k] for k in ("rms_norm", "add_rms_norm", "rope",
                                                          "swiglu")}
COMMON = dict(per_device_train_batch_size=2, max_steps=STEPS, learning_rate=1e-3, seed=0,
              save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True,
              dataloader_num_workers=0, bf16=False,
              # TRL defaults to True; under checkpointing Dynamo fuses no layer (module docstring)
              gradient_checkpointing=False)
OPTIONS = dict(inner="eager", validate="raise")


def tokenizer():
    """A character-level tokenizer built in code: specials 0-3 (pad, eos, bos, unk), then the
    printable characters; a chat template for the conversational datasets (GKD)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}assistant: "
                         "{% endif %}")
    return tok


def model(seed: int = 0):
    m, _ = build("llama", seed=seed, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return m


class _Reports(logging.Handler):
    """Every graph's report as the backend logs it (all compiled models, every recompile)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reports: list = []

    def emit(self, record):
        from ligerfx.compiler.report import Report

        if record.args and isinstance(record.args[0], Report):
            self.reports.append(record.args[0])


def _train(cls, kwargs, compiled: bool, compile_loss=None):
    """(losses per step, grad norms per step, reports, trainer) of STEPS steps."""
    from datasets import Dataset  # noqa: F401 - the kwargs hold Datasets; fail here if absent

    policy = model()
    if compiled:
        assert ligerfx.compile_in_place(policy, training_args=kwargs["args"], **OPTIONS) is policy
    losses = []

    class Recording(cls):
        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            losses.append(loss.detach().clone())
            return loss

    grab, log = _Reports(), logging.getLogger("ligerfx")
    level = log.level
    log.addHandler(grab)
    log.setLevel(logging.INFO)
    try:
        trainer = Recording(model=policy, **kwargs)
        if compile_loss is not None:
            compile_loss(trainer)
        trainer.train()
    finally:
        log.removeHandler(grab)
        log.setLevel(level)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return losses, norms, grab.reports, trainer


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).item() if b.abs() > 0 else a.abs().item()


def _check(make, compile_loss=None):
    """Run eager and compiled, compare per step, return the compiled run's reports."""
    e_losses, e_norms, _, _ = _train(*make(), compiled=False)
    losses, norms, reports, _ = _train(*make(), compiled=True, compile_loss=compile_loss)
    assert len(losses) == len(e_losses) == STEPS and len(norms) == len(e_norms) == STEPS
    for step, (a, b) in enumerate(zip(losses, e_losses)):
        assert _rel(a, b) <= REL, f"step {step}: loss {a.item()!r}, eager {b.item()!r}"
    for step, (a, b) in enumerate(zip(norms, e_norms)):
        assert _rel(a, b) <= REL, f"step {step}: grad norm {a!r}, eager {b!r}"
    assert reports, "no graph went through the liger backend"
    return reports


def _model_graphs(reports):
    """The reports of graphs that hold the decoder layers: each must have them all rewritten
    (training forward, and generate()'s prefill / decode graphs)."""
    full = [r for r in reports if r.matches]
    for r in full:
        assert {k: v for k, v in r.counts.items() if v} == BACKBONE, r
    return full


# -- SFT -------------------------------------------------------------------------------------

def _sft(tmp_path):
    from datasets import Dataset

    texts = ["the quick brown fox", "jumps over the dog", "hello tiny world",
             "fused kernels here", "exact as eager", "no gpu, two cores"]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=24, **COMMON)
    return trl.SFTTrainer, dict(args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                processing_class=tokenizer())


def test_sft_trainer(tmp_path, torch_path):
    reports = _check(lambda: _sft(tmp_path))
    assert _model_graphs(reports)
    assert not [m for r in reports for m in r.near_misses], reports


# -- DPO -------------------------------------------------------------------------------------

def _dpo(tmp_path):
    from datasets import Dataset

    data = {"prompt": ["what is 2+2? ", "say hi: ", "color of sky? ", "a b c "] * 2,
            "chosen": ["4", "hi", "blue", "d e"] * 2,
            "rejected": ["5!", "bye now", "red", "x"] * 2}
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=24, **COMMON)
    # An explicit reference model (a model built from a config has no path to reload one from);
    # left eager here, it can be compiled in place as well.
    return trl.DPOTrainer, dict(args=args, train_dataset=Dataset.from_dict(data),
                                processing_class=tokenizer(), ref_model=model())


def test_dpo_trainer(tmp_path, torch_path):
    reports = _check(lambda: _dpo(tmp_path))
    assert _model_graphs(reports)
    assert not [m for r in reports for m in r.near_misses], reports


# -- GRPO ------------------------------------------------------------------------------------

def _reward(completions, **kwargs):
    # distinct per completion, so the group advantages (and the gradients) are not zero
    return [sum(map(ord, c)) / 100.0 for c in completions]


def _grpo(tmp_path):
    from datasets import Dataset

    args = trl.GRPOConfig(output_dir=str(tmp_path), max_completion_length=4, num_generations=2,
                          **COMMON)
    data = {"prompt": ["count: 1 2 ", "abc ", "hello ", "tiny "] * 2}
    return trl.GRPOTrainer, dict(args=args, train_dataset=Dataset.from_dict(data),
                                 processing_class=tokenizer(), reward_funcs=_reward)


def test_grpo_trainer(tmp_path, torch_path):
    # GRPO's loss is zero here (ratio 1, advantages summing to zero over equal-length
    # completions); its gradient is not, so the grad norms carry the comparison.
    reports = _check(lambda: _grpo(tmp_path))
    # model.generate() runs the compiled forward too (prefill and decode graphs, no_grad)
    assert len(_model_graphs(reports)) >= 2
    assert not [m for r in reports for m in r.near_misses], reports


# -- GKD -------------------------------------------------------------------------------------

def _gkd(tmp_path):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    pairs = [("hi", "yo"), ("2+2", "4"), ("sky", "blue"), ("abc", "def"), ("cat", "meow"),
             ("one", "two")]
    data = {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                         for q, a in pairs]}
    args = GKDConfig(output_dir=str(tmp_path), max_new_tokens=4, **COMMON)
    # lmbda 0.5 (default): some steps train on the student's own generate() samples
    return GKDTrainer, dict(args=args, train_dataset=Dataset.from_dict(data),
                            processing_class=tokenizer(), teacher_model=model(seed=1))


def _compile_gkd_loss(trainer):
    # the loss outside the model, compiled as well (a staticmethod: the instance attribute
    # shadows it and `self.generalized_jsd_loss(...)` calls the compiled function)
    trainer.generalized_jsd_loss = torch.compile(type(trainer).generalized_jsd_loss,
                                                 backend="liger", options=OPTIONS)


def test_gkd_trainer(tmp_path, torch_path):
    reports = _check(lambda: _gkd(tmp_path), compile_loss=_compile_gkd_loss)
    assert _model_graphs(reports)
    # The divergence: fused on the given logits (distillation_loss), or, while TRL's `jsd[mask]`
    # cuts the graph between the per-token divergence and its sum, a near miss saying so.
    fused = sum(r.counts.get("distillation_loss", 0) for r in reports)
    misses = [m for r in reports for m in r.near_misses]
    if not fused:
        assert misses and all(m.pattern == "fused_linear_distillation"
                              and "used by a graph output" in m.reason for m in misses), misses
    else:
        assert not misses, misses
