"""The selection rule: which wild images stage 2 trains on, and the class weights of robust KD.

    value = attnlier · Σ_b value_blk{b} + outlier · value_out      (--attnprobe_sel; value_out alone without)
    keep the num_select lowest, best first (--per_class: at most N per teacher-predicted class, then fill)
    class weights = 1 / (teacher softmax summed per class over the kept images), rescaled to sum to C

The per-image scores come from scoring.py (one teacher pass, stored once); everything here is cheap and
runs again for every selection. Other rules (--rule) rank by named columns of what is stored (COLUMNS,
RULES below): a new rule is one RULES entry; a new column one COLUMNS entry.
"""
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

import data
import engine
import published
import signals
from scoring import probe_key
from attention_probe import PROBE_BLOCKS
from safety import atomic_torch_save, atomic_write_text
from utils import InputError, provenance, rank_world, safe_torch_load


# ---- the published rule ----------------------------------------------------------------------------

def combined_value(scores, attnprobe, attnlier=published.ATTNLIER, outlier=published.OUTLIER, blocks=PROBE_BLOCKS):
    """value = attnlier · Σ_b value_blk{b} + outlier · value_out with the probe, value_out alone without. The
    blocks are added one by one, in the published order of additions (not attnlier · probe_sum)."""
    value = outlier * scores["value_out"].double() if attnprobe else scores["value_out"].double().clone()
    if attnprobe:
        for b in blocks:
            value += attnlier * scores[probe_key(b)].double()
    return value


def probe_sum(scores, blocks=PROBE_BLOCKS):
    """Σ_b value_blk{b} (N,) float64: the published probe score."""
    return sum(scores[probe_key(b)].double() for b in blocks)


def select_indices(value, usable, num_select, pred=None, per_class=None, random=False, seed=0):
    """Indices of the chosen pool images, best (lowest value) first.

    usable: (N,) bool, False for skipped images, which are never chosen.
    per_class: keep the best `per_class` images of each predicted class, then fill from the global order.
    random: a seeded uniform draw instead of the ranking (with per_class: at random within each class).
    """
    candidates = usable.nonzero().squeeze(1)
    if num_select > len(candidates):
        raise InputError(f"--num_select {num_select} is larger than the usable pool "
                         f"({len(candidates)} images; {int((~usable).sum())} unreadable ones skipped)")
    if random:   # the order is a uniform random permutation (per_class then caps each class at random)
        g = torch.Generator().manual_seed(seed)
        order = candidates[torch.randperm(len(candidates), generator=g)]
    else:
        order = candidates[torch.argsort(value[candidates], stable=True)]      # best first
    if per_class is None:
        return order[:num_select]
    ranked_pred = pred[order].clamp_min(0)                                      # (K,)
    # rank of each image within its predicted class, in global order, in O(K) memory:
    # a stable sort by class keeps the global order inside each class
    by_class = torch.argsort(ranked_pred, stable=True)
    sorted_pred = ranked_pred[by_class]
    counts = torch.bincount(sorted_pred)
    first_of_class = counts.cumsum(0) - counts
    rank_in_class = torch.empty_like(ranked_pred)
    rank_in_class[by_class] = torch.arange(len(order)) - first_of_class[sorted_pred]
    keep = rank_in_class < per_class
    if int(keep.sum()) > num_select:
        print(f"warning: --per_class {per_class} over all classes exceeds --num_select {num_select}; "
              "keeping the best of the balanced set")
        keep &= keep.cumsum(0) <= num_select
    fill = (~keep).nonzero().squeeze(1)[:num_select - int(keep.sum())]
    keep[fill] = True
    return order[keep]                                                          # still best first


COLLAPSE_SHARE = 0.1   # a class kept under a tenth of an even share of the selection counts as lost


QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def score_quantiles(value, usable):
    """The QUANTILES of the usable images' scores (of the first 2 M: torch.quantile's input limit is 16 M)."""
    return torch.quantile(value[usable].float()[:2_000_000], torch.tensor(QUANTILES)).tolist()


def class_collapse(pred, num_classes, share=COLLAPSE_SHARE):
    """Teacher-predicted classes the selection keeps far too few of: [(class, kept)] for every class under
    `share` x an even share (kept / classes); [] when none. pred: (K,) predicted class of each kept image."""
    counts = torch.bincount(pred.clamp_min(0), minlength=num_classes)
    even = len(pred) / num_classes
    return [(c, int(counts[c])) for c in range(num_classes) if counts[c] < share * even]


def warn_class_collapse(collapsed, kept, num_classes, per_class=None):
    """One `warning:` line for the classes a selection of `kept` images lost (class_collapse's list)."""
    if not collapsed:
        return
    even = kept // num_classes
    shown = ", ".join(f"{c}: {n}" for c, n in collapsed[:20]) + (
        f" and {len(collapsed) - 20} more" if len(collapsed) > 20 else "")
    way = (f"the pool holds too few images the teacher assigns to them even with --per_class {per_class}"
           if per_class else f"keep them with --per_class {max(1, even)} (at most {max(1, even)} per predicted class)")
    print(f"warning: class collapse: {len(collapsed)} of {num_classes} teacher-predicted classes got under a tenth of "
          f"an even share ({even}) of the {kept} kept images (class: kept) {shown}; {way}", flush=True)


# ---- class weights (--robust) -----------------------------------------------------------------------

PROBS_BLOCK = 1 << 22   # values of probs_out read at a time: 32 MB as float64, whatever the class count


def class_mass(probs, pred, selected, num_classes):
    """What the class weights count over the `selected` pool indices -> ((C,) float64, kind): the teacher's
    softmax summed per class (kind 'softmax', from the stored (N, C) `probs`) or, for published score
    files without probs (probs None), the predicted classes counted (kind 'counts')."""
    if probs is None:
        return torch.bincount(pred[selected].clamp_min(0), minlength=num_classes).double(), "counts"
    totals = torch.zeros(num_classes, dtype=torch.float64)
    sel = np.sort(selected.numpy())
    rows = max(1, PROBS_BLOCK // num_classes)   # (rows, C) float64 blocks of the memory-mapped (N, C) array
    for start in range(0, len(sel), rows):
        totals += torch.from_numpy(np.asarray(probs[sel[start:start + rows]], dtype=np.float64)).sum(0)
    return totals, "softmax"


@torch.no_grad()
def labelled_class_mass(teacher, dataset, kind, device, amp=None, workers=0, batch_size=256):
    """The --pos_num images' part of the class mass (the published 224-px script counted them with the
    selection): the teacher's softmax summed per class (kind 'softmax') or its predicted classes counted
    ('counts'), images unaugmented like the selection's scores. Under torchrun each rank takes a strided
    share and the sums are added up. -> (C,) float64"""
    rank, world = rank_world()
    mass = torch.zeros(teacher.num_classes, dtype=torch.float64, device=device)
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    for images, _ in torch.utils.data.DataLoader(share, batch_size=batch_size, num_workers=workers):
        x = data.normalize(images.to(device), teacher.mean, teacher.std)
        with engine.autocast(device, amp):
            logits = teacher.model(x).float()                                    # (B, C)
        if kind == "softmax":
            mass += logits.softmax(dim=1).sum(0).double()
        else:
            mass += torch.bincount(logits.argmax(1), minlength=teacher.num_classes).double()
    if world > 1:
        torch.distributed.all_reduce(mass)
    return mass.cpu()


def weights_from_mass(mass, kind):
    """1 / (per-class mass), rescaled to sum to the number of classes (a class without any counts as
    1e-12 of softmax mass, or as 1 image)."""
    weights = 1.0 / mass.clamp_min(1e-12 if kind == "softmax" else 1.0)
    return (weights / weights.sum() * len(mass)).float()


def robust_kd_weights(mass, kind, seed):
    """The weights --robust's KD uses: weights_from_mass + U[0, 0.1) per class, drawn once from `seed` (the
    published `perturb`; the published training used the perturbed copy). -> (C,) float"""
    g = torch.Generator().manual_seed(seed + 11)
    w = weights_from_mass(mass, kind).double()
    return (w + published.CLASS_WEIGHT_NOISE * torch.rand(len(w), generator=g, dtype=torch.float64)).float()


# ---- what stage 1 hands stage 2 ---------------------------------------------------------------------

@dataclass
class Selection:
    """The chosen pool images and what the teacher said about them. Build it with Selection.of."""
    indices: torch.Tensor           # (K,) long: pool indices, best first
    ids: list                       # K pool ids (relative paths or shard members) of `indices`
    pred: torch.Tensor              # (K,) long: the teacher's predicted class of each
    class_mass: tuple               # ((C,) float64, kind) of class_mass(): the teacher's mass per class
    collapsed: list                 # [(class, kept)] of class_collapse()
    pool_index: object              # the pool.PoolIndex the indices point into
    cache: object                   # its uint8 pool.PoolCache when there is one, else None (decode)
    rule: str                       # how the images were chosen, in words
    value: torch.Tensor = None      # (K,) score of each, when a scoring rule chose them
    scores: dict = None             # fingerprint of the scores they were chosen by (scoring.fingerprint)
    settings: dict = None           # the flags of RULE_SETTINGS that chose them (tools/show_selection.py)

    @classmethod
    def of(cls, indices, pred, mass, pool_index, cache, rule, value=None, scores=None, settings=None):
        """The one way to build a Selection: ids read from the pool, the collapse from the class mass."""
        ids = [pool_index.ids[i] for i in indices.tolist()]
        return cls(indices, ids, pred, mass, class_collapse(pred, len(mass[0])), pool_index, cache, rule, value,
                   scores, settings)

    def __len__(self):
        return len(self.indices)

    @property
    def class_weights(self):
        """(C,) float: class_weights.pth, the published file, from the class mass alone. Robust KD trains with
        robust_kd_weights: these plus the published perturbation (and --pos_num's images in the mass)."""
        return weights_from_mass(*self.class_mass)

    @property
    def source(self):
        """Where the images are read from: the cache, else the pool files."""
        return self.cache if self.cache is not None else self.pool_index

    def record(self):
        """selection.pt: what a selection folder and a run folder keep of it (a valid --selection_file)."""
        return {"indices": self.indices, "ids": self.ids, "pred": self.pred, "rule": self.rule,
                **({"value": self.value} if self.value is not None else {}), "scores": self.scores,
                **({"settings": self.settings} if self.settings is not None else {}),
                "pool_size": len(self.pool_index), "pool_root": os.path.abspath(self.pool_index.root),
                # [(class, kept)] of the classes kept under a tenth of an even share: the collapse warning
                "collapsed_classes": self.collapsed, "provenance": provenance()}

    def save(self, folder):
        """selection.pt, selected.txt (ids, best first) and class_weights.pth into `folder`."""
        atomic_torch_save(self.record(), os.path.join(folder, SELECTION_FILE))
        atomic_write_text(os.path.join(folder, "selected.txt"), "".join(i + "\n" for i in self.ids))
        atomic_torch_save(self.class_weights, os.path.join(folder, "class_weights.pth"))


SELECTION_FILE = "selection.pt"
# the selection flags a selection.pt records: with the stored scores they give back its images
# the stage-1 settings a selection record keeps (its key: the flag's dest)
RULE_SETTINGS = {"rule": "rule", "attnprobe": "attnprobe_sel", "attnlier": "attnlier", "outlier": "outlier",
                 "probe_blocks": "probe_blocks", "probe_head": "probe_head", "num_select": "num_select",
                 "per_class": "per_class", "random": "random", "seed": "seed"}


def read_record(path):
    """A selection.pt (ours, or any {'indices', 'pred'} dict, e.g. demo.py's oracle) -> its dict with
    'indices' and 'pred' as 1-D long tensors; a file that is none is one InputError."""
    if not os.path.isfile(path):
        raise InputError(f"--selection_file {path}: no such file")
    sel = safe_torch_load(path, "selection file")
    if not isinstance(sel, dict) or "indices" not in sel or "pred" not in sel:
        raise InputError(f"--selection_file {path} must hold a dict with 'indices' and 'pred' (teacher argmax)")
    indices, pred = torch.as_tensor(sel["indices"]).long(), torch.as_tensor(sel["pred"]).long()
    if indices.shape != pred.shape or indices.ndim != 1 or not len(indices):
        raise InputError(f"--selection_file {path}: 'indices' and 'pred' must be non-empty 1-D and equally long")
    return {**sel, "indices": indices, "pred": pred}


# ---- other rules: named columns of the stored scores ------------------------------------------------
# A column is one value per pool image, read from one stored array (scoring.py keeps them): the published
# files (value_out, value_blk{b}), the teacher's softmax (probs, probs_out.npy) or an extra signal (its
# name, sig_<name>.pth, stored with --store_signals). A rule reads only its columns' arrays: when those are
# stored, trying the rule costs no teacher pass.

def _softmax_entropy(probs):
    """-Σ p log p per row of the memory-mapped (N, C) softmax, read in blocks -> (N,) float64."""
    rows = max(1, PROBS_BLOCK // probs.shape[1])
    out = [torch.special.entr(torch.from_numpy(np.asarray(probs[a:a + rows], dtype=np.float64))).sum(1)
           for a in range(0, len(probs), rows)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# (column name pattern, the stored array it is read from, how: array [, numbers of the name] -> (N,))
COLUMNS = [
    ("value_out", "value_out", lambda a: a),                  # -log max softmax (the published confidence)
    ("probe_pub", "value_blk", None),                         # Σ_b value_blk{b} (the published probe), below
    ("entropy", "probs", _softmax_entropy),                   # entropy of the teacher's softmax
    *[(name, name, lambda a: a) for name in ("energy", "maxlogit", "feat_norm", "knn", "flip_agree", "flip_kl")],
    (r"cls_norm_b(\d+)", "cls_norm", lambda a, b: a[:, b]),   # after block b
    (r"tok_norm_b(\d+)", "tok_norm", lambda a, b: a[:, b]),
    (r"probe_b(\d+)_h(\d+)", "probe_heads", lambda a, b, h: a[:, b, h]),   # cosine(CLS row of head h, uniform)
]


def _column(name):
    """-> (stored array, how, numbers in the name) of a column; ValueError for a name COLUMNS lacks."""
    for pattern, array, how in COLUMNS:
        match = re.fullmatch(pattern, name)
        if match:
            return array, how, [int(g) for g in match.groups()]
    raise ValueError(f"no column named {name}")


def read_column(name, arrays, probe_blocks=PROBE_BLOCKS):
    """Column `name` (N,) float64 from the loaded arrays ({array name: values}; value_blk{b} per block)."""
    array, how, numbers = _column(name)
    if array == "value_blk":
        return probe_sum(arrays, probe_blocks)
    return torch.as_tensor(how(arrays[array], *numbers)).double()


def columns(arrays, probe_blocks=()):
    """Every column the loaded arrays give, by name, in the arrays' order (the signal study reads them all)."""
    names = ["value_out"] if "value_out" in arrays else []
    if probe_blocks and all(probe_key(b) in arrays for b in probe_blocks):
        names.append("probe_pub")
    for array, values in arrays.items():
        if array == "probs":
            names.append("entropy")
        elif array in ("cls_norm", "tok_norm"):                          # (N, depth)
            names += [f"{array}_b{b}" for b in range(values.shape[1])]
        elif array == "probe_heads":                                     # (N, depth, heads)
            names += [f"probe_b{b}_h{h}" for b in range(values.shape[1]) for h in range(values.shape[2])]
        elif array in signals.SIGNALS:
            names.append(array)
    return {name: read_column(name, arrays, probe_blocks) for name in names}


def zscore(v, usable):
    """(v - mean) / sd over the usable images; unusable ones stay +inf (never kept)."""
    u = v[usable]
    z = (v - u.mean()) / u.std().clamp_min(1e-12)
    return torch.where(usable, z, torch.full_like(z, float("inf")))


def combine(cols, terms, usable):
    """Σ sign · z(column): the rule's value, LOW = keep. terms: [(column, sign)], sign +1 keeps low values."""
    if len(terms) == 1:       # one signal needs no z-score: its own order
        name, sign = terms[0]
        v = sign * cols[name]
        return torch.where(usable, v, torch.full_like(v, float("inf")))
    value = torch.zeros(len(usable), dtype=torch.float64)
    for name, sign in terms:
        value += sign * zscore(cols[name], usable).where(usable, torch.zeros(()))
    return torch.where(usable, value, torch.full_like(value, float("inf")))


# Opt-in selection rules of --rule: name -> [(column, sign)]; sign +1 = low values kept.
# "published" (the default) is combined_value and not listed here.
RULES = {
    "confidence": [("value_out", +1)],
    "entropy": [("entropy", +1)],
    "energy": [("energy", +1)],
    "maxlogit": [("maxlogit", -1)],
    "feat_norm": [("feat_norm", -1)],
    "knn": [("knn", +1)],
    "confidence+feat_norm": [("value_out", +1), ("feat_norm", -1)],
    # the signal study's choice (docs/signal_study.md: mismatch 0.2 pool, seed-0 teacher): a FLAT
    # published probe (high Σ value_blk, the paper's sign reversed) plus large block-2 patch-token norms
    "flatprobe+tok_norm_b2": [("probe_pub", -1), ("tok_norm_b2", -1)],
    # POST HOC, not the study's choice: the probe's useful sign flips between teacher seeds, this pair does
    # not (it beat the published rule on every pool and seed of the study); needs its own confirmation
    "confidence+tok_norm_b2": [("value_out", +1), ("tok_norm_b2", -1)],
}


def rule_needs(rule):
    """The stored arrays a rule reads (value_out, value_blk, probs or a signal name), sorted."""
    return sorted({_column(col)[0] for col, _ in RULES[rule]})


def rule_value(rule, arrays, usable, probe_blocks=PROBE_BLOCKS):
    """The value a named rule ranks by (LOW = keep), from the loaded arrays."""
    missing = [a for a in rule_needs(rule) if a not in arrays and not (
        a == "value_blk" and all(probe_key(b) in arrays for b in probe_blocks))]
    if missing:
        raise ValueError(f"rule {rule} needs {', '.join(missing)}, which these scores do not have")
    cols = {col: read_column(col, arrays, probe_blocks) for col, _ in RULES[rule]}
    return combine(cols, RULES[rule], usable)


def describe(rule, attnprobe, random, per_class):
    """How a selection was chosen, in words (selection.pt's 'rule')."""
    text = ("random" if random else f"signal rule {rule}" if rule != "published"
            else "attention probe" if attnprobe else "outlier (confidence)")
    return text + (f", class-balanced ({per_class} per class)" if per_class else "")
