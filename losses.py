"""Losses of probe distillation (the paper; the published loss.py), under the published names and argument orders.

    loss = KD + NA + patchattn · PD
    KD = kdloss(s, t)                            (robust_kdloss with --robust: each sample's KL x a class weight)
    NA = NoiseAdaptation(C, acc)(s, t)
    PD = patch_attention_probe_loss(f_t, f_s)

KD takes optional per-image weights (robust KD passes its class weights). PD's variants stand in TERMS by name;
a run's choices travel as one LossConfig. A new PD variant is one TERMS entry (it becomes a choice of --pd_loss)
and its test.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from published import KD_TEMPERATURE, PATCHATTN


def kdloss(y, teacher_scores, T=KD_TEMPERATURE):
    """T² · Σ_classes KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch."""
    log_p = F.log_softmax(y / T, dim=1)
    q = F.softmax(teacher_scores / T, dim=1)
    return F.kl_div(log_p, q, reduction="sum") * T * T / y.shape[0]


def robust_kdloss(y, teacher_scores, weights, T=KD_TEMPERATURE):
    """kdloss with each sample's KL scaled by `weights` (B,): the class weight of its teacher-predicted class."""
    log_p = F.log_softmax(y / T, dim=1)
    q = F.softmax(teacher_scores / T, dim=1)
    per_sample = F.kl_div(log_p, q, reduction="none").sum(dim=1)   # (B,)
    return (per_sample * weights).sum() * T * T / y.shape[0]


def patch_attention_probe_loss(feature_T, feature_S, num_prefix_tokens=1):
    """Probe distillation: match the CLS rows of token Gram matrices of teacher and student.

    feature_*: (L, B, N, C) block outputs (or a list of L tensors (B, N, C)). Each is
    L2-normalised along the TOKEN axis, as the published code does, so the two widths C may differ.
    g = (f @ fᵀ)[:, :, 0, prefix:] -> (L, B, N - prefix); loss = mean((g_T - g_S)²).
    """
    def cls_gram_row(f):
        if isinstance(f, (list, tuple)):
            f = torch.stack(list(f))
        f = F.normalize(f.float(), dim=2)                               # unit norm over tokens, per channel
        return torch.einsum("lbc,lbnc->lbn", f[:, :, 0], f[:, :, num_prefix_tokens:])
    g_t, g_s = cls_gram_row(feature_T), cls_gram_row(feature_S)
    if g_t.shape != g_s.shape:
        raise ValueError(f"teacher and student probe rows differ in shape: {tuple(g_t.shape)} vs "
                         f"{tuple(g_s.shape)} (need the same token count and number of blocks)")
    return (g_t - g_s).pow(2).mean()


class NoiseAdaptation(nn.Module):
    """DFND's noise adaptation: the student's softmax passes through a learnable transition matrix Q.

    Q (C×C): Q[i, i] = acc, row i off the diagonal = (1 - acc) · softmax(θ[i]), θ: (C, C-1) zeros at start.
    loss = NLL(log(softmax(s) @ Q), argmax t).
    """

    def __init__(self, num_classes, acc):
        super().__init__()
        if not 0.0 < acc <= 1.0:
            raise ValueError(f"teacher accuracy for noise adaptation must be in (0, 1], got {acc}")
        self.num_classes, self.acc = num_classes, float(acc)
        self.theta = nn.Parameter(torch.zeros(num_classes, num_classes - 1))
        off_diagonal = ~torch.eye(num_classes, dtype=torch.bool)
        # flat positions of row i's off-diagonal entries, in column order: (C·(C-1),)
        self.register_buffer("off_index", off_diagonal.flatten().nonzero().squeeze(1), persistent=False)

    def transition(self):
        c = self.num_classes
        off = (1 - self.acc) * self.theta.float().softmax(dim=1)                 # (C, C-1)
        q = torch.zeros(c * c, device=off.device, dtype=off.dtype)
        q = q.index_put((self.off_index,), off.flatten())
        return q.view(c, c) + self.acc * torch.eye(c, device=off.device, dtype=off.dtype)

    def forward(self, student_logits, teacher_logits):
        probs = student_logits.float().softmax(dim=1) @ self.transition()       # (B, C), rows sum to 1
        return F.nll_loss(probs.clamp_min(1e-12).log(), teacher_logits.argmax(dim=1))


# ---- the terms by name ---------------------------------------------------------------------------
# pd variants: (teacher features, student features), each (L, B, N, C) -> scalar
TERMS = {
    "pd": {"cls_gram": patch_attention_probe_loss},     # the published probe distillation
}


@dataclass(frozen=True)
class LossConfig:
    """The loss's variants and weights: loss = kd + na + patchattn · pd. Fields take the stage-2 flag of
    the same name (from_flags), so a new weight is a field here and its add_argument."""
    pd_loss: str = "cls_gram"       # --pd_loss
    patchattn: float = PATCHATTN    # the weight of PD; 0: no PD (no --attnprobe_dist)
    temperature: float = KD_TEMPERATURE

    @classmethod
    def from_flags(cls, args):
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, "patchattn": args.patchattn if args.attnprobe_dist else 0.0})

    def kd(self, student_logits, teacher_logits, weights=None):
        """KD, each image's KL scaled by `weights` (B,) when given (robust KD: its teacher class's weight)."""
        if weights is None:
            return kdloss(student_logits, teacher_logits, self.temperature)
        return robust_kdloss(student_logits, teacher_logits, weights, self.temperature)

    def pd(self, teacher_features, student_features):
        return TERMS["pd"][self.pd_loss](teacher_features, student_features)
