"""Throughput of our fast paths against a faithful re-enactment of the published algorithm (reference.py).

    python benchmark/benchmark.py --json bench.json                          # GPU: batch 1024 scoring, 256 / 1024 training
    python benchmark/benchmark.py --compile --cuda_graphs --json bench.json  # + torch.compile and CUDA-graph variants
    python benchmark/benchmark.py --quick --json /tmp/bench.json             # CPU smoke run: < 2 minutes on 2 cores
    python benchmark/benchmark.py --sections c                               # only the JPEG -> uint8 cache build
    python benchmark/benchmark.py --sections d e f --compile --json b224.json   # GPU: the 224-px scripts
    python benchmark/benchmark.py --sections d e f --tiny --device cpu       # 224-px plumbing, width-32 models

One run, one device. Sections (each fails alone, as an error row):
  (a) scoring the wild pool: scoring.score_images (one pass, bf16 on CUDA) vs the published
      identify_attnlier + identify_outlier (fp32, two teacher passes, per-image qkv weight copies,
      all heads' full attention matrices);
  (b) one distillation step: distill.distill_step in engine.TrainEpoch with the real modules, on-device
      crop+flip of uint8 batches, bf16, fused AdamW vs the published step (fp32, hooks for
      features, foreach AdamW, Python-loop noise matrix, full Gram matrices, two host syncs a step);
  (c) building the 32-px uint8 cache from ImageNet-sized JPEGs vs the published per-epoch full decode;
then the peak memory of each and an end-to-end estimate of a CIFAR-100 reproduction. At 224 px (asked for
with --sections; run in the order f, d, e), for training_tinyimagenet.sh and training_imagenet.sh:
  (d) scoring with deit_small_patch16_224 and deit_base_patch16_224 (ours bf16, + torch.compile) vs the published;
  (e) the KD + NA + PD step of each teacher -> deit_tiny_patch16_224 at batch 256, ours vs the published (with its
      NA loop, and with a tensor NA: the loop's cost grows as classes^3);
  (f) the JPEG loader at 224 px (no cache above 64 px: every epoch decodes) on generated photo-size JPEGs:
      ours (PoolDataset, DataLoader workers, default decoding and --fast_decode) vs the published transforms;
then an end-to-end estimate of each script from these rates, each step bound by the GPU or the decoding.
Random weights and inputs: compute only. A lean prototype of the same steps gave on one H200 (torch 2.11):
scoring 6,550 vs 66,400 img/s (96,300 compiled); step at batch 256 4,350-4,880 vs 21,400 img/s
(compiled + CUDA graphs). --quick numbers on a CPU only show that everything runs.
"""
import argparse
import gc
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from types import SimpleNamespace

import numpy as np
import timm
import torch

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the pipeline modules at the root
import data  # noqa: E402
import distill
import engine
import models
import pool
import published
import scoring
from attention_probe import FEATURE_BLOCKS, PROBE_BLOCKS
from losses import LossConfig, NoiseAdaptation
from reference import PATCHATTN, PublishedNoise, PublishedScorer, PublishedView, published_step_loss
from utils import amp_dtype, cpu_cores, resolve_device

TEACHER_ACC = 0.7630            # published CIFAR-100 teacher accuracy (noise adaptation)
LR_S, WEIGHT_DECAY = 7.5e-4, 0.025

# end-to-end estimate of a CIFAR-100 reproduction
POOL_IMAGES = 1_281_167         # ImageNet train = the wild pool
NUM_SELECT = 650_000
EPOCHS = 251                    # published: range(1, int(320000 / 650000 * 512)) = 251 epochs
OUR_CORES = 16
PUB_DECODE_PER_CORE = 410       # full-size JPEG decode + resize with PIL, img/s per core (the same prototype's host)
PUB_WORKERS = 8                 # published DataLoader num_workers
REQUIRED_KEYS = ("device", "torch", "timm", "scoring_speedup", "train_speedup_batch256",
                 "train_img_per_s_large_batch", "cache_img_per_s_per_core")
H200_FIGURES = {                # the lean prototype on one H200 (torch 2.11), used when a section did not run
    "scoring_img_per_s_ours_best": 66_400, "scoring_img_per_s_published": 6_550,
    "train_img_per_s_batch256_ours": 21_400, "train_img_per_s_batch256_published": 4_350,
    "cache_img_per_s_per_core": 1_170,
}

# 224 px (sections d, e, f): the run scripts' models, random weights
TEACHERS_224 = ("deit_small_patch16_224", "deit_base_patch16_224")
CLASSES_224 = {"deit_small_patch16_224": 200, "deit_base_patch16_224": 1000}   # Tiny-ImageNet's, ImageNet's
TINY_224 = {"embed_dim": 32, "num_heads": 2}   # --tiny: 12 blocks (probe and PD blocks) at 224 px, little compute
# tools/decode_compare.py's photo sizes: 500x375 and the like; 640x480 and 800x600 let --fast_decode draft at 224 px
PHOTO_SIZES = ((500, 375), (375, 500), (640, 480), (333, 500), (800, 600), (64, 64), (250, 188))
FLICKR1M_IMAGES = 1_000_000     # the wild pool of both 224-px scripts (Flickr1M)
# script -> (teacher, images selected, labelled images added: --pos_num x classes)
SCRIPTS_224 = {"training_tinyimagenet.sh": ("deit_small_patch16_224", 800_000, 50 * 200),
               "training_imagenet.sh": ("deit_base_patch16_224", 1_000_000, 129 * 1000)}


def get_args_parser():
    p = argparse.ArgumentParser(description="Attention Probe throughput benchmark", allow_abbrev=False)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--sections", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "d", "e", "f"],
                   help="a: scoring, b: distillation step, c: cache build (default: these three); 224 px: "
                        "d: scoring, e: distillation step, f: JPEG loader")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="small batches and short timings (CPU, < 2 min)")
    p.add_argument("--tiny", action="store_true", help="--quick with a tiny teacher (for tests; numbers meaningless)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd variants of ours")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="also time the training step compiled with mode='reduce-overhead' (CUDA graphs)")
    # sizes (default by mode: full / --quick / --tiny)
    p.add_argument("--teacher", default=None, help="default deit_base_patch4_32_teacher (the paper's CIFAR teacher)")
    p.add_argument("--student", default="deit_tiny_patch4_32", help="default deit_tiny_patch4_32")
    p.add_argument("--num_classes", type=int, default=100, help="default 100 (CIFAR-100)")
    p.add_argument("--score_batch", type=int, default=None, help="scoring batch (default 1024; quick 64)")
    p.add_argument("--train_batch", type=int, default=None, help="the 'batch 256' step (default 256; quick 8)")
    p.add_argument("--large_batch", type=int, default=None, help="the large-batch step (default 1024; quick 16)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (default 3; quick 1)")
    p.add_argument("--cache_images", type=int, default=None, help="JPEGs for section c (default 4096; quick 128)")
    p.add_argument("--cache_workers", type=int, default=None, help="workers of the parallel build (default: all cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 with --quick on a CPU, where spinning OpenMP threads on shared "
                        "cores are slower than one; else torch's default)")
    p.add_argument("--published_na", choices=["loop", "tensor"], default="loop",
                   help="published noise matrix: its Python loop on the CPU (default) or our tensor version")
    # the 224-px sections d, e, f (training_tinyimagenet.sh, training_imagenet.sh)
    p.add_argument("--teachers224", nargs="+", default=list(TEACHERS_224),
                   help="teachers of sections d and e (default: " + " ".join(TEACHERS_224) + ")")
    p.add_argument("--student224", default="deit_tiny_patch16_224", help="student of section e")
    p.add_argument("--score_batch224", type=int, default=None, help="section d's batch (default 256; quick 4)")
    p.add_argument("--train_batch224", type=int, default=None, help="section e's batch (default 256; quick 4)")
    p.add_argument("--loader_workers", type=int, default=None,
                   help="section f's DataLoader workers (default 16, at most the cores; quick 2)")
    p.add_argument("--loader_batch", type=int, default=None, help="section f's batch (default 256; quick 4)")
    p.add_argument("--loader_images", type=int, default=None,
                   help="images each loader decodes (default 3 batches per worker; quick 2)")
    p.add_argument("--pool224", type=int, default=FLICKR1M_IMAGES,
                   help=f"wild pool of the 224-px estimate (default {FLICKR1M_IMAGES:,}: Flickr1M)")
    return p


def resolve_sizes(args):
    quick = args.quick or args.tiny
    full = not quick
    args.quick = quick
    args.teacher = args.teacher or ("deit_tiny_patch4_32_teacher" if args.tiny else "deit_base_patch4_32_teacher")
    defaults = {"score_batch": 1024 if full else 64, "train_batch": 256 if full else 8,
                "large_batch": 1024 if full else 16, "seconds": 3.0 if full else 1.0,
                "cache_images": 4096 if full else 128}
    if args.tiny:
        defaults.update(score_batch=8, train_batch=4, large_batch=8, seconds=0.1, cache_images=24)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    cores = cpu_cores()
    args.cores = cores
    if args.cache_workers is None:
        args.cache_workers = cores if full else min(2, cores)
    # 224 px: batch 256 is the published training batch; tiny sizes use the same numbers as quick
    for k, v in {"score_batch224": 256 if full else 4, "train_batch224": 256 if full else 4,
                 "loader_batch": 256 if full else 4,
                 "loader_workers": min(16, cores) if full else min(2, cores)}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.loader_images is None:
        args.loader_images = max(1, args.loader_workers) * (3 if full else 2) * args.loader_batch
    return args


# ---- timing and memory ------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run, device, seconds, warmup=1, min_reps=1, max_reps=10_000):
    """run(n) does n repetitions. Warm up, calibrate one repetition, then time enough to fill `seconds`.

    Returns (reps, elapsed seconds, peak-memory dict of the timed run).
    """
    for _ in range(warmup):
        run(1)
    sync(device)
    t0 = time.perf_counter()
    run(1)
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max(min_reps, round(seconds / one)), max_reps))
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        run(reps)
        sync(device)
        elapsed = time.perf_counter() - t0
    return reps, elapsed, mem.result()


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPU; sampled process RSS on the CPU.

    `extra_mb` is the peak above what was in use when the block began (models and inputs excluded).
    """

    def __init__(self, device, interval=0.002):
        self.device, self.interval = device, interval
        self.start = self.peak = None
        self._stop, self._thread = threading.Event(), None

    @staticmethod
    def rss():
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self):
        while not self._stop.wait(self.interval):
            r = self.rss()
            if r is not None and r > self.peak:
                self.peak = r

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = self.rss()
            if self.start is not None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            r = self.rss()
            self.peak = max(self.peak, r) if r is not None else self.peak

    def result(self):
        if self.start is None or self.peak is None:
            return {"peak_mb": None, "extra_mb": None, "method": "unavailable"}
        method = "cuda max_memory_allocated" if self.device.type == "cuda" else "sampled process RSS"
        return {"peak_mb": round(self.peak / 2**20, 1), "extra_mb": round((self.peak - self.start) / 2**20, 1),
                "method": method}


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed_row(args, device, row, batch, make, warmup):
    """row + img/s, reps and peak memory of make()'s runner, or + an error (one variant must not hide the others)."""
    try:
        run = make()
        reps, dt, mem = measure(run, device, args.seconds, warmup=warmup, min_reps=3 if not args.quick else 2)
        row.update(batch=batch, img_per_s=reps * batch / dt, reps=reps, **mem)
        print(f"  {row['label']}: {row['img_per_s']:,.1f} img/s", flush=True)   # a timeout still shows what ran
    except Exception as e:
        traceback.print_exc()
        row.update(batch=batch, error=f"{type(e).__name__}: {e}")
    run = None
    free_memory()
    return row


def best_of(rows, names):
    """The fastest of the rows named `names` that ran."""
    return max((r for r in rows if r["name"] in names and "img_per_s" in r), key=lambda r: r["img_per_s"], default=None)


# ---- section (a): scoring -----------------------------------------------------------------

def section_scoring(args, device, teacher, res):
    B = args.score_batch
    in_chans, size, mean, std = teacher.in_chans, teacher.img_size, teacher.mean, teacher.std
    g = torch.Generator(device="cpu").manual_seed(1)
    u8 = torch.randint(0, 256, (B, in_chans, size, size), dtype=torch.uint8, generator=g).to(device)
    x = data.normalize(u8, mean, std)                   # published: the loader hands normalised floats
    amp = amp_dtype("auto", device)
    amp_name = "bf16" if amp else "fp32"
    rows = []

    def record(name, label, fn, warmup):
        rows.append(timed_row(args, device, {"name": name, "label": label}, B, lambda: fn, warmup))

    def ours(fn, *extra):
        def run(n):
            for _ in range(n):
                fn(teacher.model, u8, mean, std, PROBE_BLOCKS, 0, amp, *extra)
        return run
    # ours first: on the CPU the peak is RSS growth, which memory freed by an earlier run would hide
    record("ours", f"ours: scoring.score_images, 1 pass, {amp_name}", ours(scoring.score_images), 1)
    # what the extra signals of signals.py (--store_signals) cost, and the flip's cost
    record("ours_signals", f"ours + the extra signals (--store_signals), {amp_name}",
           ours(scoring.score_images, True, False), 1)
    record("ours_flip", f"ours + --flip_signal (2 forwards), {amp_name}",
           ours(scoring.score_images, True, True), 1)
    if args.compile:
        compiled = torch.compile(scoring.score_images, dynamic=False)
        record("ours_compiled", f"ours + torch.compile, {amp_name}", ours(compiled), 3)

    with PublishedScorer(teacher.model) as scorer:
        def run_published(n):
            for _ in range(n):
                scorer(x)
        record("published", "published: fp32 eager, 2 passes, qkv copies, all heads", run_published, 1)

    res["scoring"] = {"teacher": args.teacher, "batch": B, "rows": rows}
    pub = _rate(rows, "published")
    best = best_of(rows, ("ours", "ours_compiled"))
    res["scoring_img_per_s_published"] = pub
    res["scoring_img_per_s_ours"] = _rate(rows, "ours")
    res["scoring_img_per_s_ours_compiled"] = _rate(rows, "ours_compiled")
    res["scoring_img_per_s_ours_signals"] = _rate(rows, "ours_signals")
    res["scoring_img_per_s_ours_flip"] = _rate(rows, "ours_flip")
    res["scoring_img_per_s_ours_best"] = best["img_per_s"] if best else None
    res["scoring_best_variant"] = best["name"] if best else None
    res["scoring_speedup"] = best["img_per_s"] / pub if best and pub else None
    for r in rows:
        r["speedup"] = r["img_per_s"] / pub if pub and "img_per_s" in r else None


def _rate(rows, name):
    for r in rows:
        if r["name"] == name:
            return r.get("img_per_s")
    return None


# ---- section (b): distillation step ---------------------------------------------------------

def ours_train_runner(args, device, teacher, batch, variant, pool_batches=8):
    """run(n): n steps of distill.distill_step in engine.TrainEpoch, the modules built as distill.wrap builds them."""
    in_chans, size, mean, std = teacher.in_chans, teacher.img_size, teacher.mean, teacher.std
    on_gpu = device.type == "cuda"
    amp = amp_dtype("auto", device)
    torch.manual_seed(0)
    model = models.create(args.student, args.num_classes, **getattr(args, "model_kwargs", {})).to(device)
    noise = NoiseAdaptation(args.num_classes, TEACHER_ACC).to(device)
    opt_s = torch.optim.AdamW(model.parameters(), lr=LR_S, weight_decay=WEIGHT_DECAY,
                              **({"fused": True} if on_gpu else {}))
    opt_n = torch.optim.Adam(noise.parameters(), lr=1e-3)
    if variant != "eager":
        torch._dynamo.reset()   # a fresh compile cache, as in a real run, which only ever sees this one batch shape
    flags = SimpleNamespace(pd_blocks=(FEATURE_BLOCKS, FEATURE_BLOCKS), compile=variant != "eager",
                            cuda_graphs=variant == "cuda_graphs")
    teacher_net, student = distill.wrap(flags, teacher, distill.Student(model, noise, [opt_s, opt_n]), device)
    loss = LossConfig(patchattn=PATCHATTN)
    augment = engine.Augment(mean, std, padding=4)
    g = torch.Generator(device="cpu").manual_seed(2)
    images = torch.randint(0, 256, (pool_batches * batch, in_chans, size, size), dtype=torch.uint8,
                           generator=g).to(device)
    epoch = [0]

    def run(n):
        done = 0
        while done < n:
            m = min(n - done, pool_batches)
            batches = engine.TensorBatches(images[:m * batch], None, batch_size=batch, shuffle=True,
                                           drop_last=True, seed=0)
            epoch_run = engine.TrainEpoch(batches, augment, epoch[0], device, desc="bench", modules=(model, noise))
            for b in epoch_run:
                with engine.autocast(device, amp):
                    terms = distill.distill_step(b.images, teacher_net, student.net, student.noise_net, loss)
                epoch_run.step(terms, student.optimizers)
            epoch_run.metrics()
            epoch[0] += 1
            done += m
    return run


def published_train_runner(args, device, teacher, batch, pool_batches=4):
    """run(n): n published training steps on normalised float batches already on the device."""
    in_chans, size = teacher.in_chans, teacher.img_size
    torch.manual_seed(0)
    student = models.create(args.student, args.num_classes, **getattr(args, "model_kwargs", {})).to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=LR_S, weight_decay=WEIGHT_DECAY, foreach=True)
    if args.published_na == "loop":
        noise = PublishedNoise(args.num_classes, TEACHER_ACC, device)
        noise_params, noise_matrix = [noise.theta], noise.matrix
    else:
        layer = NoiseAdaptation(args.num_classes, TEACHER_ACC).to(device)
        noise_params, noise_matrix = list(layer.parameters()), layer.transition
    opt_n = torch.optim.Adam(noise_params, lr=1e-3)
    g = torch.Generator(device="cpu").manual_seed(3)
    xs = torch.randn(pool_batches, batch, in_chans, size, size, generator=g).to(device)
    losses_seen = []

    def step(x):
        opt.zero_grad()
        opt_n.zero_grad()
        loss = published_step_loss(s_view, t_view, noise_matrix, x)
        losses_seen.append(loss.item())                 # published: loss_list.append(loss.data.item())
        loss.backward()
        opt.step()
        opt_n.step()

    s_view, t_view = PublishedView(student), PublishedView(teacher.model)
    k = [0]

    def run(n):
        with s_view, t_view:
            for _ in range(n):
                step(xs[k[0] % pool_batches])
                k[0] += 1
    return run


def train_variants(args):
    """Our training step's variants a run measures: eager, then the asked-for compiled ones."""
    return ["eager"] + (["compiled"] if args.compile else []) + (["cuda_graphs"] if args.cuda_graphs else [])


def variant_label(variant, amp_name):
    return {"eager": f"{amp_name} eager", "compiled": f"{amp_name} + torch.compile",
            "cuda_graphs": f"{amp_name} + compile reduce-overhead"}[variant]


def section_training(args, device, teacher, res):
    variants = train_variants(args)
    amp_name = "bf16" if device.type == "cuda" else "fp32"
    rows = []
    for batch in dict.fromkeys([args.train_batch, args.large_batch]):
        configs = []
        for v in variants:
            label = "ours: " + ("engine step, " if v == "eager" else "") + variant_label(v, amp_name)
            configs.append((f"ours_{v}", label, lambda v=v: ours_train_runner(args, device, teacher, batch, v),
                            1 if v == "eager" else 3))
        configs.append(("published", f"published: fp32 eager, hooks, foreach AdamW, NA {args.published_na}",
                        lambda: published_train_runner(args, device, teacher, batch), 1))
        for name, label, make, warmup in configs:
            rows.append(timed_row(args, device, {"name": name, "label": label}, batch, make, warmup))
    for r in rows:
        pub = next((p.get("img_per_s") for p in rows if p["name"] == "published" and p["batch"] == r["batch"]), None)
        r["speedup"] = r["img_per_s"] / pub if pub and "img_per_s" in r else None
    res["training"] = {"teacher": args.teacher, "student": args.student, "rows": rows,
                       "batch_small": args.train_batch, "batch_large": args.large_batch}

    def best(batch):
        ours = [r for r in rows if r["batch"] == batch and r["name"] != "published" and "img_per_s" in r]
        return max(ours, key=lambda r: r["img_per_s"], default=None)

    def pub(batch):
        return next((r.get("img_per_s") for r in rows if r["name"] == "published" and r["batch"] == batch), None)

    small, large = best(args.train_batch), best(args.large_batch)
    res["train_img_per_s_batch256_published"] = pub(args.train_batch)
    res["train_img_per_s_batch256_ours"] = small["img_per_s"] if small else None
    res["train_best_variant_batch256"] = small["name"] if small else None
    res["train_speedup_batch256"] = (small["img_per_s"] / pub(args.train_batch)
                                     if small and pub(args.train_batch) else None)
    res["train_img_per_s_large_batch"] = large["img_per_s"] if large else None
    res["train_img_per_s_large_batch_published"] = pub(args.large_batch)
    res["train_speedup_large_batch"] = (large["img_per_s"] / pub(args.large_batch)
                                        if large and pub(args.large_batch) else None)


# ---- section (c): cache build ------------------------------------------------------------

def make_jpegs(folder, n, seed=0, distinct=32, sizes=((500, 375),)):
    """n JPEGs of 500x375 (ImageNet's typical size; `sizes`: (w, h) cycled), smooth random content
    plus texture and noise, q90.

    `distinct` images are encoded and written repeatedly: the decoder's work per file is the same.
    """
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    blobs = []
    for k in range(min(n, distinct)):
        wh = tuple(sizes[k % len(sizes)])
        base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(wh, Image.BICUBIC)
        mid = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize(wh, Image.BICUBIC)
        arr = 0.7 * np.asarray(base, np.float32) + 0.3 * np.asarray(mid, np.float32)
        arr += rng.normal(0, 8, arr.shape)              # sensor-like noise: file sizes near real photos
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    for i in range(n):
        with open(os.path.join(folder, f"{i:07d}.JPEG"), "wb") as f:
            f.write(blobs[i % len(blobs)])
    return sum(len(b) for b in blobs) / len(blobs)


def published_decode(paths, size=32):
    """The published loader's per-image work: PIL full decode, convert, Resize, ToTensor, Normalize."""
    from PIL import Image
    try:
        import torchvision.transforms as T
        tf = T.Compose([T.Resize((size, size)), T.ToTensor(),
                        T.Normalize(mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)])
    except ImportError:  # same work without torchvision
        def tf(img):
            a = torch.from_numpy(np.asarray(img.resize((size, size), Image.BILINEAR), np.float32) / 255)
            return data.normalize((a.permute(2, 0, 1) * 255).to(torch.uint8), data.IMAGENET_MEAN, data.IMAGENET_STD)
    for p in paths:
        with open(p, "rb") as f:
            img = Image.open(f).convert("RGB")
        tf(img)


def section_cache(args, res):
    tmp = tempfile.mkdtemp(prefix="ap-bench-")
    out = {"images": args.cache_images, "size": 32, "jpeg": "500x375 q90"}
    res["cache"] = out
    try:
        folder = os.path.join(tmp, "pool")
        out["mean_jpeg_kb"] = round(make_jpegs(folder, args.cache_images) / 1024, 1)
        index = pool.list_pool(folder)
        n = len(index)
        # one core: the build in this process
        with PeakMemory(torch.device("cpu")) as mem:
            t0 = time.perf_counter()
            pool.build_cache(index, os.path.join(tmp, "cache1"), 32, 3, workers=1, progress=False, fast_decode=True)
            dt = time.perf_counter() - t0
        out["one_core"] = {"img_per_s": n / dt, "seconds": dt, **mem.result()}
        res["cache_img_per_s_per_core"] = n / dt
        # all workers: fork pool, enough chunks to keep each busy
        w = max(1, args.cache_workers)
        chunk = max(8, math.ceil(n / (4 * w)))
        t0 = time.perf_counter()
        pool.build_cache(index, os.path.join(tmp, "cacheW"), 32, 3, workers=w, chunk_size=chunk, progress=False,
                         fast_decode=True)
        dt = time.perf_counter() - t0
        out["parallel"] = {"workers": w, "img_per_s": n / dt, "img_per_s_per_worker": n / dt / w,
                           "seconds": dt, "peak_mb": None, "extra_mb": None, "method": "not measured (worker processes)"}
        res["cache_img_per_s"] = n / dt
        res["cache_img_per_s_per_worker"] = n / dt / w
        # the published path: full decode every epoch, one core
        paths = [index.path(i) for i in range(min(n, max(16, n // 2)))]
        with PeakMemory(torch.device("cpu")) as mem:
            t0 = time.perf_counter()
            published_decode(paths)
            dt = time.perf_counter() - t0
        out["published_full_decode"] = {"images": len(paths), "img_per_s": len(paths) / dt, "seconds": dt,
                                        **mem.result()}
        res["pil_full_decode_img_per_s_per_core"] = len(paths) / dt
        res["cache_vs_full_decode_per_core"] = res["cache_img_per_s_per_core"] / res["pil_full_decode_img_per_s_per_core"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- sections (d, e, f): 224 px ------------------------------------------------------------------

def tag224(name):
    """deit_small_patch16_224 -> small: the part of the JSON keys that names the teacher."""
    return name.replace("deit_", "", 1).split("_patch")[0]


def required_keys_224(teachers=TEACHERS_224):
    """The keys a run with sections d, e, f writes (null unless its section ran and succeeded)."""
    return ([f"scoring224_{tag224(t)}_{k}" for t in teachers for k in ("img_per_s_ours_best", "img_per_s_published",
                                                                       "speedup")]
            + [f"train224_{tag224(t)}_{k}" for t in teachers for k in ("img_per_s_ours", "img_per_s_published",
                                                                       "speedup")]
            + ["loader224_img_per_s", "loader224_img_per_s_fast_decode", "loader224_img_per_s_published"])


def make_teacher224(args, name, device):
    torch.manual_seed(0)
    # --tiny: 10 classes too (the published NA loop's backward at 1,000 classes takes seconds a step on a CPU)
    classes = 10 if args.tiny else CLASSES_224.get(name, 1000)
    model = models.create(name, classes, **(TINY_224 if args.tiny else {}))
    return models.Teacher.of(model.to(device), name)


def section_scoring224(args, device, res):
    """(d) scoring.score_images on each 224-px teacher (bf16 eager, + torch.compile) vs the published two passes."""
    B = args.score_batch224
    amp = amp_dtype("auto", device)
    amp_name = "bf16" if amp else "fp32"
    rows = []
    res["scoring224"] = {"teachers": list(args.teachers224), "batch": B, "rows": rows}
    for name in args.teachers224:
        tag, mine = tag224(name), []
        teacher = make_teacher224(args, name, device)
        g = torch.Generator(device="cpu").manual_seed(1)
        u8 = torch.randint(0, 256, (B, teacher.in_chans, teacher.img_size, teacher.img_size), dtype=torch.uint8,
                           generator=g).to(device)
        x = data.normalize(u8, teacher.mean, teacher.std)

        def ours(fn):
            def run(n):
                for _ in range(n):
                    fn(teacher.model, u8, teacher.mean, teacher.std, PROBE_BLOCKS, 0, amp)
            return lambda: run
        mine.append(timed_row(args, device, {"name": "ours", "teacher": name,
                                             "label": f"ours: {tag} score_images, {amp_name}"}, B,
                              ours(scoring.score_images), 1))
        if args.compile:
            torch._dynamo.reset()   # a fresh cache: the other teacher's graphs must not count
            mine.append(timed_row(args, device, {"name": "ours_compiled", "teacher": name,
                                                 "label": f"ours: {tag} + torch.compile, {amp_name}"}, B,
                                  ours(torch.compile(scoring.score_images, dynamic=False)), 3))

        def published_run():
            scorer = PublishedScorer(teacher.model)

            def run(n):
                with scorer:
                    for _ in range(n):
                        scorer(x)
            return run
        mine.append(timed_row(args, device, {"name": "published", "teacher": name,
                                             "label": f"published: {tag} fp32, 2 passes, qkv copies"}, B,
                              published_run, 1))
        pub, best = _rate(mine, "published"), best_of(mine, ("ours", "ours_compiled"))
        for r in mine:
            r["speedup"] = r["img_per_s"] / pub if pub and "img_per_s" in r else None
        rows += mine
        res[f"scoring224_{tag}_img_per_s_ours"] = _rate(mine, "ours")
        res[f"scoring224_{tag}_img_per_s_ours_compiled"] = _rate(mine, "ours_compiled")
        res[f"scoring224_{tag}_img_per_s_ours_best"] = best["img_per_s"] if best else None
        res[f"scoring224_{tag}_best_variant"] = best["name"] if best else None
        res[f"scoring224_{tag}_img_per_s_published"] = pub
        res[f"scoring224_{tag}_speedup"] = best["img_per_s"] / pub if best and pub else None
        teacher = u8 = x = None
        free_memory()


def section_training224(args, device, res):
    """(e) one KD + NA + PD step, each 224-px teacher -> --student224, ours (bf16 eager, compiled) vs published."""
    batch = args.train_batch224
    variants = train_variants(args)
    amp_name = "bf16" if device.type == "cuda" else "fp32"
    rows = []
    res["training224"] = {"teachers": list(args.teachers224), "student": args.student224, "batch": batch, "rows": rows}
    for name in args.teachers224:
        tag, mine = tag224(name), []
        teacher = make_teacher224(args, name, device)
        # the runners of section b, on this pair: student, class count and (tiny) sizes swapped in
        a = SimpleNamespace(**{**vars(args), "student": args.student224, "num_classes": teacher.num_classes,
                               "model_kwargs": TINY_224 if args.tiny else {}})
        for v in variants:
            mine.append(timed_row(args, device, {"name": f"ours_{v}", "teacher": name,
                                                 "label": f"ours: {tag} -> tiny, {variant_label(v, amp_name)}"}, batch,
                                  lambda v=v: ours_train_runner(a, device, teacher, batch, v),
                                  1 if v == "eager" else 3))
        mine.append(timed_row(args, device, {"name": "published", "teacher": name,
                                             "label": f"published: {tag} -> tiny, fp32, NA {args.published_na}"},
                              batch, lambda: published_train_runner(a, device, teacher, batch), 1))
        if args.published_na == "loop":
            # the loop's backward grows as classes^3 (1,000 row copies of a C x C matrix): also without it
            t = SimpleNamespace(**{**vars(a), "published_na": "tensor"})
            mine.append(timed_row(args, device, {"name": "published_tensor_na", "teacher": name,
                                                 "label": f"published: {tag} -> tiny, fp32, NA tensor"},
                                  batch, lambda: published_train_runner(t, device, teacher, batch), 1))
        pub, best = _rate(mine, "published"), best_of(mine, [f"ours_{v}" for v in variants])
        for r in mine:
            r["speedup"] = r["img_per_s"] / pub if pub and "img_per_s" in r else None
        rows += mine
        for v in variants:
            res[f"train224_{tag}_img_per_s_ours_{v}"] = _rate(mine, f"ours_{v}")
        res[f"train224_{tag}_img_per_s_ours"] = best["img_per_s"] if best else None
        res[f"train224_{tag}_best_variant"] = best["name"] if best else None
        res[f"train224_{tag}_img_per_s_published"] = pub
        res[f"train224_{tag}_img_per_s_published_tensor_na"] = _rate(mine, "published_tensor_na")
        res[f"train224_{tag}_speedup"] = best["img_per_s"] / pub if best and pub else None
        teacher = a = None
        free_memory()


class PublishedLoader224(torch.utils.data.Dataset):
    """The published 224-px wild-image loader's per-image work: PIL decode, convert('RGB'), Resize((224, 224)),
    RandomCrop(224, padding=4), RandomHorizontalFlip, ToTensor, Normalize; float tensors to collate."""

    def __init__(self, paths, size=224):
        self.paths, self.size, self.tf = paths, size, None

    def __len__(self):
        return len(self.paths)

    def _transform(self):
        from PIL import Image
        try:
            import torchvision.transforms as T
            return T.Compose([T.Resize((self.size, self.size)), T.RandomCrop(self.size, padding=4),
                              T.RandomHorizontalFlip(), T.ToTensor(),
                              T.Normalize(mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)])
        except ImportError:  # the same work without torchvision
            def tf(img):
                s = self.size
                a = torch.from_numpy(np.asarray(img.resize((s, s), Image.BILINEAR))).permute(2, 0, 1)[None]
                a = data.random_crop_flip(a.contiguous(), 4)[0]
                return data.normalize(a[None], data.IMAGENET_MEAN, data.IMAGENET_STD)[0]
            return tf

    def __getitem__(self, i):
        from PIL import Image
        if self.tf is None:   # built in the worker
            self.tf = self._transform()
        with open(self.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.tf(img), 0


def time_epoch(batches):
    """img/s of one pass over `batches` (an iterable of image batches), worker start included."""
    t0, n = time.perf_counter(), 0
    for b in batches:
        n += len(b[0] if isinstance(b, (list, tuple)) else b.images)
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "img_per_s": n / dt}


def section_loader224(args, device, res):
    """(f) the 224-px data path: ours (PoolDataset -> LoaderBatches, as distill's training set, crops and flips
    left to the device) with default decoding and --fast_decode at --loader_workers workers, against the
    published torchvision transforms at its 8 workers; generated photo-size JPEGs, read from the page cache."""
    B, W, n = args.loader_batch, max(0, args.loader_workers), args.loader_images
    pw = PUB_WORKERS if not args.quick else min(PUB_WORKERS, W)
    files = min(n, 1024)   # each file read n / files times: the decoder's work per image is the same
    tmp = tempfile.mkdtemp(prefix="ap-bench224-")
    out = {"size": 224, "images": n, "files": files, "sizes": [f"{w}x{h}" for w, h in PHOTO_SIZES], "batch": B,
           "workers": W, "published_workers": pw, "rows": []}
    res["loader224"] = out
    pin = device.type == "cuda"
    try:
        folder = os.path.join(tmp, "pool")
        out["mean_jpeg_kb"] = round(make_jpegs(folder, files, sizes=PHOTO_SIZES) / 1024, 1)
        index = pool.list_pool(folder)
        idx = np.arange(n) % len(index)
        for name, fast in (("ours", False), ("ours_fast_decode", True)):
            ds = data.ImagesWithCropFlag(pool.PoolDataset(index, 224, 3, indices=idx, fast_decode=fast))
            batches = engine.LoaderBatches(ds, batch_size=B, shuffle=True, drop_last=False, seed=0, workers=W, pin=pin)
            row = {"name": name, "label": f"ours: PoolDataset, {W} workers, " + ("--fast_decode" if fast else
                                                                                 "default decoding"),
                   "workers": W, **time_epoch(batches.epoch(0))}
            batches = None   # its persistent workers end here
            out["rows"].append(row)
            print(f"  {row['label']}: {row['img_per_s']:,.1f} img/s", flush=True)
        ds = PublishedLoader224([index.path(int(i)) for i in idx])
        loader = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True, num_workers=pw, pin_memory=pin)
        out["rows"].append({"name": "published", "label": f"published: torchvision transforms, {pw} workers",
                            "workers": pw, **time_epoch(loader)})
        loader = None
        print(f"  {out['rows'][-1]['label']}: {out['rows'][-1]['img_per_s']:,.1f} img/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()
    rows = out["rows"]
    pub = _rate(rows, "published")
    for r in rows:
        r["speedup"] = r["img_per_s"] / pub if pub else None
        r["img_per_s_per_worker"] = r["img_per_s"] / max(1, r["workers"])
    res["loader224_workers"], res["loader224_published_workers"] = W, pw
    res["loader224_img_per_s"] = _rate(rows, "ours")
    res["loader224_img_per_s_fast_decode"] = _rate(rows, "ours_fast_decode")
    res["loader224_img_per_s_published"] = pub
    res["loader224_img_per_s_per_worker"] = _rate(rows, "ours") / max(1, W)
    res["loader224_published_img_per_s_per_worker"] = pub / max(1, pw)


def end_to_end_224(res, pool_images):
    """Hours of each 224-px run script on one GPU from the rates measured here (no reference figures: nothing
    at 224 px was measured before): ours with --workers = section f's workers, default decoding and
    --fast_decode; the published algorithm with its 8 workers. Each step runs at the slower of the GPU and
    the decoding; the --pos_num images are counted at the wild images' decoding rate."""
    est, lines = {}, []
    w, pw = res.get("loader224_workers"), res.get("loader224_published_workers")

    def slower(images, gpu, dec, dec_name):
        # -> (seconds, what bounds it)
        return images / min(gpu, dec), "GPU step" if gpu <= dec else f"decoding ({dec_name})"

    for script, (teacher, num_select, labelled) in SCRIPTS_224.items():
        tag = tag224(teacher)
        keys = {"s_ours": f"scoring224_{tag}_img_per_s_ours_best", "s_pub": f"scoring224_{tag}_img_per_s_published",
                "t_ours": f"train224_{tag}_img_per_s_ours", "t_pub": f"train224_{tag}_img_per_s_published",
                "feed": "loader224_img_per_s", "fast": "loader224_img_per_s_fast_decode",
                "pub_feed": "loader224_img_per_s_published"}
        missing = [k for k in keys.values() if not res.get(k)]
        epochs = published.epochs(num_select, 224) - 1
        train = num_select + labelled
        samples = epochs * train
        head = (f"END-TO-END ESTIMATE, {script} ({teacher} teacher, {num_select:,} selected of a {pool_images:,}-image "
                f"pool + {labelled:,} labelled, {epochs} epochs = int(640000 / {num_select:,} * 512) - 1: "
                f"{samples / 1e6:,.0f} M training images; rates measured here on {res.get('device')})")
        if missing:
            lines += [head, "  not estimated: no " + ", ".join(missing)]
            est[script] = {"missing": missing}
            continue
        r = {k: res[v] for k, v in keys.items()}
        ours, bounds = {}, {}
        for mode, dec in (("default", r["feed"]), ("fast_decode", r["fast"])):
            sc, sb = slower(pool_images, r["s_ours"], dec, f"{w} workers")
            ds, db = slower(samples, r["t_ours"], dec, f"{w} workers")
            ours[mode] = {"scoring": sc, "distillation": ds}
            bounds[mode] = {"scoring": sb, "distillation": db}
        # published: two decoding passes to score, one for the class weights (a teacher pass, one pass of the
        # two-pass scoring rate: 2 x), then every epoch decoded again
        p_sc = max(2 * pool_images / r["pub_feed"], pool_images / r["s_pub"])
        p_cw = max(num_select / r["pub_feed"], num_select / (2 * r["s_pub"]))
        p_ds, p_db = slower(samples, r["t_pub"], r["pub_feed"], f"{pw} workers")
        t_na = res.get(f"train224_{tag}_img_per_s_published_tensor_na")
        pub = {"scoring": p_sc, "class_weights": p_cw, "distillation": p_ds}
        pub_bounds = {"scoring": "GPU passes" if pool_images / r["s_pub"] >= 2 * pool_images / r["pub_feed"]
                      else f"decoding ({pw} workers)", "distillation": p_db}
        tot = {m: sum(v.values()) for m, v in ours.items()}
        p_tot = sum(pub.values())
        lines += [
            head,
            f"  ours      scoring       {pool_images:,} img / min({r['s_ours']:,.0f} img/s GPU, {r['feed']:,.0f} img/s "
            f"decoding at {w} workers) = {ours['default']['scoring']:,.0f} s [{bounds['default']['scoring']}]",
            f"            distillation  {samples:,} img / min({r['t_ours']:,.0f}, {r['feed']:,.0f}) = "
            f"{ours['default']['distillation']:,.0f} s [{bounds['default']['distillation']}]",
            f"            total         {tot['default']:,.0f} s = {tot['default'] / 3600:.1f} h",
            f"  ours --fast_decode ({r['fast']:,.0f} img/s decoding): scoring {ours['fast_decode']['scoring']:,.0f} s "
            f"[{bounds['fast_decode']['scoring']}], distillation {ours['fast_decode']['distillation']:,.0f} s "
            f"[{bounds['fast_decode']['distillation']}], total {tot['fast_decode'] / 3600:.1f} h",
            f"  published scoring       max(2 passes x {pool_images:,} / {r['pub_feed']:,.0f} img/s decoding at {pw} "
            f"workers, {pool_images:,} / {r['s_pub']:,.0f}) = {p_sc:,.0f} s [{pub_bounds['scoring']}]",
            f"            class weights max({num_select:,} / {r['pub_feed']:,.0f}, {num_select:,} / "
            f"{2 * r['s_pub']:,.0f}) = {p_cw:,.0f} s",
            f"            distillation  {samples:,} / min({r['t_pub']:,.0f}, {r['pub_feed']:,.0f}) = {p_ds:,.0f} s "
            f"[{p_db}]",
            f"            total         {p_tot:,.0f} s = {p_tot / 3600:.1f} h",
            *([f"            (its step with our tensor noise matrix instead of the NA loop: {t_na:,.0f} img/s, "
               f"distillation {samples / min(t_na, r['pub_feed']):,.0f} s)"] if t_na else []),
            f"  end-to-end speed-up     {p_tot:,.0f} / {tot['default']:,.0f} = {p_tot / tot['default']:.1f}x "
            f"({p_tot / tot['fast_decode']:.1f}x with --fast_decode)",
        ]
        est[script] = {"teacher": teacher, "num_select": num_select, "labelled": labelled, "epochs": epochs,
                       "pool_images": pool_images, "training_images": samples, "ours_s": ours, "ours_bounds": bounds,
                       "ours_hours": tot["default"] / 3600, "ours_hours_fast_decode": tot["fast_decode"] / 3600,
                       "published_s": pub, "published_bounds": pub_bounds, "published_hours": p_tot / 3600,
                       "speedup": p_tot / tot["default"], "rates": r}
    return est, lines


# ---- end-to-end estimate ------------------------------------------------------------------

def end_to_end(res):
    """Hours for a CIFAR-100 reproduction from the measured rates; the H200 reference figures fill any gap."""
    src = {}

    def rate(key):
        v = res.get(key)
        src[key] = "measured" if v else "H200 reference"
        return v or H200_FIGURES[key]

    per_core = rate("cache_img_per_s_per_core")
    s_ours, s_pub = rate("scoring_img_per_s_ours_best"), rate("scoring_img_per_s_published")
    t_ours, t_pub = rate("train_img_per_s_batch256_ours"), rate("train_img_per_s_batch256_published")
    samples = EPOCHS * NUM_SELECT
    feed = PUB_DECODE_PER_CORE * PUB_WORKERS
    ours = {"cache": POOL_IMAGES / (per_core * OUR_CORES), "scoring": POOL_IMAGES / s_ours,
            "distillation": samples / t_ours}
    pub = {"scoring": max(2 * POOL_IMAGES / feed, POOL_IMAGES / s_pub),
           "class_weights": NUM_SELECT / feed,
           "distillation": max(samples / feed, samples / t_pub)}
    lines = [
        f"END-TO-END ESTIMATE, CIFAR-100 reproduction (rates measured here on {res.get('device')}, "
        "unless marked H200 reference)",
        f"  ours      cache build   {POOL_IMAGES:,} img / ({per_core:,.0f} img/s/core x {OUR_CORES} cores)"
        f"{_mark(src, 'cache_img_per_s_per_core')} = {ours['cache']:,.0f} s",
        f"            scoring       {POOL_IMAGES:,} img / {s_ours:,.0f} img/s{_mark(src, 'scoring_img_per_s_ours_best')}"
        f" = {ours['scoring']:,.0f} s",
        f"            distillation  {EPOCHS} ep x {NUM_SELECT:,} img / {t_ours:,.0f} img/s"
        f"{_mark(src, 'train_img_per_s_batch256_ours')} = {ours['distillation']:,.0f} s",
        f"            total         {sum(ours.values()):,.0f} s = {sum(ours.values()) / 3600:.2f} h",
        f"  published decode feed   {PUB_DECODE_PER_CORE} img/s/core x {PUB_WORKERS} workers = {feed:,} img/s",
        f"            scoring       max(2 passes x {POOL_IMAGES:,} / {feed:,}, {POOL_IMAGES:,} / {s_pub:,.0f}"
        f"{_mark(src, 'scoring_img_per_s_published')}) = max({2 * POOL_IMAGES / feed:,.0f}, "
        f"{POOL_IMAGES / s_pub:,.0f}) = {pub['scoring']:,.0f} s",
        f"            class weights {NUM_SELECT:,} / {feed:,} = {pub['class_weights']:,.0f} s",
        f"            distillation  max({samples:,} / {feed:,}, {samples:,} / {t_pub:,.0f}"
        f"{_mark(src, 'train_img_per_s_batch256_published')}) = max({samples / feed:,.0f}, {samples / t_pub:,.0f})"
        f" = {pub['distillation']:,.0f} s",
        f"            total         {sum(pub.values()):,.0f} s = {sum(pub.values()) / 3600:.2f} h",
        f"  end-to-end speed-up     {sum(pub.values()):,.0f} / {sum(ours.values()):,.0f} = "
        f"{sum(pub.values()) / sum(ours.values()):.1f}x",
    ]
    est = {"ours_s": ours, "published_s": pub, "ours_hours": sum(ours.values()) / 3600,
           "published_hours": sum(pub.values()) / 3600, "speedup": sum(pub.values()) / sum(ours.values()),
           "rate_sources": src}
    return est, lines


def _mark(src, key):
    return "" if src.get(key) == "measured" else " [H200 reference]"


# ---- report -------------------------------------------------------------------------------

def table_lines(res):
    head = f"{'section':<9} {'variant':<58} {'batch':>6} {'img/s':>11} {'speed-up':>9} {'peak MB':>9} {'extra MB':>9}"
    lines = [head, "-" * len(head)]

    def fmt(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    def add(section, label, batch, row):
        if "error" in row:
            lines.append(f"{section:<9} {label[:58]:<58} {fmt(batch, '>6'):>6}  ERROR {row['error'][:90]}")
            return
        lines.append(f"{section:<9} {label[:58]:<58} {fmt(batch, '>6'):>6} {fmt(row.get('img_per_s'), ',.1f'):>11} "
                     f"{fmt(row.get('speedup'), '.2f'):>9} {fmt(row.get('peak_mb'), ',.0f'):>9} "
                     f"{fmt(row.get('extra_mb'), ',.0f'):>9}")

    for r in res.get("scoring", {}).get("rows", []):
        add("scoring", r["label"], r["batch"], r)
    for r in res.get("training", {}).get("rows", []):
        add("train", r["label"], r["batch"], r)
    c = res.get("cache", {})
    if "one_core" in c:
        add("cache", f"ours: build_cache, 1 core (--fast_decode), {c['mean_jpeg_kb']} KB JPEGs", c["images"],
            {**c["one_core"], "speedup": res.get("cache_vs_full_decode_per_core")})
    if "parallel" in c:
        add("cache", f"ours: build_cache, {c['parallel']['workers']} workers "
            f"({c['parallel']['img_per_s_per_worker']:,.0f}/worker)", c["images"], c["parallel"])
    if "published_full_decode" in c:
        add("cache", "published: PIL full decode + Resize, 1 core", c["published_full_decode"]["images"],
            {**c["published_full_decode"], "speedup": 1.0})
    for section, key in (("score224", "scoring224"), ("train224", "training224"), ("load224", "loader224")):
        for r in res.get(key, {}).get("rows", []):
            add(section, r["label"], r.get("batch", res[key].get("batch")), r)
    for section, err in res.get("errors", {}).items():
        lines.append(f"{section:<9} ERROR {err[:140]}")
    return lines


def main(args):
    t_start = time.time()
    resolve_sizes(args)
    device = resolve_device(args.device)   # 'cuda' -> 'cuda:0': torch.cuda.set_device wants an index
    if args.threads is None and args.quick and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else (platform.processor() or platform.machine()),
           "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "cores": args.cores, "quick": args.quick, "tiny": args.tiny,
           "compile": args.compile, "cuda_graphs": args.cuda_graphs, "teacher": args.teacher,
           "student": args.student, "num_classes": args.num_classes, "seconds_per_measurement": args.seconds,
           "argv": sys.argv[1:], "errors": {}}
    for key in REQUIRED_KEYS:   # null unless its section runs and succeeds
        res.setdefault(key, None)
    old, new = set("abc") & set(args.sections), set("def") & set(args.sections)
    if new:
        res.update(teachers224=list(args.teachers224), student224=args.student224, pool224=args.pool224)
        for key in required_keys_224(args.teachers224):
            res.setdefault(key, None)
    print(f"benchmark on {res['device']} ({res['device_name']}), torch {res['torch']}, timm {res['timm']}, "
          f"{args.cores} cores, sections {' '.join(args.sections)}" + (" [quick]" if args.quick else ""), flush=True)
    teacher, teacher_error = None, None
    if {"a", "b"} & set(args.sections):
        try:
            torch.manual_seed(0)
            teacher = models.Teacher.of(models.create(args.teacher, args.num_classes).to(device), args.teacher)
        except Exception as e:  # sections a and b report it; c still runs
            traceback.print_exc()
            teacher_error = f"teacher {args.teacher}: {type(e).__name__}: {e}"
    for key, name, fn in (("a", "scoring", lambda: section_scoring(args, device, teacher, res)),
                          ("b", "training", lambda: section_training(args, device, teacher, res)),
                          ("c", "cache", lambda: section_cache(args, res)),
                          # f first: the quickest, and a time limit during the compiles of d and e still leaves it
                          ("f", "loader224", lambda: section_loader224(args, device, res)),
                          ("d", "scoring224", lambda: section_scoring224(args, device, res)),
                          ("e", "training224", lambda: section_training224(args, device, res))):
        if key not in args.sections:
            continue
        t0 = time.time()
        print(f"[{key}] {name} ...", flush=True)
        try:
            if key in "ab" and teacher is None:
                raise RuntimeError(teacher_error)
            fn()
        except Exception as e:  # a broken section leaves an error row; the others still run
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"
        res[f"{name}_seconds"] = round(time.time() - t0, 1)
        free_memory()
        if args.json and new:   # the 224-px sections are long: what ran survives a time limit
            write_json(res, args.json + ".partial")
    est_lines = []
    if old:   # the CIFAR-100 estimate belongs to sections a-c (as before the 224-px sections existed)
        est, est_lines = end_to_end(res)
        res["end_to_end"] = est
    if new:
        est224, lines224 = end_to_end_224(res, args.pool224)
        res["end_to_end_224"] = est224
        est_lines += ([""] if est_lines else []) + lines224
    res["wall_s"] = round(time.time() - t_start, 1)
    print()
    print("\n".join(table_lines(res)))
    if args.quick and old:
        print(f"note: --quick sizes (scoring batch {args.score_batch}, training batches {args.train_batch}/"
              f"{args.large_batch}) stand in for 1024 and 256/1024; the *_batch256 keys hold the small batch.")
    if args.quick and new:
        print(f"note: --quick sizes at 224 px (scoring batch {args.score_batch224}, training batch "
              f"{args.train_batch224}, loader batch {args.loader_batch}, {args.loader_images} images)"
              + (", models of width 32 with 10 classes (--tiny)" if args.tiny else "") + " stand in for 256; numbers meaningless.")
    print()
    print("\n".join(est_lines))
    print(f"\nwall time {res['wall_s']:.1f} s")
    if args.json:
        write_json(res, args.json)
        if os.path.exists(args.json + ".partial"):
            os.remove(args.json + ".partial")
        print(f"wrote {args.json}")
    return res


def write_json(res, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
