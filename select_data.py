"""Stage 1: score every wild image with the teacher's attention probe and confidence, keep the best.

    python select_data.py --data_imagenet /data/imagenet/train --teacher deit_base_patch4_32_teacher \
        --teacher_dir teacher_cifar100.pth --num_select 650000 --selected_file selected/cifar100 --attnprobe_sel
    torchrun --nproc_per_node 8 select_data.py ...          # each rank scores its strided shard

Writes into --selected_file, one entry per pool image in the pool's sorted order: value_out.pth,
pred_out.pth, value_blk{b}.pth (the published file names), probs_out.npy (teacher softmax, fp16),
skipped.txt (unreadable images: never selected), scores_meta.json (fingerprint), and for the
selection: selection.pt, selected.txt (ids, best first) and class_weights.pth. With --store_signals
(or a --rule other than published) the same pass also stores the extra signals of signals.py
(sig_<name>.pth, prelogits_out.npy; --flip_signal adds a flipped forward of each batch).
Scores are computed once in resumable chunks and reused while the fingerprint (pool, teacher
checkpoint, preprocessing, probe) matches; the selection is cheap and recomputed every run.

In code, `run_selection(args, teacher, device)` returns a `Selection` (indices, ids, predicted
classes, class weights, the pool and its cache), the value the next stage trains from.
"""
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import data
import models
import pool
import signals
from attention_probe import PROBE_BLOCKS, probe_forward, probe_uniformity
from utils import (InputError, OutOfSpace, all_gather_objects, amp_dtype, atomic_torch_save, atomic_write_text,
                   changed_keys, check_writable, cli_main, file_sha256, init_distributed, on_rank0, rank_world,
                   read_fingerprint, reserve_space, resolve_device, run_lock, safe_torch_load, system_parser,
                   write_memmap_rows, writing)

SCORE_VERSION = 1
PUBLISHED_NUM_SELECT = 600000


def add_selection_args(parser):
    """Flags shared by select_data.py and DFND_DeiT-train.py (published names kept)."""
    g = parser.add_argument_group("selection (stage 1)")
    g.add_argument("--data_imagenet", nargs="+", help="wild pool: a folder of images (any depth), "
                   "a folder of .tar shards, or .tar shard paths")
    g.add_argument("--teacher", default=None, help="teacher model name (default: the one the teacher file names, "
                   f"else {models.DEFAULT_TEACHER})")
    g.add_argument("--teacher_dir", help="teacher checkpoint file: DeiT main.py or timm train.py checkpoints, "
                   "the official DeiT releases, train_teacher.py files, plain state dicts, .safetensors; or "
                   "weights timm loads itself: hf-hub:org/name or a pretrained tag (deit_base_patch16_224.fb_in1k)")
    g.add_argument("--teacher_ema", action="store_true",
                   help="use the EMA weights of the teacher file (DeiT 'model_ema', timm 'state_dict_ema')")
    g.add_argument("--nb_classes", type=int, default=None, help="teacher classes (default: read from checkpoint)")
    g.add_argument("--num_select", type=int, default=None,
                   help=f"images to keep (default {PUBLISHED_NUM_SELECT}, as published)")
    g.add_argument("--selected_file", help="folder for score files and the selection (read-only is fine when it "
                   "holds complete scores of this pool and teacher)")
    g.add_argument("--attnprobe_sel", action="store_true",
                   help="add the attention probe to the score (the published flag was inverted; this is not)")
    g.add_argument("--random", action="store_true", help="select uniformly at random (baseline)")
    g.add_argument("--attnlier", type=float, default=0.05, help="weight of the probe scores (default 0.05)")
    g.add_argument("--outlier", type=float, default=0.9, help="weight of the confidence score (default 0.9)")
    g.add_argument("--rule", default="published", choices=["published", *signals.RULES],
                   help="ranking score: 'published' (default: confidence, plus the probe with --attnprobe_sel) "
                        "or an opt-in rule of signals.RULES")
    g.add_argument("--store_signals", action="store_true",
                   help="also store the extra signals of signals.py (sig_<name>.pth, prelogits_out.npy) so that "
                        "any --rule runs later without rescoring (implied by a --rule other than published)")
    g.add_argument("--flip_signal", action="store_true",
                   help="with the extra signals, also score each image flipped (flip_agree, flip_kl): "
                        "doubles the teacher compute")
    g.add_argument("--per_class", type=int, default=None,
                   help="class-balanced: best N per teacher-predicted class, then fill from the global order")
    g.add_argument("--probe_blocks", type=int, nargs="+", default=list(PROBE_BLOCKS), help="0-based (default 3 7)")
    g.add_argument("--probe_head", type=int, default=0, help="attention head of the probe (default 0)")
    g.add_argument("--img_size", type=int, default=None, help="must equal the teacher's input size (default: it)")
    g.add_argument("--mean", type=float, nargs="+", default=None,
                   help="normalisation mean (default: the teacher checkpoint's, else ImageNet's)")
    g.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std (as --mean)")
    g.add_argument("--cache_dir", default=None, help=f"uint8 pool cache (default for inputs <= {data.LARGE_INPUT} px: "
                   "<selected_file>/pool_cache_<size>px)")
    g.add_argument("--no_cache", action="store_true", help="decode the pool images instead of caching them")
    g.add_argument("--fast_decode", action="store_true", help="decode large JPEGs at a reduced scale (~2x "
                   "faster, slightly different pixels and scores; default: full decode + resize, as published)")
    g.add_argument("--score_batch_size", type=int, default=512, help="scoring batch (default 512)")
    g.add_argument("--chunk_size", type=int, default=65536, help="images per resumable scoring chunk")
    g.add_argument("--force", action="store_true", help="rescore even if score files from another run exist")
    return parser


def get_args_parser():
    parser = argparse.ArgumentParser(description="Attention-probe selection of wild images", allow_abbrev=False,
                                     parents=[system_parser()])
    add_selection_args(parser)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=None, help="alias of --score_batch_size")
    return parser


# ---- checks and set-up ------------------------------------------------------------------

def check_selection_args(args):
    """Fail before any work on flags that cannot run."""
    if not args.data_imagenet:
        raise InputError("--data_imagenet (the wild pool) is required")
    if not args.teacher_dir:
        raise InputError("--teacher_dir (the teacher checkpoint) is required")
    if not args.selected_file and not getattr(args, "selection_file", None):
        raise InputError("--selected_file (folder for scores and the selection) is required")
    if args.num_select is not None and args.num_select <= 0:
        raise InputError(f"--num_select must be positive, got {args.num_select}")
    if args.per_class is not None and args.per_class <= 0:
        raise InputError(f"--per_class must be positive, got {args.per_class}")
    if args.random and args.attnprobe_sel:
        raise InputError("--random and --attnprobe_sel exclude each other")
    if args.random and args.rule != "published":
        raise InputError(f"--random and --rule {args.rule} exclude each other")
    if args.selected_file and os.path.exists(args.selected_file) and not os.path.isdir(args.selected_file):
        raise InputError(f"--selected_file {args.selected_file} exists and is not a folder")
    for path in pool_paths(args):
        if not os.path.exists(path):
            raise InputError(f"--data_imagenet {path}: no such file or folder")
    if not os.path.isfile(args.teacher_dir) and not models.is_pretrained(args.teacher_dir):
        raise InputError(f"--teacher_dir {args.teacher_dir}: no such file (nor hf-hub:org/name or a timm "
                         "pretrained tag)")
    if args.selected_file and not read_only(args.selected_file):
        check_writable(args.selected_file, "--selected_file")   # creates it, nothing inside


def num_select(args):
    """--num_select, or the published default when it is not given."""
    return PUBLISHED_NUM_SELECT if args.num_select is None else args.num_select


def read_only(folder):
    """True for an existing folder this process cannot write: usable for its finished scores only."""
    return os.path.isdir(folder) and not os.access(folder, os.W_OK)


def pool_paths(args):
    """--data_imagenet with brace ranges expanded (pool-{000000..000009}.tar), as a shell would."""
    return [p for arg in args.data_imagenet for p in pool.expand_braces(arg)]


def list_pool(args):
    paths = pool_paths(args)
    return pool.list_pool(paths if len(paths) > 1 else paths[0])


def score_fingerprint(args, teacher, pool_index):
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
        "probe_blocks": sorted(args.probe_blocks), "probe_head": args.probe_head,
        "decode": pool.decode_mode(args.fast_decode),
    }


def signal_store(args):
    """The extra-signal hook of the scoring pass, or None: the published scores alone."""
    if args.store_signals or args.flip_signal or getattr(args, "rule", "published") != "published":
        return signals.SignalStore(args.selected_file, flip=args.flip_signal)
    return None


def default_cache_dir(args, teacher):
    """Where the pool's uint8 cache lives for this teacher's input, or None when images are decoded."""
    if args.no_cache:
        return None
    if args.cache_dir:
        return args.cache_dir
    if teacher.img_size <= data.LARGE_INPUT and args.selected_file:
        fast = "_fast" if args.fast_decode else ""
        return os.path.join(args.selected_file, f"pool_cache_{teacher.img_size}px_{teacher.in_chans}ch{fast}")
    return None


def open_pool_source(args, teacher, pool_index):
    """The uint8 cache when used (built once, resumable), else None: images are decoded on the fly."""
    cache_dir = default_cache_dir(args, teacher)
    if cache_dir is None:
        return None
    # built by rank 0; its failure (a full disk) ends every rank
    on_rank0(lambda: pool.build_cache(pool_index, cache_dir, teacher.img_size, teacher.in_chans, workers=args.workers,
                                      force=args.force, fast_decode=args.fast_decode) and None)
    return pool.open_cache(cache_dir)


def existing_cache(args, teacher):
    """The finished uint8 cache of a run that did not need to score, else None (decode the images)."""
    cache_dir = default_cache_dir(args, teacher)
    if cache_dir and os.path.exists(os.path.join(cache_dir, "meta.json")):
        try:
            return pool.open_cache(cache_dir)
        except InputError:
            return None   # unfinished cache: decode the few selected images directly
    return None


# ---- scoring ----------------------------------------------------------------------------

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


@torch.no_grad()
def score_images(teacher, images, mean, std, probe_blocks, head, amp_dtype=None, extras=False, flip=False):
    """Teacher scores of a uint8 batch (B,C,H,W) -> dict of per-image tensors on the batch's device.

    value_out = cross-entropy against the teacher's own argmax = -log max softmax;
    value_blk{b} = cosine(probe row, uniform). extras: also the signals of signals.py from the same
    forward; flip: one more forward of the flipped batch for the flip signals (implies extras).
    """
    extras = extras or flip
    x = data.normalize(images, mean, std)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = probe_forward(teacher, x, probe_blocks=probe_blocks, head=head, extras=extras)
        logits_flip = teacher(x.flip(-1)) if flip else None
    logits = out.logits.float()
    log_probs = logits.log_softmax(dim=1)
    best, pred = log_probs.max(dim=1)
    scores = {"value_out": -best, "pred_out": pred, "probs": log_probs.exp()}
    for b in probe_blocks:
        scores[f"value_blk{b}"] = probe_uniformity(out.probes[b].float())
    if extras:
        scores.update(signals.batch_scores(out, logits_flip))
    return scores


def _chunk_path(chunks_dir, c):
    return os.path.join(chunks_dir, f"chunk_{c:06d}.pt")


def score_pool(args, teacher, pool_index, cache, fingerprint, store=None):
    """Score the whole pool into --selected_file, chunk by chunk; a killed run resumes at its last chunk.

    Each rank scores the strided shard range(rank, chunk, world) of every chunk; rank 0 stores the
    gathered results by pool index. `cache`: the uint8 pool cache, or None to decode the images.
    `store` (signals.SignalStore) adds the extra signals; None scores the published files alone.
    """
    rank, world = rank_world()
    out_dir, device = args.selected_file, teacher.device
    n, c = len(pool_index), teacher.num_classes
    blocks = sorted(args.probe_blocks)
    # the caller's --amp when its parser has one; select_data.py has none: bf16 on CUDA
    amp = amp_dtype(getattr(args, "amp", "auto"), device)
    chunks_dir = os.path.join(out_dir, ".score_chunks")
    probs_path = os.path.join(out_dir, "probs_out.npy")
    fingerprint = {**fingerprint, **(store.fingerprint() if store else {})}
    on_rank0(_start_scoring, out_dir, chunks_dir, fingerprint, (n, c), store, teacher.model)
    # compile the scorer, not the teacher: probe_forward calls the teacher's submodules one by
    # one, so a compiled module's own forward would never run
    score_fn = torch.compile(score_images, dynamic=False) if args.compile else score_images
    num_chunks = (n + args.chunk_size - 1) // args.chunk_size
    todo = [k for k in range(num_chunks) if not os.path.exists(_chunk_path(chunks_dir, k))]
    if len(todo) < num_chunks and rank == 0:
        print(f"resuming scoring: {num_chunks - len(todo)} of {num_chunks} chunks already done")
    bar = tqdm(total=sum(min(args.chunk_size, n - k * args.chunk_size) for k in todo), unit="img",
               desc="scoring", disable=rank != 0, dynamic_ncols=True)
    for k in todo:
        start, stop = k * args.chunk_size, min(n, (k + 1) * args.chunk_size)
        mine = range(start + rank, stop, world)
        part = {key: [] for key in ("index", "ok", "value_out", "pred_out", "probs",
                                    *[f"value_blk{b}" for b in blocks])}
        reasons = {}
        for images, idx, ok, why in iter_batches(pool_index, cache, mine, teacher.img_size, teacher.in_chans,
                                                 args.score_batch_size, args.workers, device.type == "cuda",
                                                 args.fast_decode):
            s = score_fn(teacher.model, images.to(device, non_blocking=True), teacher.mean, teacher.std, blocks,
                         args.probe_head, amp, store is not None, bool(store and store.flip))
            part["index"].append(idx)
            part["ok"].append(ok)
            for key in s:
                part.setdefault(key, []).append(s[key].half().cpu() if key in HALF_KEYS else s[key].cpu())
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
    probs_path = os.path.join(out_dir, "probs_out.npy")
    arrays = [probs_path] + ([store.feat_path] if store else [])
    try:
        if fresh:
            meta_path = os.path.join(out_dir, "scores_meta.json")
            if os.path.exists(meta_path):  # score files are about to be replaced: drop their fingerprint
                os.unlink(meta_path)
            signals.remove_stored(out_dir)  # and the signals of the old scores
            with writing(probs_path):
                np.lib.format.open_memmap(probs_path, mode="w+", dtype=np.float16, shape=probs_shape).flush()
            if store:
                with writing(store.feat_path):
                    store.create(probs_shape[0], model)
        for path in arrays:   # written through memory maps: space not reserved now would be a SIGBUS later
            reserve_space(path, os.path.getsize(path), os.path.basename(path),
                          "free space there or choose another --selected_file")
    except OutOfSpace:
        for path in arrays if fresh else ():   # no array of zeros left to be taken for scores
            if os.path.exists(path):
                os.unlink(path)
        raise
    if fresh:
        atomic_write_text(progress, json.dumps(fingerprint))
    for name in os.listdir(chunks_dir):  # temp files of a killed run (we hold the folder's lock)
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(chunks_dir, name))


def _finish_scoring(chunks_dir, out_dir, num_chunks, n, blocks, pool_index, store, device, fingerprint):
    _assemble_scores(chunks_dir, out_dir, num_chunks, n, blocks, pool_index, store, device)
    atomic_write_text(os.path.join(out_dir, "scores_meta.json"), json.dumps(fingerprint, indent=1))
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
        write_memmap_rows(probs_path, merged["index"], probs)
    if store:
        store.store_rows(merged, ok)
    merged["reasons"] = reasons
    atomic_torch_save(merged, _chunk_path(chunks_dir, k))


def _assemble_scores(chunks_dir, out_dir, num_chunks, n, blocks, pool_index, store=None, device="cpu"):
    """Join the chunk files, read once, into the published 1-D score files (skipped images: +inf, pred -1);
    the extra signals, when stored, go to `store` chunk by chunk."""
    keys = ["value_out", *[f"value_blk{b}" for b in blocks]]
    full = {key: torch.full((n,), float("inf")) for key in keys}
    pred = torch.full((n,), -1, dtype=torch.long)
    skipped = []
    for k in range(num_chunks):
        part = torch.load(_chunk_path(chunks_dir, k), weights_only=True)
        idx, ok = part["index"], part["ok"].bool()
        for key in keys:
            full[key][idx[ok]] = part[key][ok].float()
        pred[idx[ok]] = part["pred_out"][ok].long()
        skipped += [(i, part["reasons"].get(i, "unreadable")) for i in idx[~ok].tolist()]
        if store:
            store.add_chunk(part, n)
    for key in keys:
        atomic_torch_save(full[key], os.path.join(out_dir, f"{key}.pth"))
    atomic_torch_save(pred, os.path.join(out_dir, "pred_out.pth"))
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


def load_score_file(path):
    """A 1-D score tensor, loaded safely; anything else is a one-line error."""
    value = safe_torch_load(path, "score file (use --force to rescore)")
    if not torch.is_tensor(value) or value.ndim != 1:
        raise InputError(f"{path} is not a 1-D score tensor; use --force to rescore")
    return value


def load_scores(out_dir, blocks):
    scores = {"value_out": load_score_file(os.path.join(out_dir, "value_out.pth")),
              "pred_out": load_score_file(os.path.join(out_dir, "pred_out.pth"))}
    for b in blocks:
        path = os.path.join(out_dir, f"value_blk{b}.pth")
        if not os.path.exists(path):
            raise InputError(f"{path} is missing: the scores were made without probe block {b} "
                             "(rescore with --force or change --probe_blocks)")
        scores[f"value_blk{b}"] = load_score_file(path)
    return scores


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


def scores_ready(out_dir, fingerprint, force):
    """True when score files for exactly this configuration exist; an error for another one."""
    value_out = os.path.join(out_dir, "value_out.pth")
    meta_path = os.path.join(out_dir, "scores_meta.json")
    if force or not os.path.exists(value_out):
        return False
    if not os.path.exists(meta_path) and os.path.exists(os.path.join(out_dir, ".score_chunks")):
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


# ---- selection --------------------------------------------------------------------------

def combined_value(scores, attnprobe, attnlier=0.05, outlier=0.9, blocks=PROBE_BLOCKS):
    """value = attnlier · Σ_b value_blk{b} + outlier · value_out with the probe, value_out alone without."""
    value = outlier * scores["value_out"].double() if attnprobe else scores["value_out"].double().clone()
    if attnprobe:
        for b in blocks:
            value += attnlier * scores[f"value_blk{b}"].double()
    return value


def select_indices(value, usable, num_select, pred=None, per_class=None, random=False, seed=0):
    """Indices of the chosen pool images, best (lowest value) first.

    usable: (N,) bool, False for skipped images, which are never chosen.
    per_class: keep the best `per_class` images of each predicted class, then fill from the global order.
    """
    candidates = usable.nonzero().squeeze(1)
    if num_select > len(candidates):
        raise InputError(f"--num_select {num_select} is larger than the usable pool "
                         f"({len(candidates)} images; {int((~usable).sum())} unreadable ones skipped)")
    if random:
        g = torch.Generator().manual_seed(seed)
        return candidates[torch.randperm(len(candidates), generator=g)[:num_select]]
    order = candidates[torch.argsort(value[candidates], stable=True)]          # best first
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


def class_collapse(pred, num_classes, share=COLLAPSE_SHARE):
    """Teacher-predicted classes the selection keeps far too few of: [(class, kept)] for every class under
    `share` x an even share (kept / classes); [] when none. pred: (K,) predicted class of each kept image."""
    counts = torch.bincount(pred.clamp_min(0), minlength=num_classes)
    even = len(pred) / num_classes
    return [(c, int(counts[c])) for c in range(num_classes) if counts[c] < share * even]


def warn_class_collapse(pred, num_classes, per_class=None):
    """One `warning:` line when the selection lost classes of the teacher (class_collapse); returns them."""
    low = class_collapse(pred, num_classes)
    if low:
        even = len(pred) // num_classes
        shown = ", ".join(f"{c}: {n}" for c, n in low[:20]) + (f" and {len(low) - 20} more" if len(low) > 20 else "")
        way = (f"the pool holds too few images the teacher assigns to them even with --per_class {per_class}"
               if per_class else f"keep them with --per_class {even} (at most {even} per predicted class)")
        print(f"warning: class collapse: {len(low)} of {num_classes} teacher-predicted classes got under a tenth of "
              f"an even share ({even}) of the {len(pred)} kept images (class: kept) {shown}; {way}", flush=True)
    return low


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


def weights_from_mass(mass, kind):
    """1 / (per-class mass), rescaled to sum to the number of classes (a class without any counts as
    1e-12 of softmax mass, or as 1 image)."""
    weights = 1.0 / mass.clamp_min(1e-12 if kind == "softmax" else 1.0)
    return (weights / weights.sum() * len(mass)).float()


def ids_of(pool_index, indices):
    """The pool ids (relative paths or shard members) of pool indices (K,)."""
    return [pool_index.ids[i] for i in indices.tolist()]


@dataclass
class Selection:
    """What stage 1 hands stage 2: the chosen pool images and what the teacher said about them."""
    indices: torch.Tensor           # (K,) long: pool indices, best first
    ids: list                       # K pool ids (relative paths or shard members) of `indices`
    pred: torch.Tensor              # (K,) long: the teacher's predicted class of each
    class_weights: torch.Tensor     # (C,) float: KD weight of each predicted class (--robust)
    pool_index: pool.PoolIndex      # the pool the indices point into
    cache: object                   # its uint8 pool.PoolCache when there is one, else None (decode)
    rule: str                       # how the images were chosen, in words
    value: torch.Tensor = None      # (K,) combined score of each, when a scoring rule chose them
    class_mass: tuple = None        # ((C,) float64, kind) of class_mass(): what class_weights count
    scores: dict = None             # fingerprint of the scores they were chosen by (score_fingerprint)

    def record(self):
        """What a run folder keeps of the images it trained on (a valid --selection_file)."""
        return {"indices": self.indices, "ids": self.ids, "pred": self.pred, "rule": self.rule,
                **({"value": self.value} if self.value is not None else {}), "scores": self.scores,
                "pool_size": len(self.pool_index), "pool_root": os.path.abspath(self.pool_index.root)}

    @classmethod
    def of(cls, indices, pred, class_weights, pool_index, cache, rule, value=None, class_mass=None, scores=None):
        """The one way to build a Selection: the ids are read from the pool."""
        return cls(indices, ids_of(pool_index, indices), pred, class_weights, pool_index, cache, rule, value,
                   class_mass, scores)

    def __len__(self):
        return len(self.indices)

    @property
    def source(self):
        """Where the images are read from: the cache, else the pool files."""
        return self.cache if self.cache is not None else self.pool_index


def run_selection(args, teacher, device):
    """Score the pool with `teacher` (or reuse the scores) and select -> Selection, on every rank.

    Rank 0 chooses and writes selection.pt, selected.txt and class_weights.pth; the choice, or the
    error that stopped it, is shared with every rank, so an error found there ends all of them alike.
    """
    rank, _ = rank_world()
    pool_index = list_pool(args)
    if num_select(args) > len(pool_index):
        raise InputError(f"--num_select {num_select(args)} is larger than the pool ({pool_index.describe()})")
    if rank == 0:
        print(f"pool: {pool_index.describe()}")
    fingerprint = score_fingerprint(args, teacher, pool_index)
    cache = None
    if read_only(args.selected_file):   # finished scores only: nothing is written there, nothing to lock
        if args.force or not on_rank0(scores_ready, args.selected_file, fingerprint, False):
            raise InputError(f"--selected_file {args.selected_file} cannot be written and holds no complete scores "
                             "of this pool and teacher" + (" (--force rescores)" if args.force else "")
                             + ": choose a writable --selected_file")
        chosen = on_rank0(select_from_scores, args, teacher, pool_index, write=False)
    else:
        if rank == 0:
            os.makedirs(args.selected_file, exist_ok=True)
        # two runs writing one --selected_file would mix their chunks: the second is refused
        with run_lock(args.selected_file, "--selected_file"):
            store = signal_store(args)
            ready = scores_ready(args.selected_file, fingerprint, args.force)
            if ready and store and not store.complete():
                if rank == 0:
                    print(f"the score files in {args.selected_file} lack extra signals this run needs: scoring "
                          "again to store them (the published files come out the same)")
                ready = False
            if not ready:
                cache = open_pool_source(args, teacher, pool_index)
                score_pool(args, teacher, pool_index, cache, fingerprint, store)
            chosen = on_rank0(select_from_scores, args, teacher, pool_index)
    if cache is None:
        cache = existing_cache(args, teacher)
    return Selection.of(chosen["indices"], chosen["pred"], chosen["class_weights"], pool_index, cache, chosen["rule"],
                        chosen["value"], chosen["class_mass"], scores=fingerprint)


def select_from_scores(args, teacher, pool_index, write=True):
    """Cheap: combine the stored scores, choose, write selection.pt / selected.txt / class_weights.pth
    (unless write=False). Returns {'indices', 'pred', 'value', 'class_weights', 'class_mass', 'rule'}."""
    blocks = sorted(args.probe_blocks)
    out = args.selected_file
    rule_name = getattr(args, "rule", "published")
    probe = args.attnprobe_sel if rule_name == "published" else signals.rule_uses_probe(rule_name)
    scores = load_scores(out, blocks if probe else [])
    n = len(scores["value_out"])
    if n != len(pool_index):
        raise InputError(f"score files in {out} cover {n} images but the pool has {len(pool_index)}")
    pred = scores["pred_out"].long()
    usable = torch.isfinite(scores["value_out"]) & (pred >= 0)
    if rule_name == "published":
        value = combined_value(scores, args.attnprobe_sel, args.attnlier, args.outlier, blocks)
    else:   # an opt-in rule of signals.RULES, from the same single scoring pass
        scores.update(load_signals(out, signals.rule_needs(rule_name)))
        try:
            value = signals.rule_value(rule_name, scores, usable, blocks)
        except ValueError as e:
            raise InputError(f"--rule {rule_name}: {e} (score files in {out})") from None
    chosen = select_indices(value, usable, num_select(args), pred, args.per_class, args.random, args.seed)
    probs_path = os.path.join(out, "probs_out.npy")
    probs = np.load(probs_path, mmap_mode="r") if os.path.exists(probs_path) else None
    mass = class_mass(probs, pred, chosen, teacher.num_classes)
    weights = weights_from_mass(*mass)
    rule = "random" if args.random else ("attention probe" if args.attnprobe_sel else "outlier (confidence)")
    if rule_name != "published":
        rule = f"signal rule {rule_name}"
    if args.per_class:
        rule += f", class-balanced ({args.per_class} per class)"
    collapsed = warn_class_collapse(pred[chosen], teacher.num_classes, args.per_class)
    record = {"indices": chosen, "ids": ids_of(pool_index, chosen),
              "value": value[chosen].float(), "pred": pred[chosen], "rule": rule,
              "pool_size": n, "pool_root": os.path.abspath(pool_index.root),
              # [(class, kept)] of the classes kept under a tenth of an even share: the collapse warning
              "collapsed_classes": collapsed}
    if write:
        atomic_torch_save(record, os.path.join(out, "selection.pt"))
        atomic_write_text(os.path.join(out, "selected.txt"), "".join(i + "\n" for i in record["ids"]))
        atomic_torch_save(weights, os.path.join(out, "class_weights.pth"))
    print_summary(record, value, usable, teacher.num_classes)
    return {"indices": chosen, "pred": record["pred"], "value": record["value"], "class_weights": weights,
            "class_mass": mass, "rule": rule}


def load_selection(path, args, teacher):
    """A selection.pt chosen by a rule this module does not implement (e.g. demo.py's oracle) -> Selection
    over the pool of --data_imagenet, with class weights for exactly these images: from the teacher's
    stored softmax when the score files in --selected_file are this pool's and teacher's, else from
    the predicted classes. Nothing is written."""
    if not os.path.isfile(path):
        raise InputError(f"--selection_file {path}: no such file")
    sel = safe_torch_load(path, "selection file")
    if not isinstance(sel, dict) or "indices" not in sel or "pred" not in sel:
        raise InputError(f"--selection_file {path} must hold a dict with 'indices' and 'pred' (teacher argmax)")
    indices, pred = torch.as_tensor(sel["indices"]).long(), torch.as_tensor(sel["pred"]).long()
    if indices.shape != pred.shape or indices.ndim != 1 or not len(indices):
        raise InputError(f"--selection_file {path}: 'indices' and 'pred' must be non-empty 1-D and equally long")
    pool_index = list_pool(args)
    if int(indices.min()) < 0 or int(indices.max()) >= len(pool_index):
        raise InputError(f"--selection_file {path}: indices must lie in [0, {len(pool_index)}), the pool "
                         f"({pool_index.describe()})")
    if args.num_select is not None and args.num_select != len(indices):
        raise InputError(f"--num_select {args.num_select} but --selection_file {path} holds {len(indices)} images: "
                         "drop --num_select (the file decides)")
    folder = args.selected_file
    probs_path = os.path.join(folder, "probs_out.npy") if folder else None
    if (probs_path and os.path.exists(probs_path)
            and not changed_keys(read_fingerprint(os.path.join(folder, "scores_meta.json")),
                                 score_fingerprint(args, teacher, pool_index))):
        mass = class_mass(np.load(probs_path, mmap_mode="r"), None, indices, teacher.num_classes)
    else:
        mass = class_mass(None, pred, torch.arange(len(pred)), teacher.num_classes)
    value = sel.get("value")
    value = torch.as_tensor(value).float() if value is not None else None
    return Selection.of(indices, pred, weights_from_mass(*mass), pool_index, existing_cache(args, teacher),
                        str(sel.get("rule", f"from {path}")), value, mass, scores=sel.get("scores"))


def print_summary(record, value, usable, num_classes):
    chosen, pred = record["indices"], record["pred"]
    counts = torch.bincount(pred, minlength=num_classes)
    q = torch.quantile(value[usable].float()[:2_000_000], torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])).tolist()
    print(f"selection: {len(chosen)} of {int(usable.sum())} usable images ({int((~usable).sum())} skipped), "
          f"rule: {record['rule']}")
    print("score quantiles (0/10/50/90/100%): " + " ".join(f"{v:.4f}" for v in q))
    shown = ", ".join(f"{c}:{int(counts[c])}" for c in counts.argsort(descending=True)[:10].tolist() if counts[c])
    print(f"predicted classes covered: {int((counts > 0).sum())}/{num_classes}; most frequent: {shown}")


@cli_main
def main(args):
    check_selection_args(args)
    if args.batch_size:
        args.score_batch_size = args.batch_size
    device = resolve_device(args.device)
    init_distributed(device)
    teacher = models.teacher_from_args(args, device)
    if rank_world()[0] == 0:
        print(f"teacher {teacher.name} ({teacher.num_classes} classes, {teacher.in_chans}x{teacher.img_size}px"
              + (", EMA weights" if teacher.ema else "") + f"); normalisation mean {list(teacher.mean)} "
              f"std {list(teacher.std)} from {teacher.norm_source}")
        for note in teacher.notes:
            print(f"note: {note}")
    t0 = time.time()
    run_selection(args, teacher, device)
    if rank_world()[0] == 0:
        print(f"done in {time.time() - t0:.1f}s; " + (
            f"{args.selected_file} is read-only: the selection was not written (DFND_DeiT-train.py writes it into "
            "its --output_dir)" if read_only(args.selected_file) else f"files in {args.selected_file}"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
