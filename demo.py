"""Fashion-MNIST in the wild: an honest end-to-end evaluation of attention-probe selection.

    python demo.py                         # default: mismatch pool, one seed, <= 20 min on 2 CPU cores
    python demo.py --pool far-ood          # 10-class teacher, held-out images + made images
    python demo.py --full --device cuda    # both pools (mismatch at relevant share 0.2 and 0.6), 2 seeds
    python demo.py --tiny                  # a few hundred images, 1 epoch: checks the plumbing (tests)

Protocol, fixed before any rule was scored: the teacher (train_teacher.py) learns its classes from
Fashion-MNIST train images [0, 30000); pools hold only held-out train images [30000, 60000) plus
made images; a manifest (source, true class) is read for evaluation only. Every rule selects the
same number of images (the number of in-domain images in the pool) through select_data's functions;
every student is trained by distill.main and tested on the official test images of the teacher's
classes. Writes <out>/results.json, results_<pool>.json, results.md and PNG pictures.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import time

# OpenMP threads that spin while waiting collapse on a shared 2-core machine (measured: 55 vs 202 img/s);
# sleeping waiters cost little when the machine is free. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import demo_pool as dp  # noqa: E402

RULES = ("random", "outlier", "probe", "outlier_balanced", "probe_balanced", "oracle", "energy")
RESULT_FIELDS = ("selection_precision", "student_acc1", "auroc", "classes_covered", "seconds")
FMNIST_MEAN, FMNIST_STD = 0.286, 0.353

PRESETS = {
    # CPU, 2 cores: small patch-7 ViTs (17 tokens), pool subsampled, few epochs
    "default": dict(pools=[("mismatch", None)], seeds=[0], teacher="deit_mini_patch7_28_teacher",
                    student="deit_mini_patch7_28", teacher_epochs=8, teacher_batch=64, teacher_lr=2e-3,
                    teacher_warmup=0,
                    pool_size=10000, student_epochs=25, student_samples=None, student_batch=64,
                    lr_S=2e-3, max_teacher_train=None, max_val=None, jobs=2),
    # GPU (one H100, sized by estimate): paper-size 28x28 models, whole held-out pools, 2 seeds
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


def get_args_parser():
    p = argparse.ArgumentParser("Attention Probe on Fashion-MNIST in the wild", allow_abbrev=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="both pools, relevant share 0.2 and 0.6, 2 seeds (GPU)")
    g.add_argument("--tiny", action="store_true", help="a few hundred images, 1 epoch (tests)")
    p.add_argument("--pool", choices=["mismatch", "far-ood"], default=None, help="pool kind (default mismatch)")
    p.add_argument("--relevant_share", type=float, default=None,
                   help="share of in-domain images in the pool (default 0.2 mismatch, 0.25 far-ood)")
    p.add_argument("--pool_size", type=int, default=None, help="pool images (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default: the preset's)")
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
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
    p.add_argument("--reuse", action="store_true", help="reuse a finished teacher of the same settings in --out")
    return p


# ------------------------------------------------------------------------------------------ set-up

def resolve_config(args):
    name = "full" if args.full else "tiny" if args.tiny else "default"
    cfg = dict(PRESETS[name], preset=name)
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
    cfg["rules"] = list(args.rules)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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

def get_teacher(cfg, fm, classes, out, device, reuse):
    """Export the teacher's ImageFolder tree and train it with train_teacher -> info dict."""
    import train_teacher
    tdir = os.path.join(out, f"teacher_{len(classes)}cls")
    stamp = {k: cfg[k] for k in ("teacher", "teacher_epochs", "teacher_batch", "teacher_lr", "teacher_warmup",
                                 "max_teacher_train", "max_val", "data")}
    stamp.update(classes=list(classes), device=str(device))
    ckpt = os.path.join(tdir, "teacher.pth")
    info_path = os.path.join(tdir, "teacher.json")
    if reuse and os.path.exists(info_path):
        info = json.load(open(info_path))
        if info.get("stamp") == stamp and os.path.exists(ckpt):
            print(f"teacher: reusing {ckpt} (test acc1 {info['acc1']:.2f})")
            return info
    t0 = time.time()
    os.makedirs(tdir, exist_ok=True)
    data_dir = os.path.join(tdir, "data")
    with quiet(os.path.join(tdir, "export.log")):
        sources = dp.export_teacher_data(data_dir, fm, classes, cfg["max_teacher_train"], cfg["max_val"])
    t_export = time.time() - t0
    argv = ["--dataset", "fashionmnist", "--data", data_dir, "--model", cfg["teacher"],
            "--nb_classes", str(len(classes)), "--output", ckpt, "--epochs", str(cfg["teacher_epochs"]),
            "--batch_size", str(cfg["teacher_batch"]), "--lr", str(cfg["teacher_lr"]), "--workers", "0",
            "--mean", str(FMNIST_MEAN), "--std", str(FMNIST_STD), "--device", str(device.type),
            "--warmup_epochs", str(cfg["teacher_warmup"]), "--label_smoothing", "0"]
    print(f"teacher: {cfg['teacher']} on {len(sources['train'])} train images of {len(classes)} classes, "
          f"{cfg['teacher_epochs']} epochs (log {tdir}/train.log)", flush=True)
    t1 = time.time()
    with quiet(os.path.join(tdir, "train.log")):
        stats = train_teacher.train_teacher(train_teacher.get_args_parser().parse_args(argv))
    info = {"checkpoint": ckpt, "data": data_dir, "classes": list(classes), "acc1": stats["acc1"],
            "train_images": len(sources["train"]), "val_images": len(sources["val"]),
            "export_seconds": t_export, "train_seconds": time.time() - t1, "stamp": stamp}
    json.dump(info, open(info_path, "w"), indent=1)
    print(f"teacher: test acc1 {stats['acc1']:.2f}% on {len(sources['val'])} test images "
          f"({info['train_seconds']:.0f}s)", flush=True)
    return info


# ------------------------------------------------------------------------------------------ scoring

def score_pool(cfg, teacher_info, pool_dir, num_select, device):
    """Score the pool once with select_data (probe + confidence), then one extra pass for the energy."""
    import pool as pool_mod
    import select_data
    from utils import amp_dtype
    scores_dir = os.path.join(pool_dir, "scores")
    argv = ["--data_imagenet", os.path.join(pool_dir, "pool", "images"), "--teacher", cfg["teacher"],
            "--teacher_dir", teacher_info["checkpoint"], "--num_select", str(num_select),
            "--selected_file", scores_dir, "--workers", str(cfg["workers"]), "--device", str(device.type)]
    sargs = select_data.get_args_parser().parse_args(argv)
    t = select_data.load_teacher(sargs, device)
    teacher, mean, std = t.model, t.mean, t.std
    amp = amp_dtype("auto", device)
    with quiet(os.path.join(pool_dir, "scoring.log")):
        select_data.run_selection(sargs, t, device)
    cache_dir = select_data.default_cache_dir(sargs, t)
    cache = pool_mod.open_cache(cache_dir)
    # energy = -logsumexp(logits): probs_out.npy holds softmax only, so a second (cheap) pass
    energy = torch.empty(cache.n)
    with torch.no_grad():
        for a in range(0, cache.n, 1024):
            x = data.normalize(cache.batch(np.arange(a, min(cache.n, a + 1024))).to(device), mean, std)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = teacher(x).float()
            energy[a:a + len(x)] = -torch.logsumexp(logits, dim=1).cpu()
    energy[torch.from_numpy(~cache.ok)] = float("inf")
    torch.save(energy, os.path.join(scores_dir, "energy.pth"))
    scores = select_data.load_scores(scores_dir, sargs.probe_blocks)
    scores["energy"] = energy
    return dict(scores_dir=scores_dir, cache_dir=cache_dir, scores=scores, teacher=teacher, mean=mean, std=std,
                blocks=sorted(sargs.probe_blocks), attnlier=sargs.attnlier, outlier=sargs.outlier, cache=cache)


def rule_value(rule, sc, relevant):
    """The score each rule ranks by (LOW = keep), or None for random."""
    import select_data
    s = sc["scores"]
    if rule == "random":
        return None
    if rule.startswith("outlier"):
        return select_data.combined_value(s, False)
    if rule.startswith("probe"):
        return select_data.combined_value(s, True, sc["attnlier"], sc["outlier"], sc["blocks"])
    if rule == "energy":
        return s["energy"].double()
    if rule == "oracle":
        return torch.from_numpy(~relevant).double()     # in-domain first: exactly the in-domain images
    raise ValueError(rule)


def select_rule(rule, value, usable, num_select, pred, per_class, seed):
    import select_data
    return select_data.select_indices(value, usable, num_select, pred,
                                      per_class if rule.endswith("_balanced") else None,
                                      random=rule == "random", seed=seed)


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
            "--resume", "no", "--log_every", "1000"]
    if rule == "random":
        argv += ["--random"]
    if rule.startswith("probe"):
        argv += ["--attnprobe_sel", "--attnprobe_dist"]
    if rule.endswith("_balanced"):
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


def run_students(jobs, n_parallel):
    if n_parallel <= 1:
        return [run_student(j) for j in jobs]
    import concurrent.futures as cf
    import multiprocessing as mp
    # spawn: fresh interpreters, no OpenMP state inherited from a forked parent
    with cf.ProcessPoolExecutor(n_parallel, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(run_student, [dict(j, threads=1) for j in jobs]))


# ------------------------------------------------------------------------------------------ one pool

def run_pool(cfg, kind, share, name, fm, teacher_info, out, device):
    t_pool = time.time()
    pool_dir = os.path.join(out, name)
    classes = teacher_info["classes"]
    print(f"\n== pool {name}: {kind}, relevant share {share:g}", flush=True)
    manifest = dp.build_pool(os.path.join(pool_dir, "pool"), kind, fm, classes, share, cfg["pool_size"])
    relevant = manifest["relevant"]
    # no teacher image is in the pool (by Fashion-MNIST train index)
    teacher_src = set(json.load(open(os.path.join(teacher_info["data"], "sources.json")))["train"])
    held = manifest["source_index"][manifest["source"] == "heldout"]
    overlap = len(teacher_src.intersection(held.tolist()))
    if overlap:
        raise RuntimeError(f"{overlap} pool images are teacher training images")
    num_select = int(relevant.sum())
    per_class = num_select // len(classes)
    t0 = time.time()
    sc = score_pool(cfg, teacher_info, pool_dir, num_select, device)
    import pool as pool_mod
    if pool_mod.list_pool(os.path.join(pool_dir, "pool", "images")).ids != manifest["id"].tolist():
        raise RuntimeError("pool order differs from the manifest order")
    score_seconds = time.time() - t0
    scores = sc["scores"]
    pred = scores["pred_out"].long()
    usable = torch.isfinite(scores["value_out"]) & (pred >= 0)
    true_teacher = np.array([classes.index(c) if c in classes else -1 for c in manifest["fmnist_label"]])
    epochs = cfg["student_epochs"] or max(1, round(cfg["student_samples"] / num_select))
    print(f"pool: {len(relevant)} images, {num_select} in-domain; every rule selects {num_select}; "
          f"scoring {score_seconds:.0f}s; students: {cfg['student']}, {epochs} epochs", flush=True)

    selections, jobs = {}, []
    for seed in cfg["seeds"]:
        for rule in cfg["rules"]:
            t1 = time.time()
            value = rule_value(rule, sc, relevant)
            chosen = select_rule(rule, value, usable, num_select, pred, per_class, seed)
            argv, sel_dir, run_dir = student_argv(cfg, rule, teacher_info, pool_dir, sc, num_select, per_class,
                                                  seed, epochs, device)
            if rule in ("oracle", "energy"):        # rules select_data does not know: hand distill the indices
                path = os.path.join(sel_dir, "precomputed_selection.pt")
                torch.save({"indices": chosen, "pred": pred[chosen], "rule": rule}, path)
                argv += ["--selection_file", path]
            selections[(rule, seed)] = dict(chosen=chosen, value=value, sel_dir=sel_dir,
                                            select_seconds=time.time() - t1)
            jobs.append(dict(argv=argv, run_dir=run_dir, rule=rule, seed=seed))
    print(f"training {len(jobs)} students ({cfg['jobs']} at a time)...", flush=True)
    outs = run_students(jobs, cfg["jobs"])

    res = {}
    for job, o in zip(jobs, outs):
        rule, seed = job["rule"], job["seed"]
        s = selections[(rule, seed)]
        if rule not in ("oracle", "energy"):      # distill re-selected from the scores: it must agree with us
            theirs = torch.load(os.path.join(s["sel_dir"], "selection.pt"), weights_only=True)["indices"]
            if not torch.equal(theirs, s["chosen"]):
                raise RuntimeError(f"{rule}: distill's selection differs from the demo's")
        idx = s["chosen"].numpy()
        counts = np.bincount(true_teacher[idx][relevant[idx]], minlength=len(classes))
        r = res.setdefault(rule, {"per_seed": []})
        r["per_seed"].append({"seed": seed, "selection_precision": float(relevant[idx].mean()),
                              "student_acc1": o["final"]["final_acc1"], "classes_covered": int((counts > 0).sum()),
                              "class_counts": counts.tolist(), "seconds": s["select_seconds"] + o["seconds"],
                              "student": o["final"]})
        print(f"  {rule:17s} seed {seed}: precision {relevant[idx].mean():.3f}, student acc1 "
              f"{o['final']['final_acc1']:.2f}, classes {int((counts > 0).sum())}/{len(classes)} "
              f"({o['seconds']:.0f}s)", flush=True)
    rng_score = np.random.default_rng(0).permutation(len(relevant)).astype(np.float64)
    ref = selections.get(("outlier", cfg["seeds"][0]))
    for rule, r in res.items():
        value = selections[(rule, cfg["seeds"][0])]["value"]
        if ref is not None:   # how much of DFND's selection a rule shares: tells selection from loss effects
            a, b = set(selections[(rule, cfg["seeds"][0])]["chosen"].tolist()), set(ref["chosen"].tolist())
            r["jaccard_with_outlier"] = len(a & b) / len(a | b)
        ps = r["per_seed"]
        r.update(selection_precision=float(np.mean([p["selection_precision"] for p in ps])),
                 student_acc1=float(np.mean([p["student_acc1"] for p in ps])),
                 student_acc1_per_seed=[p["student_acc1"] for p in ps],
                 auroc=dp.auroc(rng_score if value is None else value.numpy(), relevant),
                 classes_covered=int(min(p["classes_covered"] for p in ps)),
                 class_counts=ps[0]["class_counts"],
                 seconds=float(sum(p["seconds"] for p in ps)))
    images = sc["cache"].images[..., 0]
    s = scores
    diag = {"confidence (value_out)": dp.auroc(s["value_out"].numpy(), relevant),
            "attention probe alone (sum of value_blk)": dp.auroc(sum(s[f"value_blk{b}"] for b in sc["blocks"])
                                                                 .numpy(), relevant),
            **{f"value_blk{b}": dp.auroc(s[f"value_blk{b}"].numpy(), relevant) for b in sc["blocks"]},
            "combined probe score": res.get("probe", {}).get("auroc"),
            "energy": dp.auroc(s["energy"].numpy(), relevant),
            "pixel statistics (4 features, logistic regression)": dp.pixel_baseline_auroc(images, relevant)}
    per_source = {}
    for src in np.unique(manifest["source"]):
        m = manifest["source"] == src
        if src == "heldout":
            for rel, label in ((True, "heldout in-domain"), (False, "heldout irrelevant")):
                mm = m & (relevant == rel)
                if mm.any():
                    per_source[label] = _source_row(s, sc, mm, relevant)
        else:
            per_source[src] = _source_row(s, sc, m, relevant)
    pool_info = {"name": name, "kind": kind, "relevant_share": share, "size": int(len(relevant)),
                 "in_domain": num_select, "num_select": num_select, "per_class": per_class,
                 "sources": {k: int(v) for k, v in zip(*np.unique(manifest["source"], return_counts=True))},
                 "teacher_classes": [data.FASHION_CLASSES[c] for c in classes],
                 "overlap_with_teacher_train": overlap}
    result = {"preset": cfg["preset"], "data": cfg["data"], "teacher_acc1": teacher_info["acc1"],
              "teacher": cfg["teacher"], "student": cfg["student"], "student_epochs": epochs,
              "seeds": cfg["seeds"], "pool": pool_info, **{r: res[r] for r in cfg["rules"]},
              "auroc_diagnostics": diag, "per_source": per_source,
              "timing": {"scoring_seconds": score_seconds, "pool_seconds": time.time() - t_pool}}
    with quiet(os.path.join(pool_dir, "pictures.log")):
        result["pictures"] = draw_pictures(pool_dir, out, name, manifest, sc, selections, cfg)
    return result


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

PALETTE = {"in-domain": (40, 170, 70), "irrelevant": (210, 60, 50), "photo": (230, 140, 30),
           "glyph": (60, 110, 220), "shape": (170, 60, 190), "texture": (120, 120, 120),
           "heldout irrelevant": (210, 60, 50)}


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


def draw_histograms(path, panels, groups, bins=40):
    """panels: [(title, scores (N,), auroc)] -> one PNG with a density histogram per group, per panel."""
    from PIL import Image, ImageDraw
    W, H, pad = 420, 240, 34
    cols = 2
    rows = math.ceil(len(panels) / cols)
    img = Image.new("RGB", (cols * W, rows * H + 24), "white")
    d = ImageDraw.Draw(img)
    x = 8
    for name in groups:
        d.rectangle([x, 6, x + 12, 18], fill=PALETTE.get(name, (0, 0, 0)))
        d.text((x + 16, 6), name, fill="black")
        x += 24 + 7 * len(name)
    for k, (title, values, auc) in enumerate(panels):
        ox, oy = (k % cols) * W, 24 + (k // cols) * H
        v = np.asarray(values, np.float64)
        ok = np.isfinite(v)
        lo, hi = np.percentile(v[ok], [0.5, 99.5]) if ok.any() else (0, 1)
        hi = hi if hi > lo else lo + 1
        edges = np.linspace(lo, hi, bins + 1)
        hists = {n: np.histogram(np.clip(v[m & ok], lo, hi), edges, density=True)[0] for n, m in groups.items()}
        top = max(max(h.max() for h in hists.values()), 1e-9)
        x0, y0, x1, y1 = ox + pad, oy + 22, ox + W - 10, oy + H - 28
        d.rectangle([x0, y0, x1, y1], outline=(150, 150, 150))
        d.text((ox + pad, oy + 6), f"{title}   AUROC {auc:.3f}" if auc == auc else title, fill="black")
        for n, h in hists.items():
            pts = []
            for i, hv in enumerate(h):
                xa = x0 + (x1 - x0) * i / bins
                xb = x0 + (x1 - x0) * (i + 1) / bins
                yv = y1 - (y1 - y0) * hv / top
                pts += [(xa, yv), (xb, yv)]
            d.line(pts, fill=PALETTE.get(n, (0, 0, 0)), width=2)
        d.text((x0, y1 + 4), f"{lo:.5g}", fill="black")
        d.text((x1 - 50, y1 + 4), f"{hi:.5g}", fill="black")
        d.text(((x0 + x1) // 2 - 40, y1 + 14), "low = kept first", fill=(90, 90, 90))
    img.save(path)


def draw_grid(path, images, is_in, title, cols=16, scale=2):
    """Tiles with a green (in-domain) or red (other) frame, best first."""
    from PIL import Image, ImageDraw
    t = 28 * scale + 4
    rows = max(1, math.ceil(len(images) / cols))
    img = Image.new("RGB", (cols * t, rows * t + 16), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 2), title, fill="black")
    for k, (im, good) in enumerate(zip(images, is_in)):
        x, y = (k % cols) * t, 16 + (k // cols) * t
        d.rectangle([x, y, x + t - 1, y + t - 1], fill=PALETTE["in-domain" if good else "irrelevant"])
        tile = Image.fromarray(np.asarray(im, np.uint8)).resize((28 * scale, 28 * scale), Image.NEAREST)
        img.paste(tile.convert("RGB"), (x + 2, y + 2))
    img.save(path)


def _heat(gray, att, scale=4):
    """Grey image with the probe row (upsampled from the patch grid) blended in as red-yellow."""
    from PIL import Image
    g = np.asarray(gray, np.float64) / 255
    a = att - att.min()
    a = a / max(a.max(), 1e-12)
    rgb = np.stack([np.clip(2 * a, 0, 1), np.clip(2 * a - 1, 0, 1), np.zeros_like(a)], -1)
    mix = 0.55 * g[..., None] + 0.45 * rgb
    big = Image.fromarray((mix * 255).astype(np.uint8)).resize((28 * scale, 28 * scale), Image.NEAREST)
    return big


def draw_heatmaps(path, teacher, images, labels, mean, std, blocks, device, head=0, scale=4):
    """Rows: image | probe of each block (head `head` CLS row over patches, bilinear-upsampled)."""
    from PIL import Image, ImageDraw
    import torch.nn.functional as F
    from attention_probe import probe_forward, probe_uniformity
    x = data.normalize(torch.from_numpy(np.asarray(images))[:, None].to(device), mean, std)
    with torch.no_grad():
        out = probe_forward(teacher, x, probe_blocks=tuple(blocks), head=head)
    t = 28 * scale + 6
    img = Image.new("RGB", ((1 + len(blocks)) * t + 230, len(images) * t + 18), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 2), "image | " + " | ".join(f"probe block {b} (head {head})" for b in blocks)
           + "   (each map min-max scaled: dark = low, yellow = high attention)", fill="black")
    for i, (im, lab) in enumerate(zip(images, labels)):
        y = 18 + i * t
        img.paste(Image.fromarray(np.asarray(im, np.uint8)).resize((28 * scale, 28 * scale)).convert("RGB"),
                  (3, y))
        cos = []
        for j, b in enumerate(blocks):
            row = out.probes[b][i].float().cpu()
            g = int(round(math.sqrt(row.numel())))
            up = F.interpolate(row.view(1, 1, g, g), size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
            img.paste(_heat(im, up.numpy(), scale), (3 + (j + 1) * t, y))
            cos.append(f"blk{b} {float(probe_uniformity(row[None])):.3f}")
        d.text(((1 + len(blocks)) * t + 6, y + t // 2 - 12), lab, fill="black")
        d.text(((1 + len(blocks)) * t + 6, y + t // 2 + 2), "cos to uniform: " + ", ".join(cos), fill=(90, 90, 90))
    img.save(path)


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

def markdown(results, cfg, total_seconds, machine):
    lines = [f"# Attention Probe on Fashion-MNIST in the wild — preset `{cfg['preset']}`", "",
             f"Machine: {machine}. Total wall time: {total_seconds / 60:.1f} min. Data: {cfg['data']}.", ""]
    for name, r in results.items():
        p = r["pool"]
        lines += [f"## Pool `{name}`", "",
                  f"{p['size']} images ({', '.join(f'{k}: {v}' for k, v in p['sources'].items())}); "
                  f"{p['in_domain']} in-domain (relevant share {p['relevant_share']:g}); every rule keeps "
                  f"{p['num_select']}; balanced rules keep {p['per_class']} per predicted class first.",
                  f"Teacher `{r['teacher']}` ({len(p['teacher_classes'])} classes: "
                  f"{', '.join(p['teacher_classes'])}): test acc1 **{r['teacher_acc1']:.2f}%**. Students "
                  f"`{r['student']}`, {r['student_epochs']} epochs, seeds {r['seeds']}; acc1 = last epoch on the "
                  "official test images of the teacher's classes.", "",
                  "| rule | selection precision | AUROC of its score | teacher classes covered | Jaccard with outlier "
                  "| student acc1 (%) | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for rule in cfg["rules"]:
            x = r[rule]
            accs = ", ".join(f"{a:.2f}" for a in x["student_acc1_per_seed"])
            lines.append(f"| {rule} | {x['selection_precision']:.3f} | {x['auroc']:.3f} | "
                         f"{x['classes_covered']}/{len(p['teacher_classes'])} {x['class_counts']} | "
                         f"{x.get('jaccard_with_outlier', float('nan')):.3f} | "
                         f"{x['student_acc1']:.2f}" + (f" ({accs})" if len(x["student_acc1_per_seed"]) > 1 else "")
                         + f" | {x['seconds']:.0f} |")
        lines += ["", "AUROC (in-domain vs the rest, low score = in-domain):", "",
                  "| signal | AUROC |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in r["auroc_diagnostics"].items() if v is not None]
        lines += ["", "Per source: mean score, and AUROC of in-domain vs that source (>0.5: the signal ranks "
                  "in-domain images first):", "",
                  "| source | n | value_out | probe sum | combined | energy | AUROC value_out | AUROC probe sum "
                  "| AUROC combined | AUROC energy |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in r["per_source"].items():
            a = v.get("auroc", {})
            lines.append(f"| {k} | {v['n']} | {v['value_out']:.3f} | {v['probe_sum']:.4f} | {v['combined']:.3f} | "
                         f"{v['energy']:.3f} | " + " | ".join(f"{a[x]:.3f}" if x in a else "–" for x in
                                                           ("value_out", "probe_sum", "combined", "energy")) + " |")
        lines += ["", "Pictures: " + ", ".join(f"[{k}]({v})" for k, v in r["pictures"].items()), ""]
    lines += ["Notes: random's AUROC scores its random order (chance); balanced rules share the score (and AUROC) "
              "of their plain rule. `seconds` is each rule's own selection + distillation wall time"
              + (f" (summed over seeds); with {cfg['jobs']} students trained at once these overlap." if cfg["jobs"] > 1
                 else " (summed over seeds)."), ""]
    return "\n".join(lines)


def machine_text(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
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
    for kind, share in cfg["pools"]:
        classes = tuple(dp.MISMATCH_CLASSES) if kind == "mismatch" else tuple(range(10))
        if classes not in teachers:
            teachers[classes] = get_teacher(cfg, fm, classes, out, device, args.reuse)
        name = pool_name(kind, share, cfg)
        results[name] = run_pool(cfg, kind, share, name, fm, teachers[classes], out, device)
        results[name]["timing"]["teacher_seconds"] = teachers[classes]["train_seconds"]
        with open(os.path.join(out, f"results_{name}.json"), "w") as f:
            json.dump(results[name], f, indent=1)
    total = time.time() - t0
    main_result = dict(next(iter(results.values())))
    main_result["total_seconds"] = total
    main_result["machine"] = machine_text(device)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(main_result, f, indent=1)
    md = markdown(results, cfg, total, machine_text(device))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    print(f"done in {total / 60:.1f} min: {out}/results.md, results.json")
    return main_result


if __name__ == "__main__":
    main()
