"""Every picture the repository draws: a selection's report (report.py), a run's curves and the demo's
figures. Each function takes arrays and writes one PNG whole (a temp file renamed), so a kill never
leaves half a picture.

matplotlib draws through its Agg renderer on a `Figure` of its own, never pyplot: no display is needed
and no global state of a user's session (a notebook's backend) is touched. Tiles of images are laid out
by torchvision's make_grid.
"""
import io
import math
import os
import sys

import numpy as np
import torch

from safety import atomic_write_bytes, read_json_lines

KEPT, DROPPED, CUT = "#1b7837", "#c2510a", "#000000"
DPI = 100


def _figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=DPI)


def _finish(fig, path, title=None):
    """The figure's title, its panels laid out, saved."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})  # level 6 takes 3x longer
    atomic_write_bytes(os.fspath(path), buf.getvalue())


def histograms(path, panels, groups, cuts=None, density=False, bins=60, title=None, columns=2):
    """One histogram per panel, one outline per group, the cut as a vertical line.

    panels: [(title, values (N,))]; groups: {name: (mask (N,) bool, colour)}; cuts: {panel number: value}.
    The x range is the 0.5-99.5 % quantiles of the finite values (a few extreme scores would squash it);
    values beyond are counted in the end bins. -> {panel title: x of the cut line drawn on it}"""
    cuts = cuts or {}
    drawn = {}
    rows = math.ceil(len(panels) / columns)
    fig = _figure(5.2 * min(columns, len(panels)), 3.2 * rows + (0.4 if title else 0))
    for k, (name, values) in enumerate(panels):
        ax = fig.add_subplot(rows, min(columns, len(panels)), k + 1)
        v = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(v)
        lo, hi = np.quantile(v[finite], [0.005, 0.995]) if finite.any() else (0.0, 1.0)
        if k in cuts:
            lo, hi = min(lo, cuts[k]), max(hi, cuts[k])
        hi = hi if hi > lo else lo + 1
        edges = np.linspace(lo, hi, bins + 1)
        for group, (mask, colour) in groups.items():
            sel = np.clip(v[np.asarray(mask, dtype=bool) & finite], lo, hi)
            ax.hist(sel, edges, density=density, histtype="step", linewidth=1.6, color=colour,
                    label=f"{group} ({len(sel):,})")
        if k in cuts:
            line = ax.axvline(cuts[k], color=CUT, linestyle="--", linewidth=1.2, label=f"cut {cuts[k]:.4g}")
            drawn[name] = float(line.get_xdata()[0])
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("density" if density else "images", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
    _finish(fig, path, title)
    return drawn


def class_bars(path, kept, even_share, marked=(), names=None, title=None, max_labels=40):
    """Kept images per class against an even share; `marked` classes (collapsed) in the dropped colour.
    More than max_labels classes: bars sorted by count, no class labels (1,000 labels read as noise)."""
    kept = np.asarray(kept, dtype=np.int64)
    marked = set(int(c) for c in marked)
    many = len(kept) > max_labels
    order = np.argsort(-kept, kind="stable") if many else np.arange(len(kept))
    fig = _figure(min(14, max(6, 0.28 * len(kept))) if not many else 10, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    if many:   # one filled outline: a thousand bar patches take half a second to draw
        edges = np.arange(len(kept) + 1) - 0.5
        ax.stairs(kept[order], edges, fill=True, color=KEPT)
        if marked:
            ax.stairs(np.where(np.isin(order, list(marked)), kept[order], 0), edges, fill=True, color=DROPPED)
    else:
        ax.bar(np.arange(len(kept)), kept[order], width=0.8,
               color=[DROPPED if int(c) in marked else KEPT for c in order])
    ax.axhline(even_share, color=CUT, linestyle="--", linewidth=1.2, label=f"even share {even_share:.4g}")
    if many:
        ax.set_xlabel(f"{len(kept):,} predicted classes, sorted by kept images "
                      f"({int((kept == 0).sum()):,} with none)", fontsize=8)
    else:
        labels = [names[c] if names else str(c) for c in order]
        ax.set_xticks(np.arange(len(kept)), labels, rotation=90 if len(kept) > 12 else 0, fontsize=7)
        ax.set_xlabel("predicted class", fontsize=8)
    ax.set_ylabel("kept images", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlim(-0.6, len(kept) - 0.4)
    handles = ax.get_legend_handles_labels()[0]
    if marked:
        from matplotlib.patches import Patch
        handles.append(Patch(color=DROPPED, label="under a tenth of an even share"))
    ax.legend(handles=handles, fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    _finish(fig, path)


def _as_rgb_tiles(images, frames, pad):
    """uint8 (N,C,H,W) -> float (N,3,H+2pad,W+2pad) in [0, 1], each framed in its colour (None: white)."""
    x = torch.as_tensor(images).float().div(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    out = torch.ones(n, 3, h + 2 * pad, w + 2 * pad)
    for i, colour in enumerate(frames):
        if colour is not None:
            out[i] = torch.tensor(_rgb(colour)).view(3, 1, 1)
    out[:, :, pad:pad + h, pad:pad + w] = x
    return out


def _rgb(colour):
    from matplotlib.colors import to_rgb
    return to_rgb(colour)


def image_sheet(path, tiles, columns, captions=None, frames=None, row_labels=None, title=None, tile_inches=0.8):
    """Images on a grid, one make_grid per row, a band for the captions under each; an entry None in
    `tiles` leaves its place empty.

    tiles: list of uint8 (C,H,W) or None, read row by row; captions / frames: one per tile (a short text
    under it; a frame colour, None: none); row_labels: one text per row, at its left."""
    from torchvision.utils import make_grid
    n = len(tiles)
    rows = math.ceil(n / columns)
    shape = next(t.shape for t in tiles if t is not None)
    blank = torch.full(tuple(shape), 255, dtype=torch.uint8)
    stack = torch.stack([torch.as_tensor(t) if t is not None else blank for t in tiles])
    frames = [f if t is not None else None for f, t in zip(frames or [None] * n, tiles)]
    framed = _as_rgb_tiles(stack, frames, pad=max(2, shape[-1] // 12))      # (N, 3, h, w)
    framed = torch.cat([framed, torch.ones((rows * columns - n, *framed.shape[1:]))])
    cell = framed.shape[-1] + 2                                            # make_grid's padding 2
    band = int(math.ceil(cell * 0.22)) if captions else 0                  # caption room under a row
    strips = []
    for r in range(rows):
        strip = make_grid(framed[r * columns:(r + 1) * columns], nrow=columns, padding=2, pad_value=1.0)
        strips += [strip, torch.ones(3, band, strip.shape[2])]
    canvas = torch.cat(strips, dim=1).permute(1, 2, 0).numpy()              # (rows * (cell + band), W, 3)
    row_h = canvas.shape[0] / rows
    label_in = 1.5 if row_labels else 0.0
    title_in = 0.2 + 0.15 * title.count("\n") if title else 0.05
    image_w = columns * tile_inches
    image_h = image_w * canvas.shape[0] / canvas.shape[1]
    fig = _figure(label_in + image_w, title_in + image_h)
    ax = fig.add_axes((label_in / fig.get_figwidth(), 0, image_w / fig.get_figwidth(), image_h / fig.get_figheight()))
    ax.imshow(canvas, interpolation="antialiased", aspect="auto")   # nearest when enlarging, smoothed when shrinking
    ax.axis("off")
    for i, text in enumerate(captions or []):
        if text and tiles[i] is not None:
            r, c = divmod(i, columns)
            ax.text((c + 0.5) * cell, r * row_h + cell, text, ha="center", va="top", fontsize=6)
    for r, text in enumerate(row_labels or []):
        ax.text(-4, r * row_h + cell / 2, text, ha="right", va="center", fontsize=7)
    if title:
        fig.text(0.5, 1 - 0.04 / fig.get_figheight(), title, ha="center", va="top", fontsize=9)
    _save(fig, path)


def probe_heatmaps(path, images, maps, labels, blocks, title=None):
    """Rows: an image, then each probe block's CLS -> patch attention row over it (min-max scaled per map:
    dark = low, yellow = high), laid out as one image_sheet.

    images: uint8 (N,C,H,W); maps: {block: (N, g, g)} attention on the g x g patch grid; labels: N texts."""
    from matplotlib import colormaps
    import torch.nn.functional as F
    images = torch.as_tensor(images)
    h, w = images.shape[-2:]
    gray = images.float().mean(1, keepdim=True) / 255                          # (N, 1, H, W)
    tiles = []
    for i in range(len(images)):
        tiles.append(images[i] if images.shape[1] == 3 else images[i].expand(3, -1, -1))
        for b in blocks:
            a = torch.as_tensor(np.asarray(maps[b][i], dtype=np.float32))[None, None]
            a = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
            heat = torch.from_numpy(colormaps["inferno"](a.numpy())[..., :3]).permute(2, 0, 1).float()
            tiles.append((255 * (0.4 * gray[i] + 0.6 * heat)).round().to(torch.uint8))
    head = "image | " + " | ".join(f"probe block {b}" for b in blocks)
    image_sheet(path, tiles, 1 + len(blocks), row_labels=labels, title=f"{title}\n{head}" if title else head,
                tile_inches=1.1)


# ---- a run's curves --------------------------------------------------------------------------------

# (panel title, [(log key, legend)]): the keys a run's log.txt holds; missing ones are left out
CURVE_PANELS = [
    ("training losses", [("train_loss", "total"), ("train_kd", "KD"), ("train_na", "NA"), ("train_pd", "PD")]),
    ("test accuracy (%)", [("test_acc1", "acc1"), ("test_acc5", "acc5"), ("holdout_agreement", "holdout agreement")]),
    ("learning rate", [("train_lr", "lr")]),
    ("throughput (img/s)", [("train_img_per_s", "img/s")]),
]


def curves(log_path, png_path=None, title=None):
    """curves.png beside a log.txt (one JSON line per epoch): losses, test accuracy, lr, img/s by epoch.
    -> the path written, or None for a log with no epoch yet."""
    records = [r for r in read_json_lines(log_path) if "epoch" in r]
    if not records:
        return None
    png_path = png_path or os.path.join(os.path.dirname(os.path.abspath(log_path)),
                                        os.path.basename(log_path).replace("log.txt", "curves.png"))
    panels = [(name, [(k, legend) for k, legend in keys if any(k in r for r in records)])
              for name, keys in CURVE_PANELS]
    panels = [p for p in panels if p[1]]
    fig = _figure(4.2 * len(panels), 3.0)
    for k, (name, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for key, legend in keys:
            points = [(r["epoch"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=legend)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7, frameon=False)
    _finish(fig, png_path, title)
    return png_path


_curves_failed = set()


def redraw_curves(log_path):
    """curves() after an epoch; a failure is one warning per log, never the end of the run it draws."""
    try:
        curves(log_path)
    except Exception as e:
        if log_path not in _curves_failed:
            _curves_failed.add(log_path)
            print(f"warning: curves of {log_path} not drawn ({type(e).__name__}: {e})", file=sys.stderr)
