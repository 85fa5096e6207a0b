"""Selection signals beyond the paper's, from the one teacher pass that scoring.py makes when asked
(--store_signals, --flip_signal, or a --rule that reads a signal not yet stored): a SignalStore is its hook.

    out = probe_forward(teacher, x, probe_blocks, head, extras=True)
    sig = batch_signals(out)                           # per-image tensors, stored as sig_<name>.pth
    sig.update(flip_signals(out.logits, teacher(x.flip(-1))))   # optional: a second forward of the batch
    knn = knn_distance(pre_logits, pred, value_out)    # after the pass, on the stored pre-logits

Every signal is stored in its natural units (an energy is an energy, a norm a norm); which way is
"in the teacher's domain" is the rule's business (selection.RULES: sign +1 = a LOW value means keep,
like the published value_out). Multi-column signals (per block, per head) are (N, depth[, heads]).
"""
import os

import numpy as np
import torch

from attention_probe import probe_uniformity
from safety import atomic_torch_save, write_npy_rows

# stored per-image signals: name -> what it is (all (N,) unless noted)
SIGNALS = {
    "energy": "-logsumexp(logits) (low = in-domain, Liu et al. 2020)",
    "maxlogit": "largest logit",
    "feat_norm": "L2 norm of the pre-logits feature (the head's input)",
    "cls_norm": "(N, depth): L2 norm of the CLS token after each block",
    "tok_norm": "(N, depth): mean L2 norm of the patch tokens after each block",
    "probe_heads": "(N, depth, heads): cosine(CLS row, uniform) of every head of every block",
    "flip_agree": "1 if the prediction of the horizontally flipped image is the same, else 0 (--flip_signal)",
    "flip_kl": "KL(softmax(x) || softmax(flip(x))) (--flip_signal)",
    "knn": "1 - mean cosine to the k nearest images of the confident core of the predicted class",
}
FLIP_SIGNALS = ("flip_agree", "flip_kl")
KNN_K, KNN_CORE_FRAC, KNN_CORE_MAX = 10, 0.1, 2048


PRELOGITS = "prelogits"                  # the batch key of the pre-logits feature
PRELOGITS_FILE = "prelogits_out.npy"     # (N, C) fp16, skipped images 0


SIGNAL_PREFIX = "sig_"                    # an extra signal's batch key and file name: sig_<name>(.pth)


def signal_file(name):
    return f"{SIGNAL_PREFIX}{name}.pth"


def remove_stored(out_dir):
    """Drop the signals stored beside score files that are about to be replaced."""
    for name in (*map(signal_file, SIGNALS), PRELOGITS_FILE):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.unlink(path)


def feature_dim(model):
    """Width of the pre-logits feature (the head's input)."""
    return getattr(model, "head_hidden_size", None) or model.num_features


class SignalStore:
    """The hook of select_data's scoring pass that stores the extra signals beside the published files.

    Per batch score_images adds batch_scores() to the published scores; per chunk store_rows() moves the
    pre-logits into PRELOGITS_FILE; after the pass add_chunk()/finish() write sig_<name>.pth (skipped
    images: nan) and the kNN signal computed over the stored pre-logits (a pass over features, not images).
    """

    def __init__(self, out_dir, flip=False):
        self.out_dir, self.flip = out_dir, flip
        self.feat_path = os.path.join(out_dir, PRELOGITS_FILE)
        self.full = {}

    def names(self):
        return [name for name in SIGNALS if self.flip or name not in FLIP_SIGNALS]

    def fingerprint(self):
        """What the score fingerprint records of this hook (scores_meta.json, resumable chunks)."""
        return {"signals": True, **({"flip_signal": True} if self.flip else {})}

    def complete(self):
        """True when every signal of this hook is stored already: a rule needs no rescoring."""
        return all(os.path.exists(os.path.join(self.out_dir, signal_file(n))) for n in self.names())

    def array(self, n, model):
        """(path, dtype, shape) of the pre-logits array the pass fills (safety.allocate_npy creates it)."""
        return self.feat_path, np.float16, (n, feature_dim(model))

    def store_rows(self, merged, ok):
        feats = merged.pop(PRELOGITS, None)
        if feats is not None and len(feats):
            feats[~ok] = 0
            write_npy_rows(self.feat_path, merged["index"], feats)

    def add_chunk(self, part, n):
        idx, ok = part["index"], part["ok"].bool()
        for key in (key for key in part if key.startswith(SIGNAL_PREFIX)):
            if key not in self.full:
                self.full[key] = torch.full((n, *part[key].shape[1:]), float("nan"))
            self.full[key][idx[ok]] = part[key][ok].float()

    def finish(self, pred, value_out, device):
        for key, value in self.full.items():
            atomic_torch_save(value, os.path.join(self.out_dir, signal_file(key[4:])))
        knn = knn_distance(np.load(self.feat_path, mmap_mode="r"), pred, value_out,
                           device=device if torch.device(device).type == "cuda" else "cpu")
        atomic_torch_save(knn, os.path.join(self.out_dir, signal_file("knn")))


@torch.no_grad()
def batch_signals(out):
    """Per-image signals of one probe_forward(..., extras=True) output -> dict of CPU-able tensors."""
    logits = out.logits.float()
    return {"energy": -torch.logsumexp(logits, dim=1),
            "maxlogit": logits.max(dim=1).values,
            "feat_norm": out.pre_logits.float().norm(dim=-1),
            "cls_norm": out.block_cls_norm.float(),
            "tok_norm": out.block_tok_norm.float(),
            "probe_heads": probe_uniformity(out.head_rows.float())}   # (B, depth, heads)


@torch.no_grad()
def flip_signals(logits, logits_flip):
    """Agreement of the teacher with itself under a horizontal flip (needs the flipped batch's logits)."""
    logp, logq = logits.float().log_softmax(1), logits_flip.float().log_softmax(1)
    return {"flip_agree": (logp.argmax(1) == logq.argmax(1)).float(),
            "flip_kl": (logp.exp() * (logp - logq)).sum(1)}


def batch_scores(out, logits_flip=None):
    """The extra signals of one batch (sig_<name>) and its pre-logits feature, from probe_forward's
    extras output; logits_flip: the flipped batch's logits, for the flip signals."""
    scores = {SIGNAL_PREFIX + k: v for k, v in batch_signals(out).items()}
    scores[PRELOGITS] = out.pre_logits.float()
    if logits_flip is not None:
        scores.update({SIGNAL_PREFIX + k: v for k, v in flip_signals(out.logits, logits_flip).items()})
    return scores


@torch.no_grad()
def knn_distance(features, pred, value_out, usable=None, k=KNN_K, core_frac=KNN_CORE_FRAC,
                 core_max=KNN_CORE_MAX, chunk=8192, device="cpu"):
    """Transductive: distance of each image to the confident core of its predicted class.

    features: (N, C) pre-logits (array or tensor, fp16 is fine); pred: (N,) teacher argmax;
    value_out: (N,) published confidence score (low = confident). The core of class c is its
    `core_frac` most confident usable images (at most `core_max`, at least 1). Each image gets
    1 - mean cosine similarity to its k nearest core images of its own predicted class, itself
    excluded. Unusable images get +inf. Cost: N x core_max x C multiply-adds, in chunks.
    """
    n = len(pred)
    pred = torch.as_tensor(pred).long()
    value_out = torch.as_tensor(value_out).double()
    usable = torch.isfinite(value_out) & (pred >= 0) if usable is None else torch.as_tensor(usable).bool()
    dist = torch.full((n,), float("inf"))
    for c in pred[usable].unique().tolist():
        members = (usable & (pred == c)).nonzero().squeeze(1)
        n_core = max(1, min(core_max, int(round(core_frac * len(members)))))
        core = members[torch.argsort(value_out[members], stable=True)[:n_core]]
        core_f = _unit(features, core, device)                                 # (M, C)
        kk = min(k, n_core)
        for a in range(0, len(members), chunk):
            idx = members[a:a + chunk]
            sim = _unit(features, idx, device) @ core_f.T                      # (b, M)
            sim[idx.to(device)[:, None] == core.to(device)[None, :]] = float("-inf")   # not itself
            top = sim.topk(min(kk + 1, n_core), dim=1).values                  # one extra for the self slot
            top = torch.where(torch.isfinite(top), top, torch.nan)[:, :kk]     # a lone core image: no neighbour
            d = 1 - top.nanmean(dim=1)
            dist[idx] = torch.nan_to_num(d, nan=2.0).float().cpu()             # 2 = the largest cosine distance
    return dist


def _unit(features, idx, device):
    rows = np.asarray(features[np.asarray(idx.numpy())], dtype=np.float32) if not torch.is_tensor(features) \
        else features[idx].float()
    x = torch.as_tensor(rows, device=device)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
