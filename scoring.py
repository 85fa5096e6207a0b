"""Stage 1's scores: what one teacher pass gives each wild image, and how the pool's scores are made once
and kept on disk for every later selection.

    scores = score_images(teacher, images, mean, std, probe_blocks=(3, 7), head=0)
    scores["value_out"]    # (B,) -log max softmax: low = the teacher is confident
    scores["value_blk3"]   # (B,) cosine(CLS->patch attention row of block 3, uniform): low = peaked
    scores["pred_out"]     # (B,) the teacher's argmax;  scores["probs"]: (B, C) its softmax

In --selected_file, one entry per pool image in the pool's order: value_out.pth, pred_out.pth,
value_blk{b}.pth (the published names: published score files are reused), probs_out.npy (softmax, fp16),
skipped.txt (unreadable images: never selected) and scores_meta.json (their fingerprint: pool, teacher
file, preprocessing, probe). The pass runs in resumable chunks (.score_chunks/), each rank scoring a
strided shard; rank 0 writes.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from tqdm import tqdm

import data
import engine
import pool
import signals
from attention_probe import probe_forward, probe_uniformity
from safety import (all_gather_objects, allocate_npy, atomic_torch_save, atomic_write_text, on_rank0,
                    remove_temp_files, set_phase, write_npy_rows)
from utils import InputError, changed_keys, file_sha256, rank_world, read_fingerprint, safe_torch_load, say

SCORE_VERSION = 1
META_FILE = "scores_meta.json"
PROBS_FILE = "probs_out.npy"
CHUNKS = ".score_chunks"


# ---- the scores of a batch ----------------------------------------------------------------------

@torch.no_grad()
def score_images(teacher, images, mean, std, probe_blocks, head, amp_dtype=None, extras=False, flip=False):
    """Teacher scores of a uint8 batch (B,C,H,W) -> dict of per-image tensors on the batch's device.

    value_out = cross-entropy against the teacher's own argmax = -log max softmax;
    value_blk{b} = cosine(probe row, uniform). extras: also the signals of signals.py from the same
    forward; flip: one more forward of the flipped batch for the flip signals (implies extras).
    """
    extras = extras or flip
    x = data.normalize(images, mean, std)
    with engine.autocast(x.device, amp_dtype):
        out = probe_forward(teacher, x, probe_blocks=probe_blocks, head=head, extras=extras)
        logits_flip = teacher(x.flip(-1)) if flip else None
    logits = out.logits.float()
    log_probs = logits.log_softmax(dim=1)
    best, pred = log_probs.max(dim=1)
    scores = {"value_out": -best, "pred_out": pred, "probs": log_probs.exp()}
    for b in probe_blocks:
        scores[probe_key(b)] = probe_uniformity(out.probes[b].float())
    if extras:
        scores.update(signals.batch_scores(out, logits_flip))
    return scores


def fingerprint(pool_index, teacher, probe_blocks, probe_head, fast_decode):
    """What the stored scores depend on: another value of any key means other scores."""
    return {
        "version": SCORE_VERSION,
        "pool": pool.pool_fingerprint(pool_index),
        "pool_size": len(pool_index),
        "teacher": teacher.name,
        # the EMA weights of one file are another teacher
        "teacher_sha256": file_sha256(teacher.path) + (":ema" if teacher.ema else ""),
        "nb_classes": teacher.num_classes,
        "img_size": teacher.img_size, "in_chans": teacher.in_chans,
        "mean": list(teacher.mean), "std": list(teacher.std),
        "probe_blocks": sorted(probe_blocks), "probe_head": probe_head,
        "decode": pool.decode_mode(fast_decode),
    }


# ---- the pass over the pool ---------------------------------------------------------------------

def iter_batches(pool_index, cache, indices, img_size, in_chans, batch_size, workers, pin, fast_decode=False):
    """Yields (uint8 images (B,C,H,W), pool indices (B,), ok (B,) bool, reasons list)."""
    if cache is not None:
        reasons = dict(cache.skipped()) if not cache.ok.all() else {}
        for start in range(0, len(indices), batch_size):
            idx = np.asarray(indices[start:start + batch_size])
            ok = torch.from_numpy(np.asarray(cache.ok[idx], dtype=bool))
            why = [reasons.get(cache.ids[i], "unreadable") for i in idx.tolist()]
            yield cache.batch(idx), torch.from_numpy(idx), ok, why
        return
    dataset = pool.PoolDataset(pool_index, img_size, in_chans, indices=indices, fast_decode=fast_decode)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=pin, persistent_workers=False)
    yield from loader   # default collate: (uint8 (B,C,H,W), index (B,), ok (B,), [reason] * B)


def _chunk_path(chunks_dir, c):
    return os.path.join(chunks_dir, f"chunk_{c:06d}.pt")


def score_pool(s, teacher, pool_index, cache, fingerprint, store=None):
    """Score the whole pool into s.selected_file (--selected_file), chunk by chunk; a killed run resumes at its
    last chunk. s: the stage-1 settings.Settings.

    Each rank scores the strided shard range(rank, chunk, world) of every chunk; rank 0 stores the
    gathered results by pool index. `cache`: the uint8 pool cache, or None to decode the images.
    `store` (signals.SignalStore) adds the extra signals; None scores the published files alone.
    """
    rank, world = rank_world()
    out_dir, device = s.selected_file, teacher.device
    n, c = len(pool_index), teacher.num_classes
    blocks = sorted(s.probe_blocks)
    chunks_dir = os.path.join(out_dir, CHUNKS)
    probs_path = os.path.join(out_dir, PROBS_FILE)
    fingerprint = {**fingerprint, **(store.fingerprint() if store else {})}
    on_rank0(_start_scoring, out_dir, chunks_dir, fingerprint, (n, c), store, teacher.model)
    # compile the scorer, not the teacher: probe_forward calls the teacher's submodules one by
    # one, so a compiled module's own forward would never run
    score_fn = torch.compile(score_images, dynamic=False) if s.compile else score_images
    num_chunks = (n + s.chunk_size - 1) // s.chunk_size
    # rank 0's list on every rank: a rank that saw other files (a lagging network disk) would split the run
    todo = on_rank0(lambda: [k for k in range(num_chunks) if not os.path.exists(_chunk_path(chunks_dir, k))])
    if len(todo) < num_chunks:
        say(f"resuming scoring: {num_chunks - len(todo)} of {num_chunks} chunks already done")
    bar = tqdm(total=sum(min(s.chunk_size, n - k * s.chunk_size) for k in todo), unit="img",
               desc="scoring", disable=rank != 0, dynamic_ncols=True)
    for k in todo:
        set_phase(f"scoring chunk {k + 1} of {num_chunks}", "the last scored chunk")
        start, stop = k * s.chunk_size, min(n, (k + 1) * s.chunk_size)
        mine = range(start + rank, stop, world)
        part = {key: [] for key in ("index", "ok", "value_out", "pred_out", "probs",
                                    *map(probe_key, blocks))}
        reasons = {}
        for images, idx, ok, why in iter_batches(pool_index, cache, mine, teacher.img_size, teacher.in_chans,
                                                 s.score_batch_size, s.workers, device.type == "cuda", s.fast_decode):
            scores = score_fn(teacher.model, images.to(device, non_blocking=True), teacher.mean, teacher.std, blocks,
                              s.probe_head, s.amp, store is not None, bool(store and store.flip))
            part["index"].append(idx)
            part["ok"].append(ok)
            for key in scores:
                part.setdefault(key, []).append(scores[key].half().cpu() if key in HALF_KEYS else scores[key].cpu())
            for i, good, reason in zip(idx.tolist(), ok.tolist(), why):
                if not good:
                    reasons[i] = reason
            bar.update(len(idx) * world)
        part = {key: torch.cat(v) if v else torch.empty(0) for key, v in part.items()}
        gathered = all_gather_objects((part, reasons))
        on_rank0(_store_chunk, gathered, chunks_dir, probs_path, k, store)
    bar.close()
    on_rank0(_finish_scoring, chunks_dir, out_dir, num_chunks, n, blocks, pool_index, store, device, fingerprint)


def _start_scoring(out_dir, chunks_dir, fingerprint, probs_shape, store, model):
    """Rank 0: the chunk folder of this fingerprint (another one's is dropped), and the fp16 arrays that
    chunks are written into (probs_out.npy, and the store's pre-logits), their disk space reserved."""
    os.makedirs(chunks_dir, exist_ok=True)
    progress = os.path.join(chunks_dir, "fingerprint.json")
    if os.path.exists(progress) and changed_keys(read_fingerprint(progress), fingerprint):
        shutil.rmtree(chunks_dir)  # chunks of another configuration: start over
        os.makedirs(chunks_dir)
    fresh = not os.path.exists(progress)
    probs_path = os.path.join(out_dir, PROBS_FILE)
    if fresh:
        meta_path = os.path.join(out_dir, META_FILE)
        if os.path.exists(meta_path):  # score files are about to be replaced: drop their fingerprint
            os.unlink(meta_path)
        signals.remove_stored(out_dir)  # and the signals of the old scores
    arrays = [(probs_path, np.float16, probs_shape)] + ([store.array(probs_shape[0], model)] if store else [])
    allocate_npy(arrays, "free space there or choose another --selected_file", create=fresh)
    if fresh:
        atomic_write_text(progress, json.dumps(fingerprint))
    remove_temp_files(chunks_dir)   # of a killed run (we hold the folder's lock)


def _finish_scoring(chunks_dir, out_dir, num_chunks, n, blocks, pool_index, store, device, fingerprint):
    _assemble_scores(chunks_dir, out_dir, num_chunks, n, blocks, pool_index, store, device)
    atomic_write_text(os.path.join(out_dir, META_FILE), json.dumps(fingerprint, indent=1))
    shutil.rmtree(chunks_dir)


HALF_KEYS = ("probs", signals.PRELOGITS)   # (B, C) rows of a memmap, stored in fp16


def _in_pool_order(tensors, order):
    """The ranks' rows joined in pool order. One process's rows are in order already: no copies, which
    for probs are chunk_size x classes x 2 bytes each (131 MB at 65,536 x 1,000)."""
    if len(tensors) == 1 and bool((order[1:] > order[:-1]).all()):
        return tensors[0]
    return torch.cat(tensors)[order]


def _store_chunk(gathered, chunks_dir, probs_path, k, store=None):
    parts = [p for p, _ in gathered]
    reasons = {i: r for _, rs in gathered for i, r in rs.items()}
    index = torch.cat([p["index"] for p in parts])
    order = index.argsort()
    keys = dict.fromkeys(key for p in parts for key in p)   # a rank without images has only the fixed keys
    merged = {key: _in_pool_order([p[key] for p in parts if key in p], order) for key in keys}
    ok = merged["ok"].bool()
    probs = merged.pop("probs")
    if len(index):
        probs[~ok] = 0
        write_npy_rows(probs_path, merged["index"], probs)
    if store:
        store.store_rows(merged, ok)
    merged["reasons"] = reasons
    atomic_torch_save(merged, _chunk_path(chunks_dir, k))


def _assemble_scores(chunks_dir, out_dir, num_chunks, n, blocks, pool_index, store=None, device="cpu"):
    """Join the chunk files, read once, into the published 1-D score files (skipped images: +inf, pred -1);
    the extra signals, when stored, go to `store` chunk by chunk."""
    keys = ["value_out", *map(probe_key, blocks)]
    full = {key: torch.full((n,), float("inf")) for key in keys}
    pred = torch.full((n,), -1, dtype=torch.long)
    skipped = []
    covered = torch.zeros(n, dtype=torch.bool)
    for k in range(num_chunks):
        part = torch.load(_chunk_path(chunks_dir, k), weights_only=True)
        idx, ok = part["index"], part["ok"].bool()
        covered[idx] = True
        for key in keys:
            full[key][idx[ok]] = part[key][ok].float()
        pred[idx[ok]] = part["pred_out"][ok].long()
        skipped += [(i, part["reasons"].get(i, "unreadable")) for i in idx[~ok].tolist()]
        if store:
            store.add_chunk(part, n)
    if not bool(covered.all()):   # never mark scores complete that miss an image; the rerun scores afresh
        shutil.rmtree(chunks_dir)
        raise RuntimeError(f"scoring covered {int(covered.sum())} of {n} pool images: the score files in {out_dir} "
                           "are not written; run the same command again")
    for key in keys:
        atomic_torch_save(full[key], score_file(out_dir, key))
    atomic_torch_save(pred, score_file(out_dir, "pred_out"))
    skipped_path = os.path.join(out_dir, "skipped.txt")
    pool.write_skipped(skipped_path, [(pool_index.ids[i], reason) for i, reason in sorted(skipped)])
    warn_skipped(sorted(skipped), pool_index, skipped_path)
    if store:
        store.finish(pred, full["value_out"], device)


WARN_SKIPPED_MAX = 20


def warn_skipped(skipped, pool_index, skipped_path):
    """One stderr line per skipped image (at most WARN_SKIPPED_MAX), then one summary line."""
    for i, reason in skipped[:WARN_SKIPPED_MAX]:
        print(f"warning: skipped {pool_index.ids[i]}: {pool.clean_reason(reason)}", file=sys.stderr)
    if skipped:
        more = len(skipped) - WARN_SKIPPED_MAX
        print(f"warning: {len(skipped)} unreadable image(s) skipped, never selected"
              + (f" ({more} more not shown)" if more > 0 else "") + f"; list in {skipped_path}",
              file=sys.stderr)


# ---- reading what is stored -----------------------------------------------------------------------

def scores_ready(out_dir, fingerprint, force):
    """True when score files for exactly this configuration exist; an error for another one."""
    value_out = score_file(out_dir, "value_out")
    meta_path = os.path.join(out_dir, META_FILE)
    if force or not os.path.exists(value_out):
        return False
    if not os.path.exists(meta_path) and os.path.exists(os.path.join(out_dir, CHUNKS)):
        return False  # a scoring run was cut off (maybe while writing these files): resume it
    if not os.path.exists(meta_path):
        # the published code's caches carry no fingerprint: trust them only if the length fits
        n = len(load_score_file(value_out))
        if n != fingerprint["pool_size"]:
            raise InputError(f"{value_out} scores {n} images but the pool has {fingerprint['pool_size']}: "
                             "they belong to another pool (use --force to rescore)")
        print(f"warning: {out_dir} has score files without a fingerprint (published format); "
              "reusing them because their length matches the pool")
        return True
    saved = read_fingerprint(meta_path)
    if saved is None:
        raise InputError(f"{meta_path} is damaged; use --force to rescore")
    differs = changed_keys(saved, fingerprint)
    if differs:
        what = {"pool": "pool files", "pool_size": "pool size", "teacher_sha256": "teacher checkpoint",
                "decode": "image decoding (--fast_decode)"}
        raise InputError(f"score files in {out_dir} were made with another " +
                         ", ".join(what.get(k, k) for k in differs) +
                         "; use --force to rescore or choose another --selected_file")
    return True


def read_only(folder):
    """True for an existing folder this process cannot write: usable for its finished scores only."""
    return os.path.isdir(folder) and not os.access(folder, os.W_OK)


def matches(out_dir, fingerprint):
    """True when the scores in `out_dir` are complete ones of exactly this fingerprint (no error, no warning)."""
    return not changed_keys(read_fingerprint(os.path.join(out_dir, META_FILE)), fingerprint)


def probe_key(block):
    """The published name of probe block `block`'s score: value_blk{block}."""
    return f"value_blk{block}"


def score_file(out_dir, key):
    """The file of score `key` (value_out, pred_out, value_blk{b}): the published names, so published score
    files are reused."""
    return os.path.join(out_dir, f"{key}.pth")


def load_score_file(path):
    """A 1-D score tensor, loaded safely; anything else is a one-line error."""
    value = safe_torch_load(path, "score file (use --force to rescore)")
    if not torch.is_tensor(value) or value.ndim != 1:
        raise InputError(f"{path} is not a 1-D score tensor; use --force to rescore")
    return value


def load_scores(out_dir, blocks):
    """The published score files: {'value_out', 'pred_out', 'value_blk{b}' for b in blocks}."""
    scores = {key: load_score_file(score_file(out_dir, key)) for key in ("value_out", "pred_out")}
    for b in blocks:
        path = score_file(out_dir, probe_key(b))
        if not os.path.exists(path):
            raise InputError(f"{path} is missing: the scores were made without probe block {b} "
                             "(rescore with --force or change --probe_blocks)")
        scores[probe_key(b)] = load_score_file(path)
    return scores


def load_probs(out_dir):
    """The stored (N, C) fp16 softmax, memory-mapped, or None (published score files hold none)."""
    path = os.path.join(out_dir, PROBS_FILE)
    return np.load(path, mmap_mode="r") if os.path.exists(path) else None


def load_signals(out_dir, names):
    """The stored extra signals a rule needs; a missing file is a one-line error."""
    out = {}
    for name in names:
        path = os.path.join(out_dir, signals.signal_file(name))
        if not os.path.exists(path):
            how = "--flip_signal --force" if name in signals.FLIP_SIGNALS else "--store_signals --force"
            raise InputError(f"{path} is missing: these score files were made without signal '{name}' "
                             f"(rescore with {how})")
        value = safe_torch_load(path, "signal file (use --force to rescore)")
        if not torch.is_tensor(value):
            raise InputError(f"{path} is not a signal tensor; use --force to rescore")
        out[name] = value
    return out


def load_arrays(out_dir, names, blocks):
    """The published files and the stored arrays `names` (selection.rule_needs) -> {name: values}."""
    arrays = load_scores(out_dir, blocks)
    if "probs" in names:
        arrays["probs"] = load_probs(out_dir)
        if arrays["probs"] is None:
            raise InputError(f"{os.path.join(out_dir, PROBS_FILE)} is missing: these score files hold no softmax "
                             "(published score files); rescore with --force")
    arrays.update(load_signals(out_dir, [n for n in names if n not in ("value_out", "value_blk", "probs")]))
    return arrays
