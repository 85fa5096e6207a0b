"""Stage 1: score every wild image with the teacher's attention probe and confidence, keep the best.

    python select_data.py --data_imagenet /data/imagenet/train --teacher deit_base_patch4_32_teacher \
        --teacher_dir teacher_cifar100.pth --num_select 650000 --selected_file selected/cifar100 --attnprobe_sel
    torchrun --nproc_per_node 8 select_data.py ...          # each rank scores its strided shard

Writes into --selected_file the pool's scores (scoring.py: value_out.pth, pred_out.pth, value_blk{b}.pth,
probs_out.npy, skipped.txt, scores_meta.json; with --store_signals the extra signals of signals.py) and
the selection (selection.py: selection.pt, selected.txt, class_weights.pth) and its pictures (report.py:
report/). Scores are computed once in resumable chunks and reused while their fingerprint (pool, teacher
file, preprocessing, probe) matches; the selection is cheap and recomputed every run, so another rule or
--num_select costs seconds.

In code: settings = resolve_select_settings(args, device); run_selection(settings, teacher) -> selection.Selection,
the value the next stage trains from.
"""
import argparse
import os
import sys
import time

import torch

import flags
import models
import pool
import published
import report
import scoring
import signals
from attention_probe import PROBE_BLOCKS
from safety import cli_main, init_distributed, on_rank0, run_lock, set_phase
from selection import (RULE_SETTINGS, RULES, Selection, class_collapse, class_mass, combined_value, describe,
                       read_record, rule_needs, rule_value, score_quantiles, select_indices,
                       warn_class_collapse)
from settings import PLAN_RECORDS, check_probe, resolve_select_settings
from utils import InputError, rank_world, resolve_device, say


def add_selection_args(parser):
    """Flags shared by select_data.py and DFND_DeiT-train.py (published names kept)."""
    g = parser.add_argument_group("selection (stage 1)")
    g.add_argument("--data_imagenet", type=flags.path, nargs="+", help="wild pool: a folder of images (any depth), "
                   "a folder of .tar shards, or .tar shard paths")
    g.add_argument("--teacher", type=flags.model_name, default=None,
                   help="teacher model name (default: the one the teacher file names, "
                   f"else {published.TEACHER})")
    g.add_argument("--teacher_dir", type=flags.path,
                   help="teacher checkpoint file: DeiT main.py or timm train.py checkpoints, "
                   "the official DeiT releases, train_teacher.py files, plain state dicts, .safetensors; or "
                   "weights timm loads itself: hf-hub:org/name or a pretrained tag (deit_base_patch16_224.fb_in1k)")
    g.add_argument("--teacher_ema", action="store_true",
                   help="use the EMA weights of the teacher file (DeiT 'model_ema', timm 'state_dict_ema')")
    g.add_argument("--nb_classes", type=flags.positive_int, default=None,
                   help="teacher classes (default: read from checkpoint)")
    g.add_argument("--num_select", type=flags.selection_count, default=None,
                   help=f"images to keep (default {published.NUM_SELECT}, as published)")
    g.add_argument("--selected_file", type=flags.path,
                   help="folder for score files and the selection (read-only is fine when it "
                   "holds complete scores of this pool and teacher)")
    g.add_argument("--attnprobe_sel", action="store_true",
                   help="add the attention probe to the score (the published flag was inverted; this is not)")
    g.add_argument("--random", action="store_true", help="select uniformly at random (baseline)")
    g.add_argument("--attnlier", type=flags.nonneg_float, default=published.ATTNLIER,
                   help=f"with --attnprobe_sel: weight of the probe scores (default {published.ATTNLIER})")
    g.add_argument("--outlier", type=flags.nonneg_float, default=published.OUTLIER,
                   help=f"with --attnprobe_sel: weight of the confidence score (default {published.OUTLIER}; without "
                   "--attnprobe_sel the confidence alone ranks)")
    g.add_argument("--rule", default="published", choices=["published", *RULES],
                   help="ranking score: 'published' (default: confidence, plus the probe with --attnprobe_sel) "
                        "or an opt-in rule of selection.RULES")
    g.add_argument("--store_signals", action="store_true",
                   help="also store the extra signals of signals.py (sig_<name>.pth, prelogits_out.npy) so that "
                        "any --rule runs later without rescoring (implied by a --rule that reads a signal)")
    g.add_argument("--flip_signal", action="store_true",
                   help="with the extra signals, also score each image flipped (flip_agree, flip_kl): "
                        "doubles the teacher compute")
    g.add_argument("--per_class", type=flags.positive_int, default=None,
                   help="class-balanced: best N per teacher-predicted class, then fill from the global order "
                   "(with --random: N drawn at random per predicted class, then filled at random)")
    g.add_argument("--probe_blocks", type=flags.nonneg_int, nargs="+", action=flags.Increasing,
                   default=list(PROBE_BLOCKS), help="0-based blocks of the teacher, increasing (default "
                   + " ".join(map(str, PROBE_BLOCKS)) + ")")
    g.add_argument("--probe_head", type=flags.nonneg_int, default=0,
                   help="attention head of the probe, below the teacher's head count (default 0)")
    g.add_argument("--img_size", type=flags.positive_int, default=None,
                   help="must equal the teacher's input size (default: it)")
    g.add_argument("--mean", type=flags.finite_float, nargs="+", default=None,
                   help="normalisation mean, one value or one per channel (default: the teacher checkpoint's, "
                   "else ImageNet's)")
    g.add_argument("--std", type=flags.positive_float, nargs="+", default=None, help="normalisation std (as --mean)")
    g.add_argument("--cache_dir", type=flags.path, default=None,
                   help=f"uint8 pool cache (default for inputs <= {published.LARGE_INPUT} px: "
                   "<selected_file>/pool_cache_<size>px)")
    g.add_argument("--no_cache", action="store_true", help="decode the pool images instead of caching them")
    g.add_argument("--fast_decode", action="store_true", help="decode large JPEGs at a reduced scale (~2x "
                   "faster, slightly different pixels and scores; default: full decode + resize, as published)")
    g.add_argument("--score_batch_size", type=flags.positive_int, default=512, help="scoring batch (default 512)")
    g.add_argument("--chunk_size", type=flags.positive_int, default=65536,
                   help="images per resumable scoring chunk (default 65536)")
    g.add_argument("--force", action="store_true", help="rescore even if score files from another run exist")
    g.add_argument("--no_report", action="store_true", help="draw no selection report (--selected_file/report/: "
                   "report.md, histograms, classes, contact sheet, probe heat maps; ours, not published)")
    # flags that would be ignored in a combination are refused, naming both
    parser.needs("--attnlier", "--attnprobe_sel", "it weighs the probe scores")
    parser.needs("--outlier", "--attnprobe_sel", "without it the confidence alone ranks")
    parser.check(lambda a: a.attnprobe_sel and a.attnlier == 0 and a.outlier == 0,
                 "--attnlier 0 and --outlier 0 weigh every score by zero: nothing would rank the images")
    parser.excludes("--attnprobe_sel", "--rule", "a --rule ranks by its own score")
    parser.excludes("--random", "--attnprobe_sel", "--random ranks by no score")
    parser.excludes("--random", "--rule", "--random ranks by no score")
    parser.excludes("--cache_dir", "--no_cache", "--no_cache decodes every image without a cache")
    return parser


def get_args_parser():
    parser = flags.Parser(description="Attention-probe selection of wild images", parents=[flags.system_parser()])
    add_selection_args(parser)
    # in DFND_DeiT-train.py --batch_size is the training batch; here the old spelling of the scoring batch
    parser.add_argument("--batch_size", "--batch-size", type=flags.positive_int, dest="score_batch_size",
                        default=argparse.SUPPRESS,
                        help="old spelling of --score_batch_size")
    parser.records(stage2_keys)   # --config RUN/args.json reruns that run's selection
    return parser


def stage2_keys(config):
    """A DFND_DeiT-train.py args.json (it holds settings.PLAN_RECORDS) also holds stage 2's flags: --config
    skips every key that is no flag here."""
    return set(config) if PLAN_RECORDS[0] in config else set()


def list_pool(s):
    return pool.list_pool(s.pool if len(s.pool) > 1 else s.pool[0])


def default_cache_dir(s, teacher):
    """Where the pool's uint8 cache lives for this teacher's input, or None when images are decoded."""
    if s.no_cache:
        return None
    if s.cache_dir:
        return s.cache_dir
    if teacher.img_size <= published.LARGE_INPUT and s.selected_file:
        fast = "_fast" if s.fast_decode else ""
        return os.path.join(s.selected_file, f"pool_cache_{teacher.img_size}px_{teacher.in_chans}ch{fast}")
    return None


def open_pool_source(s, teacher, pool_index):
    """The uint8 cache when used (built once, resumable), else None: images are decoded on the fly."""
    cache_dir = default_cache_dir(s, teacher)
    if cache_dir is None:
        return None
    # built by rank 0; its failure (a full disk) ends every rank
    set_phase("building the pool cache (rank 0)", "the cache chunks already decoded")
    on_rank0(lambda: pool.build_cache(pool_index, cache_dir, teacher.img_size, teacher.in_chans, workers=s.workers,
                                      force=s.force, fast_decode=s.fast_decode) and None)
    return pool.open_cache(cache_dir)


def existing_cache(s, teacher):
    """The finished uint8 cache of a run that did not need to score, else None (decode the images)."""
    cache_dir = default_cache_dir(s, teacher)
    if cache_dir and os.path.exists(os.path.join(cache_dir, pool.CACHE_META)):
        try:
            return pool.open_cache(cache_dir)
        except InputError:
            return None   # unfinished cache: decode the few selected images directly
    return None


# ---- stage 1 ---------------------------------------------------------------------------------------

def rule_signals(rule):
    """The extra signals (signals.SIGNALS) `rule` reads: they must be stored."""
    return [] if rule == "published" else [a for a in rule_needs(rule) if a in signals.SIGNALS]


def run_selection(s, teacher):
    """Score the pool with `teacher` (or reuse the scores) and select -> Selection, on every rank.

    Rank 0 chooses; the choice, or the error that stopped it, is shared with every rank, so an error found
    there ends all of them alike. Each rank builds the Selection; rank 0 writes it (selection.pt,
    selected.txt, class_weights.pth) unless --selected_file is read-only.
    """
    rank, _ = rank_world()
    pool_index = list_pool(s)
    if s.num_select > len(pool_index):
        raise InputError(f"--num_select {s.num_select} is larger than the pool ({pool_index.describe()})")
    say(f"pool: {pool_index.describe()}")
    fingerprint = scoring.fingerprint(pool_index, teacher, s.probe_blocks, s.probe_head, s.fast_decode)
    cache = None
    if scoring.read_only(s.selected_file):   # finished scores only: nothing is written there, nothing to lock
        if s.force or not on_rank0(scoring.scores_ready, s.selected_file, fingerprint, False):
            raise InputError(f"--selected_file {s.selected_file} cannot be written and holds no complete scores "
                             "of this pool and teacher" + (" (--force rescores)" if s.force else "")
                             + ": choose a writable --selected_file")
        chosen = on_rank0(select_from_scores, s, teacher.num_classes, pool_index)
        selection = Selection.of(**chosen, pool_index=pool_index, cache=None, scores=fingerprint)
    else:
        if rank == 0:
            os.makedirs(s.selected_file, exist_ok=True)
        # two runs writing one --selected_file would mix their chunks: the second is refused
        with run_lock(s.selected_file, "--selected_file"):
            store = (signals.SignalStore(s.selected_file, flip=s.flip_signal)
                     if s.store_signals or s.flip_signal or rule_signals(s.rule) else None)
            # rank 0's view, on every rank: one rank seeing files another does not would split the run
            ready = on_rank0(scoring.scores_ready, s.selected_file, fingerprint, s.force)
            if ready and store and not on_rank0(store.complete):
                say(f"the score files in {s.selected_file} lack extra signals this run needs: scoring "
                    "again to store them (the published files come out the same)")
                ready = False
            if not ready:
                cache = open_pool_source(s, teacher, pool_index)
                scoring.score_pool(s, teacher, pool_index, cache, fingerprint, store)
            chosen = on_rank0(select_from_scores, s, teacher.num_classes, pool_index)
            selection = Selection.of(**chosen, pool_index=pool_index, cache=cache, scores=fingerprint)
            on_rank0(selection.save, s.selected_file)
    if selection.cache is None:
        selection.cache = existing_cache(s, teacher)
    if not s.no_report and not scoring.read_only(s.selected_file):
        on_rank0(draw_report, s, selection, teacher)
    return selection


def draw_report(s, selection, teacher):
    """Rank 0: the selection's pictures and page in --selected_file/report/ (report.py). A picture that fails
    is a warning: the selection it shows is already saved."""
    try:
        report.draw(s, rank_pool(s, len(selection.pool_index)), selection.indices, selection.rule,
                    teacher.num_classes, selection.source, teacher)
    except Exception as e:
        print(f"warning: the selection report was not drawn ({type(e).__name__}: {e}); "
              f"python tools/show_selection.py {s.selected_file} draws it from the saved scores", file=sys.stderr)


def rank_pool(s, pool_size):
    """The stored scores in s.selected_file and what the rule ranks them by -> (arrays, value (N,) float64,
    usable (N,) bool, pred (N,) long); LOW value = kept first, skipped images unusable."""
    if s.rule == "published":
        needs = ["value_blk"] if s.attnprobe_sel else []
    else:
        needs = rule_needs(s.rule)
    arrays = scoring.load_arrays(s.selected_file, needs, s.probe_blocks if "value_blk" in needs else [])
    n = len(arrays["value_out"])
    if pool_size is not None and n != pool_size:
        raise InputError(f"score files in {s.selected_file} cover {n} images but the pool has {pool_size}")
    pred = arrays["pred_out"].long()
    usable = torch.isfinite(arrays["value_out"]) & (pred >= 0)
    if s.rule == "published":
        value = combined_value(arrays, s.attnprobe_sel, s.attnlier, s.outlier, s.probe_blocks)
    else:   # an opt-in rule of selection.RULES, from the same single scoring pass
        try:
            value = rule_value(s.rule, arrays, usable, s.probe_blocks)
        except ValueError as e:
            raise InputError(f"--rule {s.rule}: {e} (score files in {s.selected_file})") from None
    return arrays, value, usable, pred


def select_from_scores(s, num_classes, pool_index, ranking=None):
    """Rank 0, cheap: the stored scores ranked by the rule (rank_pool's, unless `ranking` holds them), with the
    class-collapse warning and a summary printed. -> {'indices', 'pred', 'mass', 'rule', 'value', 'settings'}
    (Selection.of's arguments)"""
    arrays, value, usable, pred = ranking or rank_pool(s, len(pool_index))
    chosen = select_indices(value, usable, s.num_select, pred, s.per_class, s.random, s.seed)
    mass = class_mass(scoring.load_probs(s.selected_file), pred, chosen, num_classes)
    picked = {"indices": chosen, "pred": pred[chosen], "mass": mass,
              "rule": describe(s.rule, s.attnprobe_sel, s.random, s.per_class), "value": value[chosen].float(),
              "settings": {key: getattr(s, dest) for key, dest in RULE_SETTINGS.items()}}
    warn_class_collapse(class_collapse(picked["pred"], num_classes), len(chosen), num_classes, s.per_class)
    print_summary(picked, value, usable, num_classes)
    return picked


def load_selection(path, s, teacher):
    """A selection.pt chosen elsewhere (e.g. demo.py's oracle, a run folder's) -> Selection over the pool of
    --data_imagenet, with class weights for exactly these images: from the teacher's stored softmax when the
    score files in --selected_file are this pool's and teacher's, else from the predicted classes. Nothing
    is written."""
    sel = read_record(path)
    indices, pred = sel["indices"], sel["pred"]
    pool_index = list_pool(s)
    if int(indices.min()) < 0 or int(indices.max()) >= len(pool_index):
        raise InputError(f"--selection_file {path}: indices must lie in [0, {len(pool_index)}), the pool "
                         f"({pool_index.describe()})")
    recorded_pool = (sel.get("scores") or {}).get("pool")
    if recorded_pool is not None and recorded_pool != pool.pool_fingerprint(pool_index):
        raise InputError(f"--selection_file {path} was chosen from another pool than --data_imagenet "
                         f"({pool_index.describe()}): its recorded pool fingerprint differs")
    if s.num_select_given and s.num_select != len(indices):
        raise InputError(f"--num_select {s.num_select} but --selection_file {path} holds {len(indices)} images: "
                         "drop --num_select (the file decides)")
    probs = scoring.load_probs(s.selected_file) if s.selected_file else None
    if probs is not None and scoring.matches(s.selected_file, scoring.fingerprint(pool_index, teacher, s.probe_blocks,
                                                                          s.probe_head, s.fast_decode)):
        mass = class_mass(probs, None, indices, teacher.num_classes)
    else:
        mass = class_mass(None, pred, torch.arange(len(pred)), teacher.num_classes)
    value = sel.get("value")
    value = torch.as_tensor(value).float() if value is not None else None
    return Selection.of(indices, pred, mass, pool_index, existing_cache(s, teacher),
                        str(sel.get("rule", f"from {path}")), value, scores=sel.get("scores"))


def print_summary(picked, value, usable, num_classes):
    counts = torch.bincount(picked["pred"], minlength=num_classes)
    q = score_quantiles(value, usable)
    print(f"selection: {len(picked['indices'])} of {int(usable.sum())} usable images ({int((~usable).sum())} "
          f"skipped), rule: {picked['rule']}")
    print("score quantiles (0/10/50/90/100%): " + " ".join(f"{v:.4f}" for v in q))
    shown = ", ".join(f"{c}:{int(counts[c])}" for c in counts.argsort(descending=True)[:10].tolist() if counts[c])
    print(f"predicted classes covered: {int((counts > 0).sum())}/{num_classes}; most frequent: {shown}")


def load_teacher(s, device):
    """The teacher of the flags, its first lines printed on rank 0."""
    teacher = models.load_teacher(**s.teacher_spec, device=device)
    check_probe(s, teacher)
    say(f"teacher {teacher.name} ({teacher.num_classes} classes, {teacher.in_chans}x{teacher.img_size}px"
        + (", EMA weights" if teacher.ema else "") + f"); normalisation mean {list(teacher.mean)} "
        f"std {list(teacher.std)} from {teacher.norm_source}")
    for note in teacher.notes:
        say(f"note: {note}")
    return teacher


@cli_main
def main(args):
    device = resolve_device(args.device)
    s = resolve_select_settings(args, device)
    init_distributed(device, args.dist_timeout)
    teacher = load_teacher(s, device)
    t0 = time.time()
    run_selection(s, teacher)
    say(f"done in {time.time() - t0:.1f}s; " + (
        f"{s.selected_file} is read-only: the selection was not written (DFND_DeiT-train.py writes it into "
        "its --output_dir)" if scoring.read_only(s.selected_file) else f"files in {s.selected_file}"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
