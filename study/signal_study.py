"""Which signal of the one teacher pass finds the teacher's domain? The pre-registered study of
docs/signal_study.md: every stored signal and simple z-scored combinations, on every demo pool, per
source, over the teachers of seeds 0, 1, 2.

    python study/signal_study.py --teachers runs/demo3 runs/study --out runs/study     # ~15 min on 2 CPU cores
    python study/signal_study.py --out runs/study --train_missing                       # also trains missing teachers

Teachers are <folder>/teacher_<C>cls_seed<S>/teacher.pth as demo.py writes them (6 classes for the
mismatch pools, 10 for far-ood). Each pool and teacher is scored once by select_data.py (--flip_signal);
the rule is chosen on mismatch 0.2 with the seed-0 teacher only, the rest confirms. Writes
<out>/signal_study.json (everything) and <out>/signal_study.md (the tables of docs/signal_study.md).
"""
import argparse
import itertools
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as demo.py: spinning OpenMP waiters collapse on 2 shared cores
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[1:1] = [ROOT, os.path.join(ROOT, "demo")]  # runs as python study/signal_study.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

import demo  # noqa: E402
import demo_pool as dp  # noqa: E402
import scoring  # noqa: E402
import select_data  # noqa: E402
import selection  # noqa: E402
import signals  # noqa: E402

POOLS = (("mismatch-r0.2", "mismatch", 0.2), ("mismatch-r0.6", "mismatch", 0.6), ("far-ood", "far-ood", 0.25))
SELECTION_POOL, SELECTION_SEED = "mismatch-r0.2", 0
SIMPLER_WITHIN = 0.005          # a candidate with fewer terms this close to the best AUROC is preferred
BASE = ("value_out", "energy", "maxlogit", "feat_norm", "knn", "probe_pub")
NEEDS_FLIP = ("flip_kl", "flip_agree")


def get_args_parser():
    p = argparse.ArgumentParser("Selection signal study on the demo's pools", allow_abbrev=False)
    p.add_argument("--out", default="runs/study", help="pools, score folders and the report")
    p.add_argument("--teachers", nargs="+", default=None,
                   help="folders holding teacher_<C>cls_seed<S>/teacher.pth (default: --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="teacher seeds")
    p.add_argument("--pool_size", type=int, default=10000)
    p.add_argument("--fmnist", default=dp.FMNIST_DIR)
    p.add_argument("--train_missing", action="store_true", help="train missing teachers (demo.get_teacher)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p


# ---- pools, teachers, scores ----------------------------------------------------------------------

def find_teacher(folders, n_classes, seed):
    for folder in folders:
        path = os.path.join(folder, f"teacher_{n_classes}cls_seed{seed}", "teacher.pth")
        if os.path.exists(path) and os.path.exists(os.path.join(os.path.dirname(path), "teacher.json")):
            return path
    return None


def pool_classes(kind):
    return tuple(dp.MISMATCH_CLASSES) if kind == "mismatch" else tuple(range(10))


def get_pool(out, name, kind, share, fm, pool_size):
    pool_dir = os.path.join(out, "pools", name)
    if not os.path.exists(os.path.join(pool_dir, "manifest.csv")):
        dp.build_pool(pool_dir, kind, fm, pool_classes(kind), share, pool_size)
    return pool_dir, dp.read_manifest(pool_dir)


def score(pool_dir, teacher_path, out_dir, num_select):
    """One select_data pass (published files + every signal) -> dict of per-image tensors.

    Decodes in this process (--workers 0): a fork pool started from a process that already ran torch
    threads can hang in its children; 10,000 28-px PNGs decode in seconds anyway."""
    cfg = demo.PRESETS["default"]
    argv = ["--data_imagenet", os.path.join(pool_dir, "images"), "--teacher", cfg["teacher"],
            "--teacher_dir", teacher_path, "--num_select", str(num_select), "--selected_file", out_dir,
            "--cache_dir", os.path.join(pool_dir, "cache"), "--workers", "0", "--device", "cpu",
            "--store_signals", "--flip_signal", "--attnprobe_sel"]
    os.makedirs(out_dir, exist_ok=True)
    with demo.quiet(os.path.join(out_dir, "scoring.log")):
        select_data.main(select_data.get_args_parser().parse_args(argv))
    scores = scoring.load_scores(out_dir, [3, 7])
    scores.update(scoring.load_signals(out_dir, list(signals.SIGNALS)))
    return scores


# ---- metrics ----------------------------------------------------------------------------------------

def precision(value, usable, relevant):
    keep = selection.select_indices(value, usable, int(relevant.sum()))
    return float(relevant[keep.numpy()].mean())


def evaluate(value, usable, relevant, source):
    """AUROC, precision of the kept set, and per non-in-domain source the AUROC of in-domain vs it."""
    v = value.numpy()
    row = {"auroc": dp.auroc(v, relevant), "precision": precision(value, usable, relevant), "per_source": {}}
    for src in np.unique(source[~relevant]):
        both = relevant | (source == src)
        row["per_source"][str(src)] = dp.auroc(v[both], relevant[both])
    return row


def source_labels(manifest):
    src = manifest["source"].astype(object).copy()
    src[(manifest["source"] == "heldout") & ~manifest["relevant"]] = "other classes"
    return src.astype(str)


def rule_name(terms):
    return " + ".join(("" if s > 0 else "−") + c for c, s in terms)


# ---- the study --------------------------------------------------------------------------------------

def candidates(cols_sel, relevant_sel):
    """Signs and candidates, fixed on the selection pool (seed-0 teacher) as pre-registered."""
    signs = {c: (1 if dp.auroc(v.numpy(), relevant_sel) >= 0.5 else -1) for c, v in cols_sel.items()}

    def oriented(c):
        return dp.auroc((signs[c] * cols_sel[c]).numpy(), relevant_sel)
    best_norm = max((c for c in cols_sel if c.startswith(("cls_norm_b", "tok_norm_b"))), key=oriented)
    best_head = max((c for c in cols_sel if c.startswith("probe_b")), key=oriented)
    singles = [[(c, signs[c])] for c in cols_sel]
    base = [*BASE, best_norm, best_head]
    combos = [[(c, signs[c]) for c in combo] for r in (2, 3) for combo in itertools.combinations(base, r)]
    return signs, singles + combos, {"best_block_norm": best_norm, "best_probe_head": best_head}


def choose(results, cands):
    sel = results[SELECTION_POOL][SELECTION_SEED]
    eligible = [t for t in cands if not any(c in NEEDS_FLIP for c, _ in t)]
    best = max(eligible, key=lambda t: sel[rule_name(t)]["auroc"])
    top = sel[rule_name(best)]["auroc"]
    close = [t for t in eligible if sel[rule_name(t)]["auroc"] >= top - SIMPLER_WITHIN]
    fewest = min(len(t) for t in close)
    return max((t for t in close if len(t) == fewest), key=lambda t: sel[rule_name(t)]["auroc"])


def run(args):
    out = os.path.abspath(args.out)
    folders = [os.path.abspath(f) for f in (args.teachers or [out])]
    fm = dp.load_fashion_mnist(args.fmnist)
    torch.set_num_threads(max(1, args.threads))
    cols_all, meta = {}, {"teachers": {}, "seconds": {}}
    for name, kind, share in POOLS:
        pool_dir, manifest = get_pool(out, name, kind, share, fm, args.pool_size)
        relevant = manifest["relevant"]
        for seed in args.seeds:
            n_cls = len(pool_classes(kind))
            path = find_teacher(folders, n_cls, seed)
            if path is None and args.train_missing:
                cfg = dict(demo.PRESETS["default"], preset="default", data="Fashion-MNIST", data_root=args.fmnist)
                path = demo.get_teacher(cfg, fm, pool_classes(kind), out, torch.device("cpu"), True, seed)["checkpoint"]
            if path is None:
                print(f"{name} seed {seed}: no {n_cls}-class teacher in {folders}; skipped", flush=True)
                continue
            t0 = time.time()
            scores = score(pool_dir, path, os.path.join(out, "scores", f"{name}_seed{seed}"), int(relevant.sum()))
            meta["seconds"][f"{name}_seed{seed}"] = time.time() - t0
            info = json.load(open(os.path.join(os.path.dirname(path), "teacher.json")))
            meta["teachers"][f"{n_cls}cls_seed{seed}"] = {"checkpoint": path, "acc1": info.get("acc1")}
            usable = torch.isfinite(scores["value_out"]) & (scores["pred_out"] >= 0)
            cols = selection.columns(scores, (3, 7))
            cols["published"] = selection.combined_value(scores, True)
            cols_all.setdefault(name, {})[seed] = (cols, usable, relevant, source_labels(manifest))
            print(f"{name} seed {seed}: scored in {meta['seconds'][f'{name}_seed{seed}']:.0f}s", flush=True)
    if SELECTION_SEED not in cols_all.get(SELECTION_POOL, {}):
        raise SystemExit(f"error: the selection pool {SELECTION_POOL} needs the seed-{SELECTION_SEED} teacher")
    cols_sel, _, rel_sel, _ = cols_all[SELECTION_POOL][SELECTION_SEED]
    signs, cands, picked = candidates({c: v for c, v in cols_sel.items() if c != "published"}, rel_sel)
    results = {}
    for name, by_seed in cols_all.items():
        for seed, (cols, usable, relevant, source) in by_seed.items():
            r = results.setdefault(name, {}).setdefault(seed, {})
            r["published"] = evaluate(cols["published"], usable, relevant, source)
            for terms in cands:
                r[rule_name(terms)] = evaluate(selection.combine(cols, terms, usable), usable, relevant, source)
    chosen = choose(results, cands)
    report = {"protocol": "docs/signal_study.md (pre-registered)", "selection": [SELECTION_POOL, SELECTION_SEED],
              "signs": signs, **picked, "chosen": {"name": rule_name(chosen), "terms": chosen},
              "goals": goals(results, rule_name(chosen)), "posthoc": posthoc(results), "meta": meta,
              "results": {n: {str(s): r for s, r in by.items()} for n, by in results.items()}}
    with open(os.path.join(out, "signal_study.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report, results, cands, rule_name(chosen))
    with open(os.path.join(out, "signal_study.md"), "w") as f:
        f.write(md)
    print(md)
    return report


def posthoc(results):
    """NOT a choice (the protocol made it): how many candidates would have met the goals, and what choosing
    on all three seeds of the selection pool would have picked. Reported so the reader sees the whole field."""
    names = [n for n in results[SELECTION_POOL][SELECTION_SEED] if n != "published"]
    sel = results[SELECTION_POOL]
    rows = {n: goals(results, n) for n in names}
    meet1 = [n for n, g in rows.items() if g["auroc_goal_met"]]
    meet2 = [n for n, g in rows.items() if g["precision_goal_met"]]
    eligible = [n for n in names if not any(f in n for f in NEEDS_FLIP)]
    all_seeds = max(eligible, key=lambda n: np.mean([sel[s][n]["auroc"] for s in sel]))
    by_prec = sorted(meet1, key=lambda n: -np.mean(rows[n]["precision_mismatch_0.2"]))
    return {"candidates": len(names), "meet_auroc_goal": meet1, "meet_precision_goal": meet2,
            "meet_both": sorted(set(meet1) & set(meet2)), "auroc_goal_by_precision": by_prec,
            "chosen_on_all_selection_seeds": all_seeds, "that_rule_goals": rows[all_seeds]}


def goals(results, chosen):
    beats = {n: [s for s, r in by.items() if r[chosen]["auroc"] > r["published"]["auroc"]] for n, by in results.items()}
    prec = [r[chosen]["precision"] for r in results[SELECTION_POOL].values()]
    return {"auroc_beats_published_seeds": beats,
            "auroc_goal_met": all(len(v) >= min(2, len(results[n])) for n, v in beats.items()),
            "precision_mismatch_0.2": prec, "precision_goal_met": bool(prec) and min(prec) >= 0.75}


# ---- report -----------------------------------------------------------------------------------------

def _ms(values, fmt="{:.3f}"):
    values = [v for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(np.mean(values)) + " ± " + fmt.format(np.std(values, ddof=1))


def markdown(report, results, cands, chosen):
    pools = [n for n, _, _ in POOLS if n in results]
    sel = results[SELECTION_POOL][SELECTION_SEED]
    main = ["published", "value_out", "probe_pub", "energy", "maxlogit", "feat_norm", "knn", "flip_kl",
            "flip_agree", report["best_block_norm"], report["best_probe_head"]]
    main = [m if m == "published" or m in sel else rule_name([(m, report["signs"][m])]) for m in main]
    combos = sorted((rule_name(t) for t in cands if len(t) > 1), key=lambda n: -sel[n]["auroc"])[:8]
    rows = list(dict.fromkeys([*main, *combos, chosen]))
    seeds = {n: sorted(results[n]) for n in pools}
    head = "| rule (low = kept) | " + " | ".join(f"{n} AUROC | {n} precision" for n in pools) + " |"
    lines = [f"Mean ± sd over teacher seeds ({', '.join(f'{n}: {seeds[n]}' for n in pools)}). "
             f"Signs fixed on {SELECTION_POOL} seed {SELECTION_SEED}; − = high value kept. "
             f"Chosen rule: **{chosen}**.", "", head, "|---|" + "---|---|" * len(pools)]
    for name in rows:
        cells = []
        for n in pools:
            rs = [results[n][s].get(name) for s in seeds[n]]
            cells += [_ms([r["auroc"] for r in rs if r]), _ms([r["precision"] for r in rs if r])]
        label = f"**{name}**" if name == chosen else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Per teacher seed, chosen vs published (AUROC / precision):", "",
              "| pool | seed | published | chosen |", "|---|---|---|---|"]
    for n in pools:
        for s in seeds[n]:
            p, c = results[n][s]["published"], results[n][s][chosen]
            lines.append(f"| {n} | {s} | {p['auroc']:.3f} / {p['precision']:.3f} | "
                         f"{c['auroc']:.3f} / {c['precision']:.3f} |")
    lines += ["", "Per source (AUROC of in-domain vs that source, mean over seeds):", ""]
    for n in pools:
        srcs = sorted(results[n][seeds[n][0]]["published"]["per_source"])
        lines += [f"| {n} | " + " | ".join(srcs) + " |", "|---|" + "---|" * len(srcs)]
        singles = [rule_name([(c, report["signs"][c])]) for c in ("value_out", "feat_norm")]
        for name in dict.fromkeys(["published", *singles, chosen]):
            vals = [_ms([results[n][s][name]["per_source"][src] for s in seeds[n]]) for src in srcs]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        lines.append("")
    g = report["goals"]
    lines += [f"Goal 1 (AUROC beats published on every pool for ≥ 2 of 3 seeds): "
              f"{'met' if g['auroc_goal_met'] else 'NOT met'} — seeds where it beats: "
              + ", ".join(f"{n}: {v}" for n, v in g["auroc_beats_published_seeds"].items()),
              f"Goal 2 (precision on mismatch 0.2 ≥ 0.75): {'met' if g['precision_goal_met'] else 'NOT met'} — "
              + ", ".join(f"{p:.3f}" for p in g["precision_mismatch_0.2"])]
    ph = report["posthoc"]

    def line(n):
        g = results
        au = " / ".join(_ms([g[p][s][n]["auroc"] for s in seeds[p]]) for p in pools)
        pr = _ms([g[SELECTION_POOL][s][n]["precision"] for s in seeds[SELECTION_POOL]])
        return f"| {n} | {au} | {pr} |"
    lines += ["", "Post hoc (not a choice; the protocol's choice is above): "
              f"{len(ph['meet_auroc_goal'])} of {ph['candidates']} candidates meet goal 1, "
              f"{len(ph['meet_precision_goal'])} meet goal 2, {len(ph['meet_both'])} meet both. "
              f"Choosing on all three seeds of {SELECTION_POOL} would have picked "
              f"{ph['chosen_on_all_selection_seeds']} "
              f"(goal 1 {'met' if ph['that_rule_goals']['auroc_goal_met'] else 'not met'}, goal 2 "
              f"{'met' if ph['that_rule_goals']['precision_goal_met'] else 'not met'}). "
              "Candidates meeting goal 1, best precision on the selection pool first:", "",
              f"| rule | AUROC {' / '.join(pools)} | precision {SELECTION_POOL} |", "|---|---|---|"]
    lines += [line(n) for n in ph["auroc_goal_by_precision"][:8]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(get_args_parser().parse_args())
