"""Training signals: the teacher's next-token distribution (KL, full or top-k) and the text's next token.

Temperature: 1 by default. Perplexity and zero-shot scoring read the student's distribution at
temperature 1, so matching the teacher there is matching what is measured; a higher temperature
spends the student's few parameters on the teacher's tail, which neither metric looks at. With T ≠ 1
the loss is scaled by T² so gradients keep their size (Hinton et al.).

Top-k: a 262k-word teacher distribution per token does not fit in a cache, but its top k
log-probabilities and the mass left outside them do; the KL between the two distributions coarsened
to those k + 1 outcomes (k words and "any other word") is a lower bound of the full KL that equals it
when k covers the vocabulary, and it lets the teacher run once per window instead of once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_TAIL_FLOOR = 1e-6  # keeps log(1 - Σ top-k p) finite when the top k hold (nearly) all the mass


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) at `temperature`, × T²."""
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature**2


@dataclass
class TopK:
    """A teacher distribution per token: top-k log-probabilities, their word ids, log of the rest."""

    logp: torch.Tensor  # [..., k] float32
    ids: torch.Tensor  # [..., k] int64
    tail: torch.Tensor  # [...] log(1 - Σ top-k p), floored

    def __getitem__(self, index) -> TopK:
        return TopK(self.logp[index], self.ids[index], self.tail[index])

    def to(self, device: torch.device | str) -> TopK:
        return TopK(self.logp.to(device), self.ids.to(device), self.tail.to(device))


def _tail(logp_top: torch.Tensor) -> torch.Tensor:
    mass = logp_top.exp().sum(-1)
    return torch.log1p(-mass.clamp(max=1 - _TAIL_FLOOR))


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits in float32 (a bf16 forward's are 16-bit), divided by the distillation temperature."""
    z = logits.float()
    return z if temperature == 1.0 else z / temperature


def topk_of(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The top-k of log_softmax(logits / T), without writing the whole log_softmax: top-k logits minus their
    logsumexp (the same order, one read of the vocabulary fewer)."""
    z = _scaled(logits, temperature)
    top, ids = z.topk(min(k, z.shape[-1]), -1)
    top = top - z.logsumexp(-1, keepdim=True)
    return TopK(top, ids, _tail(top))


def kl_topk(student_logits: torch.Tensor, teacher: TopK, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL between the k + 1-outcome coarsenings of teacher and student, × T².

    The student's log-probabilities are needed at the teacher's k words only: gathered logits minus the
    logsumexp, so neither the forward nor the backward writes a vocabulary-wide log_softmax."""
    z = _scaled(student_logits, temperature)
    s_top = z.gather(-1, teacher.ids) - z.logsumexp(-1, keepdim=True)
    s_tail = _tail(s_top)
    p = teacher.logp.exp()
    kl = (p * (teacher.logp - s_top)).sum(-1) + teacher.tail.exp() * (teacher.tail - s_tail)
    return kl.mean() * temperature**2


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The language-modelling loss: every position but the last predicts the next token of the text."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
