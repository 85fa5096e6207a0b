"""Fashion-MNIST in the wild: an honest end-to-end evaluation of attention-probe selection.

    python demo/demo.py                         # default: mismatch pool, one seed, <= 20 min on 2 CPU cores
    python demo/demo.py --pool far-ood          # 10-class teacher, held-out images + made images
    python demo/demo.py --full --device cuda    # both pools (mismatch at relevant share 0.2 and 0.6), 2 seeds
    python demo/demo.py --seeds 0 1 2           # 3 seeds, a teacher + 7 students each: mean ± sd (36 min, 2 cores)
    python demo/demo.py --tiny                  # a few hundred images, 1 epoch: checks the plumbing (tests)
    python demo/demo.py --ablation pd           # selection x probe distillation: both pools, 3 seeds, 8 rules

Protocol, fixed before any rule was scored: the teacher (train_teacher.py, one per seed) learns its
classes from Fashion-MNIST train images [0, 30000); pools (the same for every seed) hold only held-out
train images [30000, 60000) plus made images; a manifest (source, true class) is read for evaluation
only. Every rule selects the same number of images (the number of in-domain images in the pool)
through select_data's functions; every student is trained by distill.main and tested on the official
test images of the teacher's classes. Writes <out>/results.json, results_<pool>.json, results.md and
PNG pictures; with several seeds every column is the mean over seeds, with its sample sd (ddof=1) and
the per-seed values. Progress on the terminal: one line per teacher epoch, per seed's scoring, per
finished student (with the time left), and a line each minute while no student finishes.
"""
import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time

# OpenMP threads that spin while waiting collapse on a shared 2-core machine (measured: 55 vs 202 img/s);
# sleeping waiters cost little when the machine is free. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)  # runs as python demo/demo.py: the pipeline modules live at the root

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import demo_pool as dp  # noqa: E402
import plots  # noqa: E402
import pool_share  # noqa: E402
from utils import cpu_cores  # noqa: E402

RULES = ("random", "outlier", "probe", "outlier_balanced", "probe_balanced", "oracle", "energy")
# rule -> (what selects, balanced by predicted class, probe distillation in the student's loss)
RULE_SPECS = {
    "random": ("random", False, False), "outlier": ("outlier", False, False), "probe": ("probe", False, True),
    "outlier_balanced": ("outlier", True, False), "probe_balanced": ("probe", True, True),
    "oracle": ("oracle", False, False), "energy": ("energy", False, False),
    # opt-in, --ablation pd: the images and the PD loss swapped apart (selection x PD)
    "random_pd": ("random", False, True), "outlier_pd": ("outlier", False, True),
    "probe_nopd": ("probe", False, False), "oracle_pd": ("oracle", False, True),
    # opt-in: the published selection and the signal study's post-hoc rule, plain and balanced, no PD
    "probe_balanced_nopd": ("probe", True, False),
    "tok": ("confidence+tok_norm_b2", False, False), "tok_balanced": ("confidence+tok_norm_b2", True, False),
    # opt-in: balanced rules with PD, so that every rule of a comparison has the same loss (gpu_check part 6)
    "outlier_balanced_pd": ("outlier", True, True), "tok_balanced_pd": ("confidence+tok_norm_b2", True, True),
}
ABLATIONS = {"pd": ("random", "random_pd", "outlier", "outlier_pd", "probe_nopd", "probe", "oracle", "oracle_pd"),
             # every student with PD: does selecting pay, with which rule (docs/demo_experiments.md, section 3)
             "selection": ("random_pd", "probe", "probe_balanced", "tok_balanced_pd", "oracle_pd")}
# the pools of an ablation, in the order they run (selection: the share where selection should pay first)
ABLATION_POOLS = {"pd": [("mismatch", None), ("far-ood", None)],
                  "selection": [("mismatch", 0.05), ("mismatch", 0.2), ("far-ood", None)]}
# the comparisons the ablation answers: (a, b, what a - b measures)
ABLATION_PAIRS = {"pd": [("probe", "outlier", "the demo's +3 points: images and PD together"),
                         ("outlier_pd", "outlier", "PD on outlier's images"),
                         ("probe", "probe_nopd", "PD on probe's images"),
                         ("probe_nopd", "outlier", "probe's images vs outlier's, no PD"),
                         ("probe", "outlier_pd", "probe's images vs outlier's, with PD"),
                         ("random_pd", "random", "PD on random images"),
                         ("oracle_pd", "oracle", "PD on the in-domain images"),
                         ("probe", "random_pd", "probe vs random, both with PD"),
                         ("probe", "oracle_pd", "probe vs oracle, both with PD")],
                  "selection": [("probe", "random_pd", "the published rule vs random images"),
                                ("probe_balanced", "random_pd", "the published rule, balanced, vs random images"),
                                ("tok_balanced_pd", "random_pd", "the stronger signal, balanced, vs random images"),
                                ("oracle_pd", "random_pd", "finding the domain exactly vs random images"),
                                ("tok_balanced_pd", "probe_balanced", "the stronger signal vs the published rule"),
                                ("probe_balanced", "probe", "balancing the published rule"),
                                ("probe", "oracle_pd", "the published rule vs the oracle"),
                                ("probe_balanced", "oracle_pd", "the published rule, balanced, vs the oracle"),
                                ("tok_balanced_pd", "oracle_pd", "the stronger signal, balanced, vs the oracle")]}
RESULT_FIELDS = ("selection_precision", "student_acc1", "auroc", "classes_covered", "seconds")
FMNIST_MEAN, FMNIST_STD = 0.286, 0.353

PRESETS = {
    # CPU, 2 cores: small patch-7 ViTs (17 tokens), pool subsampled, few epochs
    "default": dict(pools=[("mismatch", None)], seeds=[0], teacher="deit_mini_patch7_28_teacher",
                    student="deit_mini_patch7_28", teacher_epochs=8, teacher_batch=64, teacher_lr=2e-3,
                    teacher_warmup=0,
                    pool_size=10000, student_epochs=25, student_samples=None, student_batch=64,
                    lr_S=2e-3, max_teacher_train=None, max_val=None, jobs=2),
    # GPU (one H100/H200, ~12-13 min from rates measured on an H200): paper-size 28x28 models, whole held-out pools, 2 seeds
    "full": dict(pools=[("mismatch", 0.2), ("mismatch", 0.6), ("far-ood", 0.25)], seeds=[0, 1],
                 teacher="deit_small_patch4_28_teacher", student="deit_tiny_patch4_28", teacher_epochs=40,
                 teacher_batch=512, teacher_lr=1.5e-3, teacher_warmup=2, pool_size=20000, student_epochs=None,
                 student_samples=120000, student_batch=512, lr_S=1e-3, max_teacher_train=None,
                 max_val=None, jobs=4),
    # plumbing check for tests/CI: a few hundred images, one epoch
    "tiny": dict(pools=[("mismatch", None)], seeds=[0], teacher="deit_mini_patch7_28_teacher",
                 student="deit_mini_patch7_28", teacher_epochs=1, teacher_batch=64, teacher_lr=2e-3, teacher_warmup=0,
                 pool_size=250, student_epochs=1, student_samples=None, student_batch=32, lr_S=1e-3,
                 max_teacher_train=300, max_val=120, jobs=1),
}
DEFAULT_SHARE = {"mismatch": 0.2, "far-ood": 0.25}


def _positive(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def get_args_parser():
    p = argparse.ArgumentParser("Attention Probe on Fashion-MNIST in the wild", allow_abbrev=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="both pools, relevant share 0.2 and 0.6, 2 seeds (GPU)")
    g.add_argument("--tiny", action="store_true", help="a few hundred images, 1 epoch (tests)")
    p.add_argument("--pool", choices=["mismatch", "far-ood"], default=None, help="pool kind (default mismatch)")
    p.add_argument("--relevant_share", type=float, default=None,
                   help="share of in-domain images in the pool (default 0.2 mismatch, 0.25 far-ood)")
    p.add_argument("--pool_size", type=int, default=None, help="pool images (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds (default: the preset's); each seed trains its own teacher and students")
    p.add_argument("--rules", nargs="+", choices=list(RULE_SPECS), default=None,
                   help=f"rules to run (default: {' '.join(RULES)}; with --ablation: its rules)")
    p.add_argument("--ablation", choices=list(ABLATIONS), default=None,
                   help="pd: selection x probe distillation on the mismatch and far-ood pools, seeds 0 1 2 "
                        f"(rules {' '.join(ABLATIONS['pd'])}); selection: every student with PD on the mismatch "
                        f"pool at shares 0.05 and 0.2 and the far-ood pool, seeds 0 1 2 (rules "
                        f"{' '.join(ABLATIONS['selection'])}); --pool, --relevant_share, --seeds, --rules narrow it")
    p.add_argument("--estimate_only", action="store_true",
                   help="score each pool with each seed's teacher and measure the in-domain estimators "
                        "(pool_share.py) against the truth; no students")
    p.add_argument("--keep_ratio", type=_positive, default=1.0,
                   help="images every rule keeps, relative to the pool's in-domain images (default 1)")
    p.add_argument("--teachers", default=None,
                   help="folder holding teacher_<C>cls_seed<S>/ (default --out); finished teachers of the same "
                        "settings there are reused, missing ones trained there")
    p.add_argument("--teacher_epochs", type=int, default=None)
    p.add_argument("--student_epochs", type=int, default=None)
    p.add_argument("--teacher", default=None, help="teacher model (default: the preset's)")
    p.add_argument("--student", default=None, help="student model (default: the preset's)")
    p.add_argument("--max_teacher_train", type=int, default=None, help="subsample the teacher's train images")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else runs/demo)")
    p.add_argument("--fmnist", default=dp.FMNIST_DIR, help="Fashion-MNIST IDX folder")
    p.add_argument("--fake_data", action="store_true",
                   help="use generated IDX data (automatic with --tiny when the real files are missing)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--jobs", type=int, default=None, help="students trained at once (CPU: processes of 1 thread)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: cores)")
    p.add_argument("--workers", type=int, default=None, help="pool-cache decoding processes (default: cores)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished teachers of the same settings and seed in --out")
    return p


# ------------------------------------------------------------------------------------------ set-up

def resolve_config(args):
    name = "full" if args.full else "tiny" if args.tiny else "default"
    cfg = dict(PRESETS[name], preset=name)
    if args.ablation:
        cfg.update(pools=list(ABLATION_POOLS[args.ablation]), seeds=[0, 1, 2])
    if args.pool:
        cfg["pools"] = [(args.pool, args.relevant_share)]
    elif args.relevant_share is not None:
        cfg["pools"] = [(kind, args.relevant_share) for kind, _ in cfg["pools"]]
    cfg["pools"] = [(kind, DEFAULT_SHARE[kind] if share is None else share) for kind, share in cfg["pools"]]
    for kind, share in cfg["pools"]:
        if not 0 < share < 1:
            raise SystemExit(f"error: --relevant_share must be in (0, 1), got {share}")
    for key in ("pool_size", "seeds", "teacher_epochs", "student_epochs", "jobs", "teacher", "student",
                "max_teacher_train"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.student_epochs is not None:
        cfg["student_samples"] = None
    cfg["rules"] = list(args.rules or (ABLATIONS[args.ablation] if args.ablation else RULES))
    cfg["ablation"] = args.ablation
    cfg["keep_ratio"] = args.keep_ratio
    cfg["estimate_only"] = args.estimate_only
    cores = cpu_cores()
    cfg["threads"] = args.threads or cores
    cfg["workers"] = args.workers if args.workers is not None else min(cores, 8)
    return cfg


def pool_name(kind, share, cfg):
    # a kind that appears once keeps its plain name: results_mismatch.json
    same = [s for k, s in cfg["pools"] if k == kind]
    return kind if len(same) == 1 else f"{kind}-r{share:g}"


def load_data(args, cfg, out):
    root = args.fmnist
    missing = not all(os.path.exists(os.path.join(root, f)) or os.path.exists(os.path.join(root, f + ".gz"))
                      for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"))
    if args.fake_data or (missing and cfg["preset"] == "tiny"):
        root = dp.write_fake_idx(os.path.join(out, "fake_fashion_mnist"))
        print(f"using GENERATED Fashion-MNIST-shaped data in {root} (not the real data set)")
        cfg["data"] = "generated"
    elif missing:
        raise SystemExit(f"error: Fashion-MNIST not found in {root}: apt-get install dataset-fashion-mnist "
                         "(Debian/Ubuntu) or pass --fmnist DIR with the four IDX files")
    else:
        cfg["data"] = "Fashion-MNIST"
    cfg["data_root"] = root
    return dp.load_fashion_mnist(root)


@contextlib.contextmanager
def quiet(log_path):
    """Send a stage's stdout/stderr (progress bars, per-epoch lines) to its log file."""
    with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


# ------------------------------------------------------------------------------------------ teacher

def teacher_data(cfg, fm, classes, out):
    """The teacher's ImageFolder tree (train + test images), exported once and shared by every seed's teacher."""
    data_dir = os.path.join(out, f"teacher_{len(classes)}cls_data")
    stamp = {k: cfg[k] for k in ("max_teacher_train", "max_val", "data")}
    stamp.update(classes=list(classes), data_root=os.path.abspath(cfg["data_root"]))
    stamp_path = os.path.join(data_dir, "export.json")
    if os.path.exists(stamp_path) and json.load(open(stamp_path)).get("stamp") == stamp:
        return data_dir, json.load(open(os.path.join(data_dir, "sources.json"))), 0.0
    t0 = time.time()
    print(f"teacher data: exporting the images of {len(classes)} classes to {data_dir}", flush=True)
    with quiet(os.path.join(out, f"teacher_{len(classes)}cls_export.log")):
        sources = dp.export_teacher_data(data_dir, fm, classes, cfg["max_teacher_train"], cfg["max_val"])
    with open(stamp_path, "w") as f:      # written last: a stamp means a complete export
        json.dump({"stamp": stamp}, f)
    return data_dir, sources, time.time() - t0


def get_teacher(cfg, fm, classes, out, device, reuse, seed):
    """Train the teacher of seed `seed` with train_teacher (in <out>/teacher_<C>cls_seed<S>/) -> info dict."""
    import train_teacher
    tdir = os.path.join(out, f"teacher_{len(classes)}cls_seed{seed}")
    stamp = {k: cfg[k] for k in ("teacher", "teacher_epochs", "teacher_batch", "teacher_lr", "teacher_warmup",
                                 "max_teacher_train", "max_val", "data")}
    stamp.update(classes=list(classes), device=str(device), seed=seed)
    ckpt = os.path.join(tdir, "teacher.pth")
    info_path = os.path.join(tdir, "teacher.json")
    if reuse and os.path.exists(info_path):
        info = json.load(open(info_path))
        if info.get("stamp") == stamp and os.path.exists(ckpt) and os.path.exists(info["data"]):
            print(f"teacher seed {seed}: reusing {ckpt} (test acc1 {info['acc1']:.2f})", flush=True)
            return info
    data_dir, sources, t_export = teacher_data(cfg, fm, classes, out)
    os.makedirs(tdir, exist_ok=True)
    argv = ["--dataset", "fashionmnist", "--data", data_dir, "--model", cfg["teacher"],
            "--nb_classes", str(len(classes)), "--output", ckpt, "--epochs", str(cfg["teacher_epochs"]),
            "--batch_size", str(cfg["teacher_batch"]), "--lr", str(cfg["teacher_lr"]), "--workers", "0",
            "--mean", str(FMNIST_MEAN), "--std", str(FMNIST_STD), "--device", str(device.type),
            "--warmup_epochs", str(cfg["teacher_warmup"]), "--label_smoothing", "0", "--seed", str(seed),
            "--resume", "no"]   # a teacher not reused is trained anew (--reuse keeps finished ones)
    print(f"teacher seed {seed}: {cfg['teacher']} on {len(sources['train'])} train images of {len(classes)} "
          f"classes, {cfg['teacher_epochs']} epochs (full log {tdir}/train.log)", flush=True)
    term = sys.stdout          # the terminal, captured before quiet() redirects stdout to the log file

    def progress(rec):
        term.write(f"  teacher seed {seed} epoch {rec['epoch'] + 1}/{cfg['teacher_epochs']}: test acc1 "
                   f"{rec['test_acc1']:.2f}%, train loss {rec['train_loss']:.3f}, {rec['epoch_seconds']:.0f}s\n")
        term.flush()

    t1 = time.time()
    with quiet(os.path.join(tdir, "train.log")):
        stats = train_teacher.train_teacher(train_teacher.get_args_parser().parse_args(argv), on_epoch=progress)
    info = {"checkpoint": ckpt, "data": data_dir, "classes": list(classes), "acc1": stats["acc1"], "seed": seed,
            "train_images": len(sources["train"]), "val_images": len(sources["val"]),
            "export_seconds": t_export, "train_seconds": time.time() - t1, "stamp": stamp}
    json.dump(info, open(info_path, "w"), indent=1)
    print(f"teacher seed {seed}: test acc1 {stats['acc1']:.2f}% on {len(sources['val'])} test images "
          f"({info['train_seconds']:.0f}s)", flush=True)
    return info


# ------------------------------------------------------------------------------------------ scoring

def score_pool(cfg, teacher_info, pool_dir, num_select, device):
    """Score the pool with one seed's teacher through select_data (probe + confidence, and the extra signals
    for the energy rule). Scores go to <pool>/scores_seed<S>/; the uint8 image cache is shared by every seed."""
    import pool as pool_mod
    import scoring
    import select_data
    import settings
    scores_dir = os.path.join(pool_dir, f"scores_seed{teacher_info['seed']}")
    shutil.rmtree(scores_dir, ignore_errors=True)     # never resume another run's scores
    argv = ["--data_imagenet", os.path.join(pool_dir, "pool", "images"), "--teacher", cfg["teacher"],
            "--teacher_dir", teacher_info["checkpoint"], "--num_select", str(num_select),
            "--selected_file", scores_dir, "--workers", str(cfg["workers"]), "--device", str(device.type),
            # inside pool/: rebuilt with the pool, so never a stale cache of another pool
            "--cache_dir", os.path.join(pool_dir, "pool", "cache"), "--store_signals"]
    s = settings.resolve_select_settings(select_data.get_args_parser().parse_args(argv), device)
    with quiet(os.path.join(pool_dir, "scoring.log")):
        t = select_data.load_teacher(s, device)
        select_data.run_selection(s, t)
    cache_dir = select_data.default_cache_dir(s, t)
    cache = pool_mod.open_cache(cache_dir)
    scores = scoring.load_scores(scores_dir, s.probe_blocks)
    energy = scoring.load_signals(scores_dir, ["energy"])["energy"]
    scores["energy"] = energy.nan_to_num(nan=float("inf"))     # skipped images: never kept
    return dict(scores_dir=scores_dir, cache_dir=cache_dir, scores=scores, teacher=t.model, mean=t.mean, std=t.std,
                blocks=list(s.probe_blocks), attnlier=s.attnlier, outlier=s.outlier, cache=cache)


def rule_value(rule, sc, relevant):
    """The score each rule ranks by (LOW = keep), or None for random."""
    import scoring
    import selection
    s = sc["scores"]
    how = RULE_SPECS[rule][0]
    if how == "random":
        return None
    if how == "outlier":
        return selection.combined_value(s, False)
    if how == "probe":
        return selection.combined_value(s, True, sc["attnlier"], sc["outlier"], sc["blocks"])
    if how == "energy":        # selection.RULES' energy rule, on the stored signal
        return selection.rule_value("energy", s, torch.isfinite(s["energy"]))
    if how == "oracle":
        return torch.from_numpy(~relevant).double()     # in-domain first: exactly the in-domain images
    if how in selection.RULES:
        arrays = scoring.load_arrays(sc["scores_dir"], selection.rule_needs(how), sc["blocks"])
        usable = torch.isfinite(s["value_out"]) & (s["pred_out"] >= 0)
        return selection.rule_value(how, arrays, usable, sc["blocks"])
    raise ValueError(rule)


def select_rule(rule, value, usable, num_select, pred, per_class, seed):
    import selection
    how, balanced, _ = RULE_SPECS[rule]
    return selection.select_indices(value, usable, num_select, pred, per_class if balanced else None,
                                    random=how == "random", seed=seed)


# ------------------------------------------------------------------------------------------ students

def student_argv(cfg, rule, teacher_info, pool_dir, sc, num_select, per_class, seed, epochs, device):
    rule_dir = os.path.join(pool_dir, "rules", rule)
    sel_dir = os.path.join(rule_dir, f"selected_seed{seed}")
    run_dir = os.path.join(rule_dir, f"student_seed{seed}")
    for d in (sel_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(sel_dir)
    # the shared score files, linked: every rule reads the same single scoring pass
    for name in os.listdir(sc["scores_dir"]):
        if name.endswith((".pth", ".npy", ".json", ".txt")) and name not in ("selection.pt", "selected.txt",
                                                                             "class_weights.pth"):
            os.symlink(os.path.abspath(os.path.join(sc["scores_dir"], name)), os.path.join(sel_dir, name))
    argv = ["--dataset", "fashionmnist", "--data_cifar", teacher_info["data"],
            "--data_imagenet", os.path.join(pool_dir, "pool", "images"), "--teacher", cfg["teacher"],
            "--teacher_dir", teacher_info["checkpoint"], "--nb_classes", str(len(teacher_info["classes"])),
            "--num_select", str(num_select), "--selected_file", sel_dir, "--cache_dir", sc["cache_dir"],
            "--output_dir", run_dir, "--student", cfg["student"], "--epochs", str(epochs),
            "--batch_size", str(cfg["student_batch"]), "--lr_S", str(cfg["lr_S"]), "--cos", "--holdout", "0",
            "--eval_every", str(epochs), "--workers", "0", "--seed", str(seed), "--device", str(device.type),
            "--resume", "no", "--log_every", "1000",
            # explicit: the published weight of probe distillation, whatever distill's default is
            "--patchattn", "0.8"]
    how, balanced, pd = RULE_SPECS[rule]
    if how == "random":
        argv += ["--random"]
    elif how == "probe":
        argv += ["--attnprobe_sel"]
    elif how not in ("outlier", "oracle", "energy"):
        argv += ["--rule", how]
    if pd:
        argv += ["--attnprobe_dist"]
    if balanced:
        argv += ["--per_class", str(per_class)]
    return argv, sel_dir, run_dir


def run_student(job):
    """One distill.main run (in this process or a worker); returns its final metrics and wall time."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    import distill
    t0 = time.time()
    with quiet(os.path.join(job["run_dir"] + ".log")):
        final = distill.main(distill.get_args_parser().parse_args(job["argv"]))
    return {"final": {k: v for k, v in final.items() if k != "text"}, "text": final["text"],
            "seconds": time.time() - t0}


def run_students(jobs, n_parallel, heartbeat=60.0):
    """Train every student; prints one line per finished student (rule, seed, acc1, minutes, time left)
    and, while none finishes, a line every `heartbeat` seconds. Returns the results in job order."""
    t0 = time.time()
    outs = [None] * len(jobs)
    n_parallel = max(1, min(n_parallel, len(jobs)))

    def report(k, o):
        outs[k] = o
        done = [x for x in outs if x is not None]
        left = len(jobs) - len(done)
        eta = left * np.mean([x["seconds"] for x in done]) / n_parallel
        j = jobs[k]
        print(f"  student {len(done)}/{len(jobs)}: {j['rule']:16s} seed {j['seed']}: acc1 "
              f"{o['final']['final_acc1']:.2f}% (selection precision {j['precision']:.3f}), "
              f"{o['seconds'] / 60:.1f} min" + (f"; ~{eta / 60:.0f} min left" if left else ""), flush=True)

    if n_parallel == 1:
        for k, j in enumerate(jobs):
            report(k, run_student(j))
        return outs
    import concurrent.futures as cf
    import multiprocessing as mp
    # spawn: fresh interpreters, no OpenMP state inherited from a forked parent
    with cf.ProcessPoolExecutor(n_parallel, mp_context=mp.get_context("spawn")) as ex:
        futures = {ex.submit(run_student, dict(j, threads=1)): k for k, j in enumerate(jobs)}
        pending = set(futures)
        while pending:
            finished, pending = cf.wait(pending, timeout=heartbeat, return_when=cf.FIRST_COMPLETED)
            for f in sorted(finished, key=futures.get):
                report(futures[f], f.result())
            if not finished:
                print(f"  ... {sum(o is not None for o in outs)}/{len(jobs)} students done, "
                      f"{(time.time() - t0) / 60:.1f} min in the student phase", flush=True)
    return outs


def spread(values):
    """mean, sample standard deviation (ddof=1; None for one value) and the values themselves."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None), [float(x) for x in v]


def add_spread(target, field, values):
    """target[field] = mean over seeds, target[field_per_seed] = the values, target[field_sd] (> 1 seed)."""
    mean, sd, vals = spread(values)
    target[field] = mean
    target[f"{field}_per_seed"] = vals
    if sd is not None:
        target[f"{field}_sd"] = sd


def compare(a, b):
    """Student acc1 of rule a minus rule b, seed by seed (seed s's rules share seed s's teacher). Beyond the
    spread: the mean difference exceeds both rules' sd and the sd of the per-seed differences, with the
    same sign in every seed (a screen over few seeds, not a significance test). Needs >= 2 seeds."""
    va, vb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = va - vb
    diff, sd_d = float(d.mean()), float(d.std(ddof=1))
    beyond = bool(abs(diff) > max(va.std(ddof=1), vb.std(ddof=1), sd_d) and (np.all(d > 0) or np.all(d < 0)))
    return {"diff": diff, "diff_per_seed": [float(x) for x in d], "diff_sd": sd_d, "beyond_spread": beyond}


def comparison_pairs(cfg):
    """(a, b, what) for the report: the ablation's own pairs, then every rule against random and the oracle."""
    pairs = list(ABLATION_PAIRS.get(cfg.get("ablation"), []))
    for ref in ("random", "oracle"):
        if ref in cfg["rules"]:
            pairs += [(x, ref, "") for x in cfg["rules"] if x != ref and (x, ref) not in [p[:2] for p in pairs]
                      and (ref, x) not in [p[:2] for p in pairs]]
    return [p for p in pairs if p[0] in cfg["rules"] and p[1] in cfg["rules"]]


# ------------------------------------------------------------------------------------------ one pool

def run_pool(cfg, kind, share, name, fm, teachers, out, device):
    """teachers: {seed: teacher info}. The pool is the same for every seed; each seed's teacher scores it,
    its rules select from those scores and its students distil from that teacher."""
    t_pool = time.time()
    pool_dir = os.path.join(out, name)
    seeds = list(cfg["seeds"])
    first = teachers[seeds[0]]
    classes = first["classes"]
    print(f"\n== pool {name}: {kind}, relevant share {share:g}: writing {cfg['pool_size']} images", flush=True)
    manifest = dp.build_pool(os.path.join(pool_dir, "pool"), kind, fm, classes, share, cfg["pool_size"])
    relevant = manifest["relevant"]
    # no teacher image is in the pool (by Fashion-MNIST train index); every seed's teacher has the same data
    teacher_src = set(json.load(open(os.path.join(first["data"], "sources.json")))["train"])
    held = manifest["source_index"][manifest["source"] == "heldout"]
    overlap = len(teacher_src.intersection(held.tolist()))
    if overlap:
        raise RuntimeError(f"{overlap} pool images are teacher training images")
    in_domain = int(relevant.sum())
    num_select = max(1, round(cfg["keep_ratio"] * in_domain))
    per_class = num_select // len(classes)
    true_teacher = np.array([classes.index(c) if c in classes else -1 for c in manifest["fmnist_label"]])
    epochs = cfg["student_epochs"] or max(1, round(cfg["student_samples"] / num_select))
    import pool as pool_mod
    if pool_mod.list_pool(os.path.join(pool_dir, "pool", "images")).ids != manifest["id"].tolist():
        raise RuntimeError("pool order differs from the manifest order")

    scored, selections, jobs, score_seconds, estimates = {}, {}, [], {}, []
    for seed in seeds:
        t0 = time.time()
        print(f"pool: scoring {len(relevant)} images with teacher seed {seed}...", flush=True)
        sc = score_pool(cfg, teachers[seed], pool_dir, num_select, device)
        score_seconds[seed] = time.time() - t0
        scored[seed] = sc
        pred = sc["scores"]["pred_out"].long()
        usable = torch.isfinite(sc["scores"]["value_out"]) & (pred >= 0)
        estimates.append(pool_share.estimate_in_domain(sc["scores"]["value_out"], usable,
                                                       labelled_confidence(sc, teachers[seed])))
        print(f"pool: in-domain {in_domain}; estimated " + ", ".join(f"{k} {v:.0f}" for k, v in estimates[-1].items()),
              flush=True)
        if cfg["estimate_only"]:
            continue
        line = []
        for rule in cfg["rules"]:
            t1 = time.time()
            value = rule_value(rule, sc, relevant)
            chosen = select_rule(rule, value, usable, num_select, pred, per_class, seed)
            argv, sel_dir, run_dir = student_argv(cfg, rule, teachers[seed], pool_dir, sc, num_select, per_class,
                                                  seed, epochs, device)
            if RULE_SPECS[rule][0] in ("oracle", "energy"):   # rules select_data does not know: pass the indices
                path = os.path.join(sel_dir, "precomputed_selection.pt")
                torch.save({"indices": chosen, "pred": pred[chosen], "rule": rule}, path)
                argv += ["--selection_file", path]
            precision = float(relevant[chosen.numpy()].mean())
            selections[(rule, seed)] = dict(chosen=chosen, value=value, sel_dir=sel_dir, precision=precision,
                                            select_seconds=time.time() - t1)
            jobs.append(dict(argv=argv, run_dir=run_dir, rule=rule, seed=seed, precision=precision))
            line.append(f"{rule} {precision:.3f}")
        print(f"pool: seed {seed} scored in {score_seconds[seed]:.0f}s; selection precision: " + ", ".join(line),
              flush=True)
    pool_info = {"name": name, "kind": kind, "relevant_share": share, "size": int(len(relevant)),
                 "in_domain": in_domain, "num_select": num_select, "keep_ratio": cfg["keep_ratio"],
                 "per_class": per_class,
                 "sources": {k: int(v) for k, v in zip(*np.unique(manifest["source"], return_counts=True))},
                 "teacher_classes": [data.FASHION_CLASSES[c] for c in classes],
                 "overlap_with_teacher_train": overlap}
    estimated = estimate_errors(estimates, in_domain, seeds)
    if cfg["estimate_only"]:
        return {"pool": pool_info, "seeds": seeds, "in_domain_estimates": estimated,
                "teacher_acc1_per_seed": [teachers[seed]["acc1"] for seed in seeds],
                "timing": {"scoring_seconds": float(sum(score_seconds.values())),
                           "pool_seconds": time.time() - t_pool}}
    print(f"pool: {len(relevant)} images, {in_domain} in-domain; every rule selects {num_select}; training "
          f"{len(jobs)} students ({cfg['student']}, {epochs} epochs, {cfg['jobs']} at a time)...", flush=True)
    t_students = time.time()
    outs = run_students(jobs, cfg["jobs"])
    student_seconds = time.time() - t_students

    res = {}
    for job, o in zip(jobs, outs):
        rule, seed = job["rule"], job["seed"]
        s = selections[(rule, seed)]
        if RULE_SPECS[rule][0] not in ("oracle", "energy"):   # distill re-selected: it must agree with us
            theirs = torch.load(os.path.join(s["sel_dir"], "selection.pt"), weights_only=True)["indices"]
            if not torch.equal(theirs, s["chosen"]):
                raise RuntimeError(f"{rule}: distill's selection differs from the demo's")
        idx = s["chosen"].numpy()
        counts = np.bincount(true_teacher[idx][relevant[idx]], minlength=len(classes))
        value = s["value"]
        # random's AUROC scores a random order of the pool: chance
        # (its own stream: default_rng(seed) alone is the stream build_pool shuffles the pool with)
        order = np.random.default_rng([seed, 101]).permutation(len(relevant)).astype(np.float64)
        row = {"seed": seed, "teacher_acc1": teachers[seed]["acc1"], "selection_precision": s["precision"],
               "auroc": dp.auroc(order if value is None else value.numpy(), relevant),
               "student_acc1": o["final"]["final_acc1"], "classes_covered": int((counts > 0).sum()),
               "class_counts": counts.tolist(), "seconds": s["select_seconds"] + o["seconds"], "student": o["final"]}
        ref = selections.get(("outlier", seed))
        if ref is not None:   # how much of DFND's selection a rule shares: tells selection from loss effects
            a, b = set(s["chosen"].tolist()), set(ref["chosen"].tolist())
            row["jaccard_with_outlier"] = len(a & b) / len(a | b)
        res.setdefault(rule, {"per_seed": []})["per_seed"].append(row)
    for rule, r in res.items():
        ps = r["per_seed"]
        for field in ("selection_precision", "auroc", "classes_covered", "jaccard_with_outlier", "student_acc1"):
            if field in ps[0]:
                add_spread(r, field, [p[field] for p in ps])
        r.update(class_counts=ps[0]["class_counts"], seconds=float(sum(p["seconds"] for p in ps)))

    images = scored[seeds[0]]["cache"].images[..., 0]
    diag_per_seed = []
    for seed in seeds:
        s = scored[seed]["scores"]
        blocks = scored[seed]["blocks"]
        diag_per_seed.append({
            "confidence (value_out)": dp.auroc(s["value_out"].numpy(), relevant),
            "attention probe alone (sum of value_blk)": dp.auroc(sum(s[f"value_blk{b}"] for b in blocks).numpy(),
                                                                 relevant),
            **{f"value_blk{b}": dp.auroc(s[f"value_blk{b}"].numpy(), relevant) for b in blocks},
            "combined probe score": dp.auroc(rule_value("probe", scored[seed], relevant).numpy(), relevant),
            "energy": dp.auroc(s["energy"].numpy(), relevant)})
    diag, diag_sd = {}, {}
    for key in diag_per_seed[0]:
        mean, sd, _ = spread([d[key] for d in diag_per_seed])
        diag[key] = mean
        if sd is not None:
            diag_sd[key] = sd
    # the pixel classifier does not use the teacher: one value
    diag["pixel statistics (4 features, logistic regression)"] = dp.pixel_baseline_auroc(images, relevant)
    sc = scored[seeds[0]]
    s = sc["scores"]
    per_source = {}   # of the first seed's teacher
    for src in np.unique(manifest["source"]):
        m = manifest["source"] == src
        if src == "heldout":
            for rel, label in ((True, "heldout in-domain"), (False, "heldout irrelevant")):
                mm = m & (relevant == rel)
                if mm.any():
                    per_source[label] = _source_row(s, sc, mm, relevant)
        else:
            per_source[src] = _source_row(s, sc, m, relevant)
    result = {"preset": cfg["preset"], "data": cfg["data"], "teacher": cfg["teacher"], "student": cfg["student"],
              "student_epochs": epochs, "seeds": seeds,
              "sd": "sample standard deviation over seeds (ddof=1); *_per_seed lists follow `seeds`",
              "teacher_checkpoints": [teachers[seed]["checkpoint"] for seed in seeds]}
    add_spread(result, "teacher_acc1", [teachers[seed]["acc1"] for seed in seeds])
    result.update({"pool": pool_info, **{r: res[r] for r in cfg["rules"]},
                   "auroc_diagnostics": diag, "auroc_diagnostics_per_seed": diag_per_seed,
                   "in_domain_estimates": estimated,
                   "per_source_teacher_seed": seeds[0], "per_source": per_source,
                   "timing": {"scoring_seconds": float(sum(score_seconds.values())),
                              "student_phase_seconds": student_seconds}})
    if diag_sd:
        result["auroc_diagnostics_sd"] = diag_sd
    if len(seeds) > 1:
        result["comparisons"] = [dict(a=a, b=b, what=what, **compare(res[a]["student_acc1_per_seed"],
                                                                     res[b]["student_acc1_per_seed"]))
                                 for a, b, what in comparison_pairs(cfg)]
    print(f"pool: drawing pictures (teacher seed {seeds[0]})...", flush=True)
    t_pic = time.time()
    with quiet(os.path.join(pool_dir, "pictures.log")):
        result["pictures"] = draw_pictures(pool_dir, out, name, manifest, sc, selections, cfg)
    result["timing"].update(pictures_seconds=time.time() - t_pic, pool_seconds=time.time() - t_pool)
    return result


def labelled_confidence(sc, teacher_info):
    """The teacher's value_out on its own labelled test images, their labels unused (pool_share's `labelled`
    estimator)."""
    import models
    import scoring
    in_chans, img_size = models.input_spec(sc["teacher"])
    images = data.load_labelled("fashionmnist", teacher_info["data"], "val", img_size, in_chans).images
    with torch.no_grad():
        return torch.cat([scoring.score_images(sc["teacher"], images[i:i + 1024], sc["mean"], sc["std"], [], 0)
                          ["value_out"] for i in range(0, len(images), 1024)])


def estimate_errors(estimates, in_domain, seeds):
    """Each estimator's in-domain counts per seed and its relative error |estimate - truth| / truth."""
    out = {"true": in_domain, "seeds": seeds, "estimators": {}}
    for name in estimates[0]:
        counts = [e[name] for e in estimates]
        errors = [abs(c - in_domain) / in_domain for c in counts]
        out["estimators"][name] = {"per_seed": counts, "relative_error_per_seed": errors,
                                   "max_relative_error": max(errors)}
    return out


def _source_row(s, sc, mask, relevant):
    # mean scores of one source, and for a non-in-domain source each signal's AUROC of in-domain vs it
    probe = sum(s[f"value_blk{b}"] for b in sc["blocks"])
    signals = {"value_out": s["value_out"], "probe_sum": probe, "combined": rule_value("probe", sc, relevant),
               "energy": s["energy"]}
    row = {"n": int(mask.sum()), **{k: float(v[torch.from_numpy(mask)].mean()) for k, v in signals.items()}}
    if not (mask & relevant).any():
        both = mask | relevant
        row["auroc"] = {k: dp.auroc(v.numpy()[both], relevant[both]) for k, v in signals.items()}
    return row


# ------------------------------------------------------------------------------------------ pictures

PALETTE = {"in-domain": "#28aa46", "irrelevant": "#d23c32", "photo": "#e68c1e", "glyph": "#3c6edc",
           "shape": "#aa3cbe", "texture": "#787878", "heldout irrelevant": "#d23c32"}


def _groups(manifest):
    rel = manifest["relevant"]
    if (manifest["source"] == "heldout").all():
        return {"in-domain": rel, "irrelevant": ~rel}
    g = {"in-domain": rel}
    for src in dp.MADE_SOURCES:
        m = manifest["source"] == src
        if m.any():
            g[src] = m
    return g


def draw_histograms(path, panels, groups):
    """panels: [(title, scores (N,), auroc)] -> one PNG with a density histogram per group, per panel."""
    plots.histograms(path, [(f"{title}   AUROC {auc:.3f}" if auc == auc else title, v) for title, v, auc in panels],
                     {name: (mask, PALETTE.get(name, "black")) for name, mask in groups.items()}, density=True,
                     title="low = kept first")


def draw_grid(path, images, is_in, title, cols=16):
    """Tiles framed green (in-domain) or red (other), best first."""
    plots.image_sheet(path, [torch.from_numpy(np.asarray(im, np.uint8))[None] for im in images], cols,
                      frames=[PALETTE["in-domain" if good else "irrelevant"] for good in is_in], title=title,
                      tile_inches=0.45)


@torch.no_grad()
def draw_heatmaps(path, teacher, images, labels, mean, std, blocks, device, head=0):
    """Rows: image | probe of each block (head `head` CLS row over the patches)."""
    from attention_probe import probe_forward, probe_maps, probe_uniformity
    x = data.normalize(torch.from_numpy(np.asarray(images))[:, None].to(device), mean, std)
    out = probe_forward(teacher, x, probe_blocks=tuple(blocks), head=head)
    maps = probe_maps(out, blocks)
    cosines = [", ".join(f"blk{b} {float(probe_uniformity(out.probes[b][i:i + 1].float())):.3f}" for b in blocks)
               for i in range(len(images))]
    plots.probe_heatmaps(path, torch.from_numpy(np.asarray(images, np.uint8))[:, None], maps,
                         [f"{lab}\ncos to uniform:\n{c}" for lab, c in zip(labels, cosines)], list(blocks),
                         title=f"CLS -> patch attention of head {head} (cos to uniform: low = peaked)")


def draw_pictures(pool_dir, out, name, manifest, sc, selections, cfg):
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    s, rel = sc["scores"], manifest["relevant"]
    groups = _groups(manifest)
    probe_sum = sum(s[f"value_blk{b}"] for b in sc["blocks"]).numpy()
    seed0 = cfg["seeds"][0]
    panels = [("confidence: value_out", s["value_out"].numpy(), dp.auroc(s["value_out"].numpy(), rel)),
              ("attention probe alone: sum of value_blk", probe_sum, dp.auroc(probe_sum, rel)),
              ("combined probe score", rule_value("probe", sc, rel).numpy(),
               dp.auroc(rule_value("probe", sc, rel).numpy(), rel)),
              ("energy: -logsumexp(logits)", s["energy"].numpy(), dp.auroc(s["energy"].numpy(), rel))]
    files = {}
    files["histograms"] = f"figures/{name}_histograms.png"
    draw_histograms(os.path.join(out, files["histograms"]), panels, groups)
    images = sc["cache"].images[..., 0]
    for rule in ("outlier", "probe", "energy"):
        if (rule, seed0) not in selections:
            continue
        v = selections[(rule, seed0)]["value"].numpy()
        order = np.argsort(v, kind="stable")
        order = order[np.isfinite(v[order])]
        for which, idx in (("lowest", order[:128]), ("highest", order[::-1][:128])):
            key = f"grid_{rule}_{which}"
            files[key] = f"figures/{name}_{key}.png"
            draw_grid(os.path.join(out, files[key]), images[idx], rel[idx],
                      f"{rule}: {which}-scored 128 ({'kept first' if which == 'lowest' else 'dropped first'}); "
                      f"green = in-domain, red = not")
    pick = []
    for gname, m in groups.items():
        pick += [(i, gname) for i in np.nonzero(m)[0][:4]]
    lab = manifest["fmnist_label"]
    labels = [f"{g}: {data.FASHION_CLASSES[lab[i]] if lab[i] >= 0 else manifest['source'][i]}" for i, g in pick]
    files["heatmaps"] = f"figures/{name}_probe_heatmaps.png"
    draw_heatmaps(os.path.join(out, files["heatmaps"]), sc["teacher"], images[[i for i, _ in pick]], labels,
                  sc["mean"], sc["std"], sc["blocks"], next(sc["teacher"].parameters()).device)
    return files


# ------------------------------------------------------------------------------------------ report

def fmt_spread(x, field, digits, value_digits=None):
    """'mean' for one seed; 'mean ± sd (v1, v2, ...)' over several (sd: sample, ddof=1)."""
    f = f"{{:.{digits}f}}"
    if f"{field}_sd" not in x:
        return f.format(x[field])
    fv = f"{{:.{digits if value_digits is None else value_digits}f}}"
    vals = ", ".join(fv.format(v) for v in x[f"{field}_per_seed"])
    return f"{f.format(x[field])} ± {f.format(x[field + '_sd'])} ({vals})"


def markdown(results, cfg, total_seconds, machine):
    lines = [f"# Attention Probe on Fashion-MNIST in the wild — preset `{cfg['preset']}`", "",
             f"Machine: {machine}. Total wall time: {total_seconds / 60:.1f} min. Data: {cfg['data']}.", ""]
    for name, r in results.items():
        p = r["pool"]
        multi = len(r["seeds"]) > 1
        lines += [f"## Pool `{name}`", "",
                  "Rules: " + "; ".join(f"`{x}` = {RULE_SPECS[x][0]} images" + (", balanced" if RULE_SPECS[x][1]
                                        else "") + (", with PD" if RULE_SPECS[x][2] else ", no PD")
                                        for x in cfg["rules"]) + ".", "",
                  f"{p['size']} images ({', '.join(f'{k}: {v}' for k, v in p['sources'].items())}); "
                  f"{p['in_domain']} in-domain (relevant share {p['relevant_share']:g}); every rule keeps "
                  f"{p['num_select']}; balanced rules keep {p['per_class']} per predicted class first.",
                  f"Seeds {r['seeds']}: each seed trains its own teacher and students (the pool is the same). "
                  f"Teacher `{r['teacher']}` ({len(p['teacher_classes'])} classes: "
                  f"{', '.join(p['teacher_classes'])}): test acc1 **{fmt_spread(r, 'teacher_acc1', 2)} %**. Students "
                  f"`{r['student']}`, {r['student_epochs']} epochs; acc1 = last epoch on the official test images "
                  "of the teacher's classes."
                  + (" Cells: mean ± sample sd (ddof=1) over the seeds, then the per-seed values." if multi else ""),
                  "",
                  "| rule | selection precision | AUROC of its score | teacher classes covered | Jaccard with outlier "
                  "| student acc1 (%) | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for rule in cfg["rules"]:
            x = r[rule]
            covered = fmt_spread(x, "classes_covered", 1 if multi else 0, 0)
            lines.append(f"| {rule} | {fmt_spread(x, 'selection_precision', 3)} | {fmt_spread(x, 'auroc', 3)} | "
                         f"{covered} of {len(p['teacher_classes'])} {x['class_counts']}"
                         + (f" (seed {r['seeds'][0]})" if multi else "") + " | "
                         + (fmt_spread(x, "jaccard_with_outlier", 3) if "jaccard_with_outlier" in x else "–") + " | "
                         + f"{fmt_spread(x, 'student_acc1', 2)} | {x['seconds']:.0f} |")
        if r.get("comparisons"):
            lines += ["", "Student acc1 differences (a − b, points; beyond the spread: the mean difference exceeds "
                      "both rules' sd and the sd of the per-seed differences, same sign in every seed):", "",
                      "| a − b | what | difference | per seed | beyond the spread |", "|---|---|---|---|---|"]
            for c in r["comparisons"]:
                lines.append(f"| {c['a']} − {c['b']} | {c['what']} | {c['diff']:+.2f} ± {c['diff_sd']:.2f} | "
                             + ", ".join(f"{x:+.2f}" for x in c["diff_per_seed"]) + " | "
                             + ("yes" if c["beyond_spread"] else "no") + " |")
        lines += ["", estimates_line(r["in_domain_estimates"])]
        lines += ["", "AUROC (in-domain vs the rest, low score = in-domain):", "",
                  "| signal | AUROC |", "|---|---|"]
        sd = r.get("auroc_diagnostics_sd", {})
        for k, v in r["auroc_diagnostics"].items():
            if v is not None:
                per = [f"{d[k]:.3f}" for d in r["auroc_diagnostics_per_seed"]] if k in sd else []
                lines.append(f"| {k} | {v:.3f}" + (f" ± {sd[k]:.3f} ({', '.join(per)})" if per else "") + " |")
        lines += ["", f"Per source (teacher seed {r['per_source_teacher_seed']}): mean score, and AUROC of in-domain "
                  "vs that source (>0.5: the signal ranks in-domain images first):", "",
                  "| source | n | value_out | probe sum | combined | energy | AUROC value_out | AUROC probe sum "
                  "| AUROC combined | AUROC energy |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in r["per_source"].items():
            a = v.get("auroc", {})
            lines.append(f"| {k} | {v['n']} | {v['value_out']:.3f} | {v['probe_sum']:.4f} | {v['combined']:.3f} | "
                         f"{v['energy']:.3f} | " + " | ".join(f"{a[x]:.3f}" if x in a else "–" for x in
                                                           ("value_out", "probe_sum", "combined", "energy")) + " |")
        lines += ["", f"Pictures (teacher seed {r['seeds'][0]}): "
                  + ", ".join(f"[{k}]({v})" for k, v in r["pictures"].items()), ""]
    lines += ["Notes: random's AUROC scores a random order (chance); balanced rules share the score (and AUROC) "
              "of their plain rule. `seconds` is each rule's own selection + distillation wall time"
              + (f" (summed over seeds); with {cfg['jobs']} students trained at once these overlap." if cfg["jobs"] > 1
                 else " (summed over seeds)."), ""]
    return "\n".join(lines)


def estimates_line(e):
    """One line: the pool's in-domain count and each estimator's counts per seed with its largest error."""
    parts = [f"`{name}` " + ", ".join(f"{c:.0f}" for c in x["per_seed"])
             + f" (largest error {100 * x['max_relative_error']:.1f} %)" for name, x in e["estimators"].items()]
    return f"In-domain images: {e['true']}; estimated (seeds {e['seeds']}, `pool_share.py`): " + "; ".join(parts) + "."


def estimates_markdown(results, total_seconds, machine):
    lines = ["# In-domain estimators on the demo's pools (`--estimate_only`)", "",
             f"Machine: {machine}. Total wall time: {total_seconds / 60:.1f} min.", "",
             "| pool | relevant share | in-domain | estimator | estimate per seed | relative error per seed "
             "| largest |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        e = r["in_domain_estimates"]
        for est, x in e["estimators"].items():
            lines.append(f"| {name} | {r['pool']['relevant_share']:g} "
                         f"| {e['true']} | `{est}` | " + ", ".join(f"{c:.0f}" for c in x["per_seed"]) + " | "
                         + ", ".join(f"{100 * v:.1f} %" for v in x["relative_error_per_seed"])
                         + f" | {100 * x['max_relative_error']:.1f} % |")
    return "\n".join(lines) + "\n"


def machine_text(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = cpu_cores()
    return f"{platform.processor() or platform.machine()} CPU, {cores} cores, torch {torch.__version__}"


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    cfg = resolve_config(args)
    out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join("runs", "demo"))
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(cfg["threads"])
    from utils import resolve_device
    device = resolve_device(args.device)
    t0 = time.time()
    fm = load_data(args, cfg, out)
    print(f"preset {cfg['preset']}: pools {cfg['pools']}, seeds {cfg['seeds']}, rules {cfg['rules']}, "
          f"device {device}, out {out}", flush=True)
    results, teachers = {}, {}
    tdir_root = os.path.abspath(args.teachers) if args.teachers else out
    os.makedirs(tdir_root, exist_ok=True)
    for kind, share in cfg["pools"]:
        classes = tuple(dp.MISMATCH_CLASSES) if kind == "mismatch" else tuple(range(10))
        for seed in cfg["seeds"]:      # one teacher per seed: the spread includes the teacher's
            if (classes, seed) not in teachers:
                teachers[(classes, seed)] = get_teacher(cfg, fm, classes, tdir_root, device,
                                                        args.reuse or bool(args.teachers), seed)
        name = pool_name(kind, share, cfg)
        by_seed = {seed: teachers[(classes, seed)] for seed in cfg["seeds"]}
        results[name] = run_pool(cfg, kind, share, name, fm, by_seed, out, device)
        results[name]["timing"]["teacher_seconds"] = float(sum(t["train_seconds"] for t in by_seed.values()))
        with open(os.path.join(out, f"results_{name}.json"), "w") as f:
            json.dump(results[name], f, indent=1)
    total = time.time() - t0
    main_result = dict(next(iter(results.values())))
    main_result["total_seconds"] = total
    main_result["machine"] = machine_text(device)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(main_result, f, indent=1)
    md = (estimates_markdown(results, total, machine_text(device)) if cfg["estimate_only"]
          else markdown(results, cfg, total, machine_text(device)))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    print(f"done in {total / 60:.1f} min: {out}/results.md, results.json")
    return main_result


if __name__ == "__main__":
    main()
