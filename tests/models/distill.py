"""Student/teacher distillation steps in the styles users and trainer libraries write them.

`LOSSES` maps a style name to `loss(s, t, labels) -> scalar`, with s / t the student / teacher
logits [B, S, V] and labels [B, S] (-100 = ignored). `Distill` wraps a student and a teacher
(a second model, run under no_grad, or precomputed logits passed as an input) and returns the loss,
so tests/compare.compare_training_step checks the loss and every student gradient.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

T = 2.0


def kl_batchmean_t2(s, t, labels):
    # the classic Hinton loss: batchmean divides by the first dim as written (B, not tokens)
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2


def kl_log_target_rows(s, t, labels):
    V = s.shape[-1]
    return F.kl_div(F.log_softmax(s / T, dim=-1).view(-1, V), F.log_softmax(t / T, -1).view(-1, V),
                    reduction="batchmean", log_target=True) * (T * T)


def kl_hand_written(s, t, labels):
    pt = F.softmax(t / T, -1)
    return (pt * (pt.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T**2


def reverse_kl_masked(s, t, labels):
    ls = F.log_softmax(s, -1)
    kl = (ls.exp() * (ls - F.log_softmax(t, -1))).sum(-1)
    mask = (labels != -100).float()
    return (kl * mask).sum() / mask.sum()


def generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                    log1p=False):
    """GKD's generalised JSD as TRL's GKDTrainer writes it (mask by multiplication, not
    boolean indexing, which Dynamo cannot trace without a graph break); `log1p`: the student's
    weight as TRL 1.16 spells it, `torch.log1p(-beta)` instead of `torch.log(1 - beta)`."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + (torch.log1p(-beta) if log1p
                                              else torch.log(1 - beta)),
                         teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none",
                              log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none",
                              log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    mask = labels != -100
    return (jsd.sum(-1) * mask).sum() / mask.sum()


def jsd_python_beta(s, t, labels, beta=0.3):
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    m = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
    return (beta * F.kl_div(m, lt, reduction="sum", log_target=True)
            + (1 - beta) * F.kl_div(m, ls, reduction="sum", log_target=True)) / s.shape[0]


def tvd_masked(s, t, labels):
    tv = 0.5 * (F.softmax(s, -1) - F.softmax(t, -1)).abs().sum(-1)
    mask = labels != -100
    return (tv * mask).sum() / mask.sum()


def kd_plus_ce(s, t, labels, alpha=0.3):
    V = s.shape[-1]
    ce = F.cross_entropy(s.view(-1, V), labels.view(-1))
    kd = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    return alpha * ce + (1 - alpha) * kd


LOSSES = {
    "kl_batchmean_t2": kl_batchmean_t2,
    "kl_log_target_rows": kl_log_target_rows,
    "kl_hand_written": kl_hand_written,
    "reverse_kl_masked": reverse_kl_masked,
    "gkd_jsd_beta0": lambda s, t, y: generalized_jsd(s, t, y, beta=0.0, temperature=T),
    "gkd_jsd_beta05": lambda s, t, y: generalized_jsd(s, t, y, beta=0.5),
    "gkd_jsd_beta1": lambda s, t, y: generalized_jsd(s, t, y, beta=1.0),
    # beta 0.2: log1p(-0.2) and log(1 - 0.2) differ in fp32 by a rounding: the op must
    # read the value eager adds
    "gkd_jsd_log1p": lambda s, t, y: generalized_jsd(s, t, y, beta=0.2, log1p=True),
    "jsd_python_beta": jsd_python_beta,
    "tvd_masked": tvd_masked,
    "kd_plus_ce": kd_plus_ce,
}


class TinyLM(nn.Module):
    def __init__(self, vocab, hidden, bias=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=bias)

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.proj(self.emb(ids))))


class Distill(nn.Module):
    """loss(student(ids), teacher(ids) under no_grad [or teacher_logits], labels)."""

    def __init__(self, student, teacher, loss, hf=False):
        super().__init__()
        self.student, self.teacher, self.loss, self.hf = student, teacher, loss, hf

    def _logits(self, m, ids):
        return m(input_ids=ids).logits if self.hf else m(ids)

    def forward(self, ids, labels, teacher_logits=None):
        s = self._logits(self.student, ids)
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = self._logits(self.teacher, ids)
        return self.loss(s, teacher_logits, labels)


def make(loss, vocab=48, hidden=16, bias=False, batch=2, seq=5, seed=0):
    """(Distill model, args) with a student and a differently initialised, wider teacher."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = TinyLM(vocab, hidden, bias)
        teacher = TinyLM(vocab, 2 * hidden, True)
        for p in teacher.parameters():
            p.requires_grad_(False)
        ids = torch.randint(0, vocab, (batch, seq))
        labels = torch.randint(0, vocab, (batch, seq))
        labels[0, -2:] = -100
    return Distill(student, teacher, loss), (ids, labels)
