"""Published decoding (full JPEG decode + Resize((s, s))) against --fast_decode (libjpeg's reduced-scale
decode first): pixel difference, overlap of the selections, decode speed on one core.

    python tools/decode_compare.py --images 2000 --json decode.json

Generates photo-like JPEGs of several sizes (benchmark.make_jpegs), decodes them both ways at --size,
scores both with the same teacher (a RANDOM-INIT deit_tiny_patch4_32_teacher unless --teacher_dir
is given) and selects --share of the pool by the attention-probe rule (--attnprobe_sel).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmark")]
import benchmark  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import pool  # noqa: E402
import scoring  # noqa: E402
from selection import combined_value, select_indices  # noqa: E402

SIZES = ((500, 375), (375, 500), (640, 480), (333, 500), (800, 600), (64, 64), (250, 188))


def decode_all(blobs, size, fast):
    """-> (uint8 (N, size, size, 3), seconds of decoding alone)."""
    out = np.empty((len(blobs), size, size, 3), np.uint8)
    t0 = time.perf_counter()
    for i, b in enumerate(blobs):
        out[i] = pool.decode_image(b, size, 3, fast_decode=fast)
    return out, time.perf_counter() - t0


def best_rates(blobs, size, reps):
    """img/s of each decoding on one core: the best of `reps` interleaved passes (shared CPUs are noisy)."""
    best = {False: 0.0, True: 0.0}
    for _ in range(reps):
        for fast in (False, True):
            best[fast] = max(best[fast], len(blobs) / decode_all(blobs, size, fast)[1])
    return best[False], best[True]


def selection(teacher, images, num_select, mean, std, batch=256):
    blocks = (3, 7)
    parts = [scoring.score_images(teacher, torch.from_numpy(images[a:a + batch]).permute(0, 3, 1, 2), mean, std,
                                  blocks, 0) for a in range(0, len(images), batch)]
    scores = {k: torch.cat([p[k] for p in parts]) for k in ("value_out", "value_blk3", "value_blk7")}
    value = combined_value(scores, True, 0.05, 0.9, blocks)
    return set(select_indices(value, torch.ones(len(value), dtype=torch.bool), num_select).tolist())


def main(args):
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="ap-decode-")
    try:
        kb = benchmark.make_jpegs(tmp, args.images, seed=args.seed, distinct=args.images, sizes=SIZES)
        names = sorted(os.listdir(tmp))
        blobs = [open(os.path.join(tmp, n), "rb").read() for n in names]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    published, fast = decode_all(blobs, args.size, False)[0], decode_all(blobs, args.size, True)[0]
    rate_pub, rate_fast = best_rates(blobs[:args.speed_images], args.size, args.reps)
    diff = np.abs(published.astype(np.int16) - fast.astype(np.int16))
    torch.manual_seed(args.seed)
    teacher = models.create("deit_tiny_patch4_32_teacher", 100).eval()
    if args.teacher_dir:
        teacher, _ = models.load_teacher("deit_tiny_patch4_32_teacher", 100, args.teacher_dir)
    mean, std = data.resolve_mean_std(None, None, 3)
    k = int(round(args.share * len(blobs)))
    a, b = selection(teacher, published, k, mean, std), selection(teacher, fast, k, mean, std)
    res = {"images": len(blobs), "sizes": [f"{w}x{h}" for w, h in SIZES], "mean_jpeg_kb": round(kb / 1024, 1),
           "size": args.size, "mean_abs_pixel_diff": float(diff.mean()), "max_abs_pixel_diff": int(diff.max()),
           "share_pixels_differing": float((diff > 0).mean()), "num_select": k,
           "teacher": args.teacher_dir or f"random-init deit_tiny_patch4_32_teacher, seed {args.seed}",
           "jaccard": len(a & b) / len(a | b), "published_img_per_s": rate_pub, "fast_img_per_s": rate_fast,
           "speed": f"best of {args.reps} interleaved passes over {min(len(blobs), args.speed_images)} images, 1 thread"}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--share", type=float, default=0.25, help="selected share of the pool (default 0.25)")
    p.add_argument("--teacher_dir", default=None, help="a deit_tiny_patch4_32_teacher checkpoint (100 classes)")
    p.add_argument("--speed_images", type=int, default=350, help="images per timed pass (default 350: all sizes)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    main(p.parse_args())
