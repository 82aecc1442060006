"""Hugging Face `Trainer` with a liger-compiled model: `ligerfx.compile_in_place` before the Trainer.

Five Trainer steps (AdamW, the Trainer's own loss scaling by `num_items_in_batch`) on a tiny Llama
from a config, eager and compiled: every step's loss and the final parameters agree (fp32 relative
error < 1e-4), ligerfx's report shows the rewrites, and the saved checkpoint has eager's keys.
The kernels run on their torch path (the integration is under test; the kernels are tested on
both paths elsewhere).  The wrong uses (`torch.compile`'s wrapper, `torch_compile=True`) raise
`OptionsError` naming the fix.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ligerfx
import ligerfx.backend
from tests.models.hf import HF_MODELS, build

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

STEPS = 5


class _Tokens(torch.utils.data.Dataset):
    """Fresh random token rows (labels = inputs, a few ignored), the same for both runs."""

    def __init__(self, n: int = 2 * STEPS, seq: int = 16, vocab: int = 256):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)
        self.labels = self.ids.clone()
        self.labels[::3, -4:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], labels=self.labels[i])


def _train(tmp_path, name: str, compiled: bool):
    from transformers import Trainer, TrainingArguments

    model, _ = build("llama")
    args = TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=STEPS,
        learning_rate=1e-3, seed=0, save_strategy="no", report_to=[], logging_steps=STEPS,
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    if compiled:
        ligerfx.backend.last_report = None
        assert ligerfx.compile_in_place(model, training_args=args, inner="aot_eager") is model
    losses = []

    class Recording(Trainer):
        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            losses.append(loss.detach().clone())
            return loss

    trainer = Recording(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    trainer.save_model(str(tmp_path / name / "final"))
    return trainer, losses


def _saved_keys(path) -> set:
    from safetensors.torch import load_file

    return set(load_file(str(path / "final" / "model.safetensors")))


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_trainer_steps_match_eager(tmp_path, torch_path):
    eager, eager_losses = _train(tmp_path, "eager", compiled=False)
    liger, losses = _train(tmp_path, "liger", compiled=True)

    report = ligerfx.backend.last_report
    assert report is not None, "the Trainer's steps did not go through the liger backend"
    want = {k: HF_MODELS["llama"]["counts"][k]
            for k in ("rms_norm", "add_rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")
            if HF_MODELS["llama"]["counts"].get(k)}
    assert {k: v for k, v in report.counts.items() if v} == want, report
    assert not report.near_misses, report

    assert len(losses) == len(eager_losses) == STEPS
    for step, (a, b) in enumerate(zip(losses, eager_losses)):
        assert rel_err(a, b) < 1e-4, (step, a.item(), b.item())
    ref = dict(eager.model.named_parameters())
    for name, p in liger.model.named_parameters():
        err = rel_err(p.detach(), ref[name].detach())
        assert err < 1e-4, f"{name} after {STEPS} steps: relative error {err:.2e}"
    # The Trainer kept the module itself: checkpoints have the eager model's keys (no _orig_mod.)
    assert type(liger.model) is type(eager.model)
    assert _saved_keys(tmp_path / "liger") == _saved_keys(tmp_path / "eager")


def test_refuses_torch_compile_wrapper():
    model, _ = build("llama")
    wrapped = torch.compile(model, backend="liger")
    with pytest.raises(ligerfx.OptionsError, match=r"_orig_mod"):
        ligerfx.compile_in_place(wrapped)


def test_refuses_training_args_that_compile_again(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    # TrainingArguments(torch_compile=True) exports ACCELERATE_DYNAMO_BACKEND; keep it local.
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    args = TrainingArguments(output_dir=str(tmp_path), torch_compile=True, use_cpu=True,
                             report_to=[])
    model, _ = build("llama")
    with pytest.raises(ligerfx.OptionsError, match=r"torch_compile"):
        ligerfx.compile_in_place(model, training_args=args)
    assert model._compiled_call_impl is None  # refused before compiling anything


def test_refuses_bad_option_and_non_module():
    model, _ = build("llama")
    with pytest.raises(ligerfx.OptionsError, match=r"innr"):
        ligerfx.compile_in_place(model, innr="eager")
    with pytest.raises(ligerfx.OptionsError, match=r"nn.Module"):
        ligerfx.compile_in_place(lambda x: x)
    assert model._compiled_call_impl is None


def test_warns_that_gradient_checkpointing_leaves_the_layers_unfused():
    # Under torch.utils.checkpoint no layer is rewritten and no near miss says so (TRL's configs
    # turn it on by default): compile_in_place says it, from the arguments or from the model.
    # (The arguments stand in for TrainingArguments: building those costs seconds.)
    from types import SimpleNamespace

    model, _ = build("llama")
    with pytest.warns(UserWarning, match=r"gradient_checkpointing=False"):
        ligerfx.compile_in_place(model, training_args=SimpleNamespace(gradient_checkpointing=True))
    model, _ = build("llama")
    model.gradient_checkpointing_enable()
    with pytest.warns(UserWarning, match=r"gradient checkpointing is on"):
        ligerfx.compile_in_place(model)
    model, _ = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # off: no warning
        ligerfx.compile_in_place(model, training_args=SimpleNamespace(gradient_checkpointing=False))
