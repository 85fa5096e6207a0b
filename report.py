"""The selection report: what stage 1 kept, drawn from the stored scores into <--selected_file>/report/.

    report.md            pool size, kept, the cut, score quantiles, the estimated share of the teacher's domain
                         (pool_share.py) and what the demo measured there, per predicted class the pool and
                         kept counts (collapsed classes marked), skipped files, the command
    histograms.png       value_out, the probe sum, the combined score (and the --rule's score): kept and
                         dropped images in two colours, the cut marked
    classes.png          kept images per predicted class against an even share
    contact_sheet.png    for up to 20 predicted classes: the best kept, the last kept (the border) and the
                         first dropped images, each with its score
    probe_heatmaps.png   the probe blocks' CLS -> patch attention over a few kept and dropped images (drawn
                         when the teacher is at hand: select_data.py, DFND_DeiT-train.py)

select_data.run_selection draws it after every selection (--no_report skips it); tools/show_selection.py
redraws it from the stored scores for another --num_select / --per_class / --rule without a teacher pass.
"""
import os
import shlex
import sys
import time

import numpy as np
import torch

import data
import plots
import pool
import pool_share
import scoring
from attention_probe import probe_forward, probe_maps
from safety import atomic_write_text
from selection import class_collapse, combined_value, probe_sum, score_quantiles
from utils import read_fingerprint

SHEET_CLASSES = 20    # classes on the contact sheet (all of them up to this many)
SHEET_IMAGES = 4      # images in each of its three groups
HEATMAP_IMAGES = 4    # kept and dropped images each on the heat maps


def draw(s, ranking, indices, rule_text, num_classes, source, teacher=None, out_dir=None, command=None):
    """Write the report of the images `indices` chosen by settings `s` from the scores in s.selected_file.

    ranking: select_data.rank_pool's (arrays, value, usable, pred), the order the selection was made in;
    source: where the images are read from (a pool.PoolCache or pool.PoolIndex); teacher: for the probe heat
    maps (None: not drawn). -> {'folder', 'files': {name: path}, 'cut', 'cut_lines' (drawn), 'seconds'}"""
    t0 = time.time()
    out_dir = out_dir or os.path.join(s.selected_file, "report")
    os.makedirs(out_dir, exist_ok=True)
    meta = read_fingerprint(os.path.join(s.selected_file, scoring.META_FILE))   # None for published score files
    arrays, value, usable, pred = ranking
    n = len(value)
    indices = torch.as_tensor(indices).long()
    kept = torch.zeros(n, dtype=torch.bool)
    kept[indices] = True
    dropped = usable & ~kept
    value_out = arrays["value_out"].double()
    blocks = [b for b in s.probe_blocks if os.path.exists(scoring.score_file(s.selected_file, scoring.probe_key(b)))]
    panels = [("value_out = -log max softmax (low: confident)", value_out)]
    if blocks == list(s.probe_blocks):
        have = all(scoring.probe_key(b) in arrays for b in blocks)   # rank_pool read them for --attnprobe_sel
        probes = arrays if have else scoring.load_scores(s.selected_file, blocks)
        panels.append((f"probe: Σ cos(CLS row, uniform), blocks {', '.join(map(str, blocks))} (low: peaked)",
                       probe_sum(probes, blocks)))
        panels.append((f"combined = {s.attnlier:g}·probe + {s.outlier:g}·value_out",
                       combined_value(probes, True, s.attnlier, s.outlier, blocks)))
    if s.rule != "published":
        panels.append((f"--rule {s.rule} (low: kept first)", value))
    ranked_by = (len(panels) - 1 if s.rule != "published" or s.attnprobe_sel else 0)
    cut = None if s.random or s.per_class else float(value[indices].max())
    files = {}

    files["histograms"] = os.path.join(out_dir, "histograms.png")
    cut_lines = plots.histograms(files["histograms"], [(t, v.numpy()) for t, v in panels],
                     {"kept": (kept.numpy(), plots.KEPT), "dropped": (dropped.numpy(), plots.DROPPED)},
                     cuts={ranked_by: cut} if cut is not None else None,
                     title=f"{len(indices):,} kept of {int(usable.sum()):,} usable images: {rule_text}")

    kept_per_class = torch.bincount(pred[kept], minlength=num_classes)
    pool_per_class = torch.bincount(pred[usable], minlength=num_classes)
    collapsed = dict(class_collapse(pred[indices], num_classes))
    files["classes"] = os.path.join(out_dir, "classes.png")
    plots.class_bars(files["classes"], kept_per_class.numpy(), len(indices) / num_classes, marked=collapsed,
                     title=f"kept images per predicted class ({num_classes} classes)")

    sheet = _contact_sheet(value, usable, kept, pred, pool_per_class, kept_per_class, source, meta)
    if sheet is not None:
        files["contact_sheet"] = os.path.join(out_dir, "contact_sheet.png")
        plots.image_sheet(files["contact_sheet"], **sheet)

    if teacher is not None:
        files["probe_heatmaps"] = os.path.join(out_dir, "probe_heatmaps.png")
        _probe_heatmaps(files["probe_heatmaps"], teacher, s, value, usable, kept, source)

    skipped = pool.read_skipped(os.path.join(s.selected_file, "skipped.txt")) \
        if os.path.exists(os.path.join(s.selected_file, "skipped.txt")) else []
    # each class's cut: its largest kept score
    class_cut = torch.full((num_classes,), float("nan"), dtype=torch.float64).scatter_reduce(
        0, pred[indices], value[indices].double(), reduce="amax", include_self=False)
    page = _page(s, rule_text, n, usable, indices, value, cut, kept_per_class, pool_per_class, class_cut, collapsed,
                 skipped, files, command or " ".join(shlex.quote(a) for a in sys.argv),
                 pool_share.report_lines(value_out, usable))
    atomic_write_text(os.path.join(out_dir, "report.md"), page)
    print(f"report: {out_dir} ({len(files)} pictures and report.md, {time.time() - t0:.1f}s)")
    return {"folder": out_dir, "files": files, "cut_lines": cut_lines, "cut": cut, "seconds": time.time() - t0}


def _sheet_classes(pool_per_class):
    """All classes with pool images, or SHEET_CLASSES of them spread over the order by pool count."""
    present = torch.argsort(pool_per_class, descending=True, stable=True)[:int((pool_per_class > 0).sum())]
    if len(present) <= SHEET_CLASSES:
        return sorted(present.tolist())
    picks = np.linspace(0, len(present) - 1, SHEET_CLASSES).round().astype(int)
    return [int(present[i]) for i in picks]


def _contact_sheet(value, usable, kept, pred, pool_per_class, kept_per_class, source, meta):
    """image_sheet's arguments: a row per class, its best kept | last kept | first dropped images."""
    k, groups = SHEET_IMAGES, 3
    columns = groups * k + groups - 1              # an empty tile between the groups
    rows, labels = [], []
    for c in _sheet_classes(pool_per_class):
        members = (usable & (pred == c)).nonzero().squeeze(1)
        order = members[torch.argsort(value[members], stable=True)]      # best first
        kept_order, dropped_order = order[kept[order]], order[~kept[order]]
        best = kept_order[:k].tolist()
        last = kept_order[max(k, len(kept_order) - k):].tolist()
        rows.append([best, last, dropped_order[:k].tolist()])
        labels.append(f"class {c}: kept {int(kept_per_class[c]):,} of {int(pool_per_class[c]):,}")
    wanted = sorted({i for row in rows for group in row for i in group})
    if not wanted:
        return None
    size, in_chans = _display_geometry(source, meta)
    images = pool.load_selected_uint8(source, wanted, size, in_chans)
    at = {i: j for j, i in enumerate(wanted)}
    tiles, captions, frames = [], [], []
    for row in rows:
        for g, group in enumerate(row):
            for j in range(k):
                i = group[j] if j < len(group) else None
                tiles.append(images[at[i]] if i is not None else None)
                captions.append(f"{float(value[i]):.4g}" if i is not None else None)
                frames.append((plots.KEPT if kept[i] else plots.DROPPED) if i is not None else None)
            if g < groups - 1:
                tiles.append(None), captions.append(None), frames.append(None)
    return dict(tiles=tiles, columns=columns, captions=captions, frames=frames, row_labels=labels,
                title="best kept | last kept (the border) | first dropped, by the rule's score (low: kept first)")


def _display_geometry(source, meta):
    """The cache's own size; pool files decoded at the teacher's size, at most 96 px (a thumbnail)."""
    if isinstance(source, pool.PoolCache):
        return source.size, source.in_chans
    return min(int(meta.get("img_size", 64)) if meta else 64, 96), int(meta.get("in_chans", 3)) if meta else 3


@torch.no_grad()
def _probe_heatmaps(path, teacher, s, value, usable, kept, source):
    """The best kept and the last dropped images, the probe rows recomputed for these few only."""
    order = usable.nonzero().squeeze(1)
    order = order[torch.argsort(value[order], stable=True)]
    best = order[kept[order]][:HEATMAP_IMAGES].tolist()
    worst = order[~kept[order]].flip(0)[:HEATMAP_IMAGES].tolist()
    picks = best + worst
    images = pool.load_selected_uint8(source, picks, teacher.img_size, teacher.in_chans)
    x = data.normalize(images.to(teacher.device), teacher.mean, teacher.std)
    out = probe_forward(teacher.model, x, probe_blocks=tuple(s.probe_blocks), head=s.probe_head)
    maps = probe_maps(out, s.probe_blocks)
    labels = [f"kept {j + 1}\n{float(value[i]):.4g}" for j, i in enumerate(best)] + \
             [f"dropped, last {j + 1}\n{float(value[i]):.4g}" for j, i in enumerate(worst)]
    plots.probe_heatmaps(path, images, maps, labels, list(s.probe_blocks),
                         title=f"CLS -> patch attention of head {s.probe_head}: best kept and last dropped images")


def _page(s, rule_text, n, usable, indices, value, cut, kept_per_class, pool_per_class, class_cut, collapsed, skipped,
          files, command, domain_lines):
    q = score_quantiles(value, usable)
    kept_values = value[indices].float()
    cut_text = (f"{cut:.6g} (the largest kept score; lower scores are kept first)" if cut is not None else
                "none: random selection" if s.random else
                f"none overall: the best {s.per_class} of each predicted class first (each class's cut below)")
    lines = ["# Selection report", "",
             f"- pool: {n:,} images, {int(usable.sum()):,} usable, {len(skipped):,} skipped (unreadable)",
             f"- kept: {len(indices):,} by {rule_text}",
             f"- cut: {cut_text}",
             "- score quantiles over the usable pool (0/10/50/90/100 %): " + " / ".join(f"{v:.4g}" for v in q),
             f"- kept scores: {float(kept_values.min()):.4g} to {float(kept_values.max()):.4g}",
             f"- predicted classes with kept images: {int((kept_per_class > 0).sum())} of {len(kept_per_class)}"
             + (f"; {len(collapsed)} collapsed (kept under a tenth of an even share)" if collapsed else ""),
             *domain_lines,
             f"- scores: {s.selected_file}", f"- command: `{command}`", "",
             "Pictures: " + ", ".join(f"[{k}]({os.path.basename(p)})" for k, p in files.items()), "",
             "## Per predicted class", "", "| class | pool | kept | kept share | class cut |", "|---|---|---|---|---|"]
    for c in range(len(kept_per_class)):
        if not int(pool_per_class[c]):
            continue
        mark = " (collapsed)" if c in collapsed else ""
        cut_c = f"{float(class_cut[c]):.4g}" if int(kept_per_class[c]) else "-"
        lines.append(f"| {c}{mark} | {int(pool_per_class[c]):,} | {int(kept_per_class[c]):,} | "
                     f"{int(kept_per_class[c]) / max(1, len(indices)):.2%} | {cut_c} |")
    if skipped:
        lines += ["", f"## Skipped files ({len(skipped):,}; all in {os.path.join(s.selected_file, 'skipped.txt')})", ""]
        lines += [f"- `{i}`: {r}" for i, r in skipped[:20]]
    return "\n".join(lines) + "\n"
