"""Fashion-MNIST "in the wild" pools for demo.py: teacher data, wild pools with a manifest, made images,
AUROC and the pixel-statistics baseline.

Split (fixed before any rule is scored): the teacher sees Fashion-MNIST train images [0, split) of its
classes; pools draw only on the held-out train images [split, 2·split) (split = 30,000 for the real
data) plus made images. The manifest (source, source index, true class) is for evaluation only:
selection and training read the pool folder, never the manifest.
"""
import csv
import gzip
import json
import os
import shutil
import struct

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import data

MISMATCH_CLASSES = (0, 1, 2, 3, 4, 6)          # T-shirt/top, Trouser, Pullover, Dress, Coat, Shirt
MADE_SOURCES = ("photo", "glyph", "shape", "texture")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------------------------------- data

def write_fake_idx(root, n_train=1200, n_test=300, seed=0):
    """Fashion-MNIST-shaped IDX .gz files with learnable made classes (for CI without the package)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.stack([_fake_item(int(c), rng) for c in labels])
        for name, arr, ndim in ((f"{prefix}-images-idx3-ubyte.gz", images, 3),
                                (f"{prefix}-labels-idx1-ubyte.gz", labels, 1)):
            header = struct.pack(">BBBB", 0, 0, 8, ndim) + struct.pack(f">{ndim}I", *arr.shape)
            with gzip.open(os.path.join(root, name), "wb") as f:
                f.write(header + arr.tobytes())
    return root


def _fake_item(c, rng):
    # one bright box per class, its shape set by the class, plus noise: learnable but not trivial
    img = Image.new("L", (28, 28), 0)
    d = ImageDraw.Draw(img)
    w, h = 6 + 2 * (c % 5), 8 + 3 * (c // 5) + int(rng.integers(0, 3))
    x0, y0 = 14 - w // 2 + int(rng.integers(-1, 2)), 14 - h // 2 + int(rng.integers(-1, 2))
    d.rectangle([x0, y0, x0 + w, y0 + h], fill=int(rng.integers(120, 250)))
    if c % 2:
        d.line([x0, y0, x0 + w, y0 + h], fill=0, width=2)
    a = np.asarray(img, np.int16) + rng.integers(-20, 21, (28, 28)) * (np.asarray(img) > 0)
    return np.clip(a, 0, 255).astype(np.uint8)


def load_fashion_mnist(root):
    """-> (train_x (N,28,28) uint8, train_y, test_x, test_y) from IDX files (raw or .gz)."""
    tx, ty = data.read_idx(root, True)
    vx, vy = data.read_idx(root, False)
    return tx[..., 0], ty, vx[..., 0], vy


def teacher_split(n_train):
    """Train images [0, split) may teach the teacher; [split, 2·split) feed the pools (30,000 on real data)."""
    return min(30000, n_train // 2)


# ---------------------------------------------------------------------------------------- teacher data

def export_teacher_data(root, fm, classes, max_train=None, max_val=None, seed=0):
    """ImageFolder tree root/{train,val}/<NN_name>/ of the teacher's classes, labels 0..len(classes)-1.

    train: train images [0, split) of those classes; val: official test images of those classes.
    Writes root/sources.json with the source indices (for the overlap check). Returns that dict.
    """
    train_x, train_y, test_x, test_y = fm
    split = teacher_split(len(train_x))
    rng = np.random.default_rng(seed)
    remap = {c: i for i, c in enumerate(classes)}
    names = [data.FASHION_CLASSES[c] for c in classes]
    sources = {"split": split, "classes": list(classes)}
    if os.path.exists(root):
        shutil.rmtree(root)
    for part, x, y, lo, hi, cap in (("train", train_x, train_y, 0, split, max_train),
                                    ("val", test_x, test_y, 0, len(test_x), max_val)):
        idx = np.arange(lo, hi)[np.isin(y[lo:hi], classes)]
        if cap is not None and len(idx) > cap:
            idx = np.sort(rng.choice(idx, cap, replace=False))
        labels = np.array([remap[int(c)] for c in y[idx]], np.int64)
        data.export_image_folder(x[idx][..., None], labels, names, os.path.join(root, part),
                                 desc=f"teacher {part}")
        sources[part] = idx.tolist()    # file NNNNN.png of this split <-> source index sources[part][N]
    with open(os.path.join(root, "sources.json"), "w") as f:
        json.dump(sources, f)
    return sources


# ---------------------------------------------------------------------------------------- made images

def _smooth_noise(rng, size, scales=((3, 1.0), (7, 0.5), (14, 0.25))):
    """Photo-like grey field: bicubic-upsampled random grids at a few scales, in [0, 1]."""
    acc = np.zeros((size, size))
    for s, w in scales:
        g = Image.fromarray((rng.random((s, s)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        acc += w * np.asarray(g, np.float64) / 255
    acc -= acc.min()
    return acc / max(acc.max(), 1e-6)


def _blob_mask(rng, size=28):
    """Soft object mask centred like a Fashion-MNIST item: a rotated superellipse or a noise blob."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    if rng.random() < 0.6:
        a, b = rng.uniform(6, 13), rng.uniform(8, 13.5)
        t = rng.uniform(-0.5, 0.5)
        u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
        p = rng.uniform(1.5, 5)
        r = (np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1 / p)
        m = np.clip((1.0 - r) * 4 + 0.5, 0, 1)
    else:
        field = _smooth_noise(rng, size, ((4, 1.0), (8, 0.4)))
        centre = np.clip(1 - np.hypot(xx, yy) / rng.uniform(11, 15), 0, 1)
        m = np.clip((field * 0.8 + centre - 0.75) * 6, 0, 1)
    return m


def make_photo(rng):
    """Masked crop of a procedural 'photo': multi-scale smooth noise, a lighting gradient, grain."""
    size = 28
    img = _smooth_noise(rng, size)
    g = np.linspace(-1, 1, size)
    t = rng.uniform(0, 2 * np.pi)
    img = 0.7 * img + 0.3 * (0.5 + 0.5 * (np.cos(t) * g[None, :] + np.sin(t) * g[:, None]) / 1.5)
    img += rng.normal(0, 0.04, img.shape)
    lo, hi = rng.uniform(0.1, 0.45), rng.uniform(0.65, 1.0)
    img = lo + (hi - lo) * np.clip(img, 0, 1)
    return np.clip(img * _blob_mask(rng) * 255, 0, 255).astype(np.uint8)


_GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnpqrstuwxyz0123456789&%@#$?"


def make_glyph(rng):
    """A centred bright character (PIL's default font) or a few drawn strokes, drawn at 2x, downsampled."""
    big = 56
    img = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(img)
    fill = int(rng.integers(150, 256))
    if rng.random() < 0.75:
        font = ImageFont.load_default(size=int(rng.integers(40, 62)))
        ch = _GLYPHS[int(rng.integers(len(_GLYPHS)))]
        x0, y0, x1, y1 = d.textbbox((0, 0), ch, font=font, stroke_width=int(rng.integers(0, 4)))
        sw = int(rng.integers(0, 4))
        d.text(((big - (x1 - x0)) / 2 - x0, (big - (y1 - y0)) / 2 - y0), ch, font=font, fill=fill,
               stroke_width=sw, stroke_fill=fill)
    else:
        pts = [tuple(rng.uniform(8, big - 8, 2)) for _ in range(int(rng.integers(3, 7)))]
        d.line(pts, fill=fill, width=int(rng.integers(4, 11)), joint="curve")
    return np.asarray(img.resize((28, 28), Image.BILINEAR, reducing_gap=None), np.uint8).copy()


def make_shape(rng):
    """A filled ellipse, box, triangle, star or polygon, centred, with a mild shading gradient."""
    big = 56
    img = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(img)
    fill = int(rng.integers(90, 256))
    w, h = rng.uniform(24, 52), rng.uniform(24, 52)
    box = [(big - w) / 2, (big - h) / 2, (big + w) / 2, (big + h) / 2]
    kind = int(rng.integers(5))
    if kind == 0:
        d.ellipse(box, fill=fill)
    elif kind == 1:
        d.rounded_rectangle(box, radius=float(rng.uniform(0, 10)), fill=fill)
    elif kind == 2:
        d.polygon([(big / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    else:
        n = int(rng.integers(5, 9))
        ang = np.linspace(0, 2 * np.pi, 2 * n if kind == 3 else n, endpoint=False) + rng.uniform(0, np.pi)
        rad = np.where(np.arange(len(ang)) % 2, 0.45, 1.0) if kind == 3 else rng.uniform(0.7, 1.0, len(ang))
        d.polygon([(big / 2 + rad[i] * w / 2 * np.cos(a), big / 2 + rad[i] * h / 2 * np.sin(a))
                   for i, a in enumerate(ang)], fill=fill)
    if rng.random() < 0.5:
        d.line([(box[0], big / 2), (box[2], big / 2)], fill=int(fill * rng.uniform(0.3, 0.8)),
               width=int(rng.integers(2, 6)))
    a = np.asarray(img.resize((28, 28), Image.BILINEAR, reducing_gap=None), np.float64)
    shade = 1 - rng.uniform(0, 0.4) * np.linspace(0, 1, 28)[:, None]
    return np.clip(a * shade, 0, 255).astype(np.uint8)


def make_texture(rng):
    """A periodic texture (stripes, checks, dots, waves) inside a garment-sized soft mask."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    f = rng.uniform(0.4, 1.6)
    t = rng.uniform(0, np.pi)
    u = xx * np.cos(t) + yy * np.sin(t)
    kind = int(rng.integers(4))
    if kind == 0:
        pat = 0.5 + 0.5 * np.sign(np.sin(u * f))
    elif kind == 1:
        pat = ((np.floor(xx * f / 2) + np.floor(yy * f / 2)) % 2).astype(float)
    elif kind == 2:
        pat = (np.sin(xx * f) * np.sin(yy * f) > 0.3).astype(float)
    else:
        pat = 0.5 + 0.5 * np.sin(u * f + 2 * np.sin(yy * 0.3))
    lo, hi = rng.uniform(0.05, 0.4), rng.uniform(0.6, 1.0)
    return np.clip((lo + (hi - lo) * pat) * _blob_mask(rng) * 255, 0, 255).astype(np.uint8)


MAKERS = {"photo": make_photo, "glyph": make_glyph, "shape": make_shape, "texture": make_texture}


def make_images(source, n, seed):
    rng = np.random.default_rng(seed)
    maker = MAKERS[source]
    return np.stack([maker(rng) for _ in range(n)]) if n else np.zeros((0, 28, 28), np.uint8)


# ---------------------------------------------------------------------------------------- pools

def pool_plan(kind, fm, teacher_classes, relevant_share, pool_size, seed=0):
    """Choose the pool's images -> list of (source, source_index, fmnist_label) and the images, unshuffled.

    mismatch: held-out images of all 10 classes; the teacher's classes are 'relevant' and subsampled so
    they are `relevant_share` of the pool. far-ood: held-out images (relevant_share of the pool, 0.25 by
    default) + made images split evenly over MADE_SOURCES.
    """
    train_x, train_y = fm[0], fm[1]
    split = teacher_split(len(train_x))
    rng = np.random.default_rng(seed)
    held = np.arange(split, min(2 * split, len(train_x)))
    rel = held[np.isin(train_y[held], teacher_classes)]
    rows, images = [], []
    if kind == "mismatch":
        irr = held[~np.isin(train_y[held], teacher_classes)]
        total = min(pool_size or 10 ** 9, len(irr) / (1 - relevant_share), len(rel) / relevant_share)
        n_rel, n_irr = int(round(total * relevant_share)), int(round(total * (1 - relevant_share)))
        for src, cand, n in (("heldout", rel, n_rel), ("heldout", irr, n_irr)):
            pick = np.sort(rng.choice(cand, n, replace=False))
            rows += [(src, int(i), int(train_y[i])) for i in pick]
            images.append(train_x[pick])
    elif kind == "far-ood":
        total = min(pool_size or 10 ** 9, len(rel) / relevant_share)
        n_rel = int(round(total * relevant_share))
        pick = np.sort(rng.choice(rel, n_rel, replace=False))
        rows += [("heldout", int(i), int(train_y[i])) for i in pick]
        images.append(train_x[pick])
        n_made = int(round(total)) - n_rel
        for k, src in enumerate(MADE_SOURCES):
            n = n_made // len(MADE_SOURCES) + (k < n_made % len(MADE_SOURCES))
            images.append(make_images(src, n, seed * 1000 + 17 + k))
            rows += [(src, j, -1) for j in range(n)]
    else:
        raise ValueError(f"unknown pool kind '{kind}' (mismatch or far-ood)")
    return rows, np.concatenate(images)


def build_pool(pool_dir, kind, fm, teacher_classes, relevant_share, pool_size, seed=0):
    """Write the pool as <pool_dir>/images/NNNNNN.png in a shuffled order and <pool_dir>/manifest.csv.

    Pool order (sorted file names) == manifest row order. Returns the manifest (dict of numpy arrays).
    """
    rows, images = pool_plan(kind, fm, teacher_classes, relevant_share, pool_size, seed)
    order = np.random.default_rng(seed + 1).permutation(len(rows))
    img_dir = os.path.join(pool_dir, "images")
    if os.path.exists(pool_dir):
        shutil.rmtree(pool_dir)
    os.makedirs(img_dir)
    width = max(6, len(str(len(rows))))
    ids = []
    for pos, k in enumerate(order):
        name = f"{pos:0{width}d}.png"
        Image.fromarray(images[k]).save(os.path.join(img_dir, name), compress_level=1)
        ids.append(name)
    with open(os.path.join(pool_dir, "manifest.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "source", "source_index", "fmnist_label", "relevant"])
        for name, k in zip(ids, order):
            src, si, lab = rows[k]
            w.writerow([name, src, si, lab, int(src == "heldout" and lab in teacher_classes)])
    return read_manifest(pool_dir)


def read_manifest(pool_dir):
    """-> dict of arrays: id, source, source_index, fmnist_label, relevant (bool); row i = pool index i."""
    with open(os.path.join(pool_dir, "manifest.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    return {"id": np.array([r["id"] for r in rows]), "source": np.array([r["source"] for r in rows]),
            "source_index": np.array([int(r["source_index"]) for r in rows], np.int64),
            "fmnist_label": np.array([int(r["fmnist_label"]) for r in rows], np.int64),
            "relevant": np.array([r["relevant"] == "1" for r in rows], bool)}


# ---------------------------------------------------------------------------------------- metrics

def auroc(score, positive):
    """Area under the ROC curve for 'a LOW score means positive' (ties count half); nan if one class is empty."""
    s, pos = np.asarray(score, np.float64), np.asarray(positive, bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    s = np.where(np.isfinite(s), s, np.inf)
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = (np.cumsum(cnt) - (cnt - 1) / 2.0)[inv]        # 1-based average ranks, ascending score
    u_high = avg_rank[pos].sum() - n1 * (n1 + 1) / 2.0         # pairs where the positive scores higher
    return float(1.0 - u_high / (n1 * n0))


def pixel_features(images):
    """4 pixel statistics per image (N,28,28) uint8: mean, std, fraction non-zero, edge energy."""
    x = np.asarray(images, np.float64) / 255.0
    dx, dy = np.diff(x, axis=2), np.diff(x, axis=1)
    edge = (dx ** 2).mean(axis=(1, 2)) + (dy ** 2).mean(axis=(1, 2))
    return np.stack([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), (x > 0).mean(axis=(1, 2)), edge], 1)


def pixel_baseline_auroc(images, positive, seed=0, steps=500):
    """Logistic regression on pixel_features, fit on a random half, AUROC on the other half."""
    feats, y = pixel_features(images), np.asarray(positive, np.float64)
    perm = np.random.default_rng(seed).permutation(len(y))
    fit, test = perm[:len(y) // 2], perm[len(y) // 2:]
    mu, sd = feats[fit].mean(0), feats[fit].std(0) + 1e-9
    z = np.concatenate([(feats - mu) / sd, np.ones((len(y), 1))], 1)
    w = np.zeros(z.shape[1])
    for _ in range(steps):                      # Newton steps converge in a few; steps caps bad cases
        p = 1 / (1 + np.exp(-z[fit] @ w))
        g = z[fit].T @ (p - y[fit])
        h = (z[fit] * (p * (1 - p))[:, None]).T @ z[fit] + 1e-6 * np.eye(len(w))
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return auroc(-(z[test] @ w), y[test] > 0.5)
