"""Shared generators for tests: CIFAR-format pickles, IDX files, wild image pools (good, odd and
broken files), tiny teacher checkpoints, hostile checkpoints, helpers to run the CLIs with flag dicts,
and plain reference computations. Test modules import helpers from here, never from each other.

Plain functions (no pytest fixtures), so any test module can `import fixtures` and build what
it needs under its own tmp_path. Everything is seeded: same arguments, same bytes.
"""
import io
import os
import pickle
import re
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = "deit_tiny_patch4_32_teacher"   # 2.4 M params: fine on CPU for tens of images
STUDENT = "deit_tiny_patch4_32"
MICRO = "test_micro_patch8_32"             # ~40x cheaper; registered by this module, in-process only
# One thread per child: on shared, busy CPUs two OpenMP threads per process can run 20x slower.
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def register_test_models():
    """Register MICRO with timm (32x32 RGB, patch 8, dim 32, depth 12, 2 heads). Child processes
    started by the CLIs do not see it: use TEACHER/STUDENT there."""
    register_micro_vit(MICRO, depth=12)


def register_micro_vit(name, depth):
    """Register `name` with timm: a ViT on 32x32 RGB, patch 8, dim 32, 2 heads, `depth` blocks."""
    import timm
    from functools import partial
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer
    import data
    import models  # noqa: F401  (registers the paper's names)
    if timm.list_models(name):
        return

    def build(pretrained=False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "pretrained", "cache_dir"):
            kwargs.pop(key, None)
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=4,
                                  qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kwargs)
        model.pretrained_cfg = dict(input_size=(3, 32, 32), mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD,
                                    num_classes=model.num_classes)
        return model
    build.__name__ = build.__qualname__ = name   # timm registers a model under its function's name
    register_model(build)


# ---- images -----------------------------------------------------------------------------

def smooth_rgb(w, h, seed):
    """Photo-like RGB image: upsampled random colours plus mild noise (JPEG keeps it image-like)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    a = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
    a = a + rng.integers(-6, 7, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_bytes(path, data):
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def bomb_png(width=20000, height=20000):
    """A real PNG header claiming width x height pixels with a tiny (invalid) body: PIL and
    pool.MAX_PIXELS reject it from the header alone, so it costs nothing to build or check."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def odd_valid_files(size=40, seed=0):
    """{file name: bytes} of unusual but decodable images: every one must be scored."""
    base = smooth_rgb(size, size, seed)
    deep = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    pal_t = base.convert("P")
    pal_t.info["transparency"] = 0
    return {
        "gray.jpg": encode(base.convert("L"), "JPEG"),
        "gray.png": encode(base.convert("L"), "PNG"),
        "palette.png": encode(base.convert("P"), "PNG"),
        "palette_transparent.png": encode(pal_t, "PNG", transparency=0),
        "rgba.png": encode(base.convert("RGBA"), "PNG"),
        "la.png": encode(base.convert("LA"), "PNG"),
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "deep16.png": encode(Image.fromarray(deep), "PNG"),
        "bilevel.png": encode(base.convert("1"), "PNG"),
        "png_named.jpg": encode(base, "PNG"),                  # wrong extension, valid content
        "big.jpg": encode(smooth_rgb(1600, 1200, seed + 1), "JPEG", quality=80),  # decoded via draft
        "tiny.png": encode(smooth_rgb(3, 2, seed + 2), "PNG"),
        "progressive.jpg": encode(base, "JPEG", progressive=True),
        "bmp.bmp": encode(base, "BMP"),
        # decoded with the missing part filled, as the published scripts' LOAD_TRUNCATED_IMAGES = True did
        "truncated.jpg": encode(base, "JPEG", quality=90)[:700],
        "truncated.png": encode(base, "PNG")[:1600],
    }


def broken_files(size=40, seed=0):
    """{file name: bytes} of files with image extensions that PIL cannot load (the published loader
    raised on them): each must be skipped."""
    base = smooth_rgb(size, size, seed)
    jpg = encode(base, "JPEG", quality=90)
    png = encode(base, "PNG")
    return {
        "zero.jpg": b"",
        "zero.png": b"",
        "cut_in_header.jpg": jpg[:200],
        "cut_in_header.png": png[:40],
        "header_only.jpg": jpg[:20],
        "text.jpg": b"this is not an image\n" * 20,
        "random.png": np.random.default_rng(seed).integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "html.jpeg": b"<html><body>404 Not Found</body></html>\n",
        "bomb.png": bomb_png(),
    }


def write_pool(folder, n, size=40, seed=0, subfolders=4, odd=0, broken=0):
    """A folder pool of `n` files: n - odd - broken good PNG/JPEG images in `subfolders`
    folders, plus `odd` odd-but-valid and `broken` undecodable files (cycling through
    odd_valid_files / broken_files). Returns {'good': [...], 'odd': [...], 'broken': [...]}
    with pool ids (paths relative to `folder`, '/' separators)."""
    folder = os.fspath(folder)
    out = {"good": [], "odd": [], "broken": []}
    specials = ([("odd", k, v) for k, v in odd_valid_files(size, seed).items()],
                [("broken", k, v) for k, v in broken_files(size, seed).items()])
    for kind, count, table in (("odd", odd, specials[0]), ("broken", broken, specials[1])):
        for j in range(count):
            _, name, data = table[j % len(table)]
            stem, ext = os.path.splitext(name)
            rel = f"{kind}/{stem}_{j:04d}{ext}"
            write_bytes(os.path.join(folder, rel), data)
            out[kind].append(rel)
    for i in range(n - odd - broken):
        ext = ("png", "jpg")[i % 2]
        rel = f"d{i % max(1, subfolders)}/img_{i:05d}.{ext}"
        img = smooth_rgb(size, size, seed * 100003 + i)
        write_bytes(os.path.join(folder, rel), encode(img, "PNG" if ext == "png" else "JPEG", quality=92))
        out["good"].append(rel)
    return out


def write_blob_pool(folder, n=24, size=32, seed=0):
    """A pool of one smooth blob per image, PNG and JPEG alternating, in 3 folders class0..2, at the
    teacher's size (no resize involved). Returns the sorted file paths (pool order)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = os.path.join(folder, f"class{i % 3}")
        os.makedirs(sub, exist_ok=True)
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.uniform(4, size - 4, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(10, 60))
        arr = (blob[..., None] * rng.uniform(80, 255, 3) + rng.uniform(0, 40, 3)).clip(0, 255).astype(np.uint8)
        path = os.path.join(sub, f"img{i:03d}." + ("jpg" if i % 2 else "png"))
        Image.fromarray(arr).save(path, quality=95)
        paths.append(path)
    return sorted(paths, key=lambda p: os.path.relpath(p, folder))


# ---- labelled data -----------------------------------------------------------------------

def write_cifar(root, dataset="cifar10", n_train=10, n_test=20, seed=0, bytes_keys=True):
    """Tiny CIFAR 'python version' pickles under root/cifar-10-batches-py (or cifar-100-python), with the
    official file names and keys (bytes keys like the Python-2 era pickles; bytes_keys=False for str).
    n_train images per training file (5 files for CIFAR-10, 1 for CIFAR-100), n_test in the test file.
    The first class names are the real ones (airplane; apple, aquarium_fish), the rest classN.
    -> namespace: folder (the pickle folder), names (class names), files ({file name: (data, labels)})."""
    from types import SimpleNamespace
    rng = np.random.default_rng(seed)
    ten = dataset == "cifar10"
    classes = 10 if ten else 100
    folder = os.path.join(os.fspath(root), "cifar-10-batches-py" if ten else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    first = ["airplane"] if ten else ["apple", "aquarium_fish"]
    names = first + [f"class{c}" for c in range(len(first), classes)]
    files = {}

    def dump(name, obj):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({key(k): v for k, v in obj.items()}, f, protocol=2)   # Python-2 era files

    def batch(name, n):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, classes, n)]
        files[name] = (x, np.array(y))
        d = {"batch_label": b"batch", "labels" if ten else "fine_labels": y, "data": x, "filenames": [b"f.png"] * n}
        if not ten:
            d["coarse_labels"] = [v // 5 for v in y]
        dump(name, d)
    if ten:
        dump("batches.meta", {"label_names": [n.encode() for n in names], "num_vis": 3072})
        for i in range(1, 6):
            batch(f"data_batch_{i}", n_train)
        batch("test_batch", n_test)
    else:
        dump("meta", {"fine_label_names": [n.encode() for n in names], "coarse_label_names": [b"x"] * 20})
        batch("train", n_train)
        batch("test", n_test)
    return SimpleNamespace(folder=folder, names=names, files=files)


def write_idx(root, prefix, images, labels, gz=False):
    """MNIST-style IDX files root/{prefix}-images-idx3-ubyte and -labels-idx1-ubyte (.gz if gz)."""
    import gzip
    import struct
    os.makedirs(root, exist_ok=True)
    img = struct.pack(">BBBBIII", 0, 0, 8, 3, *images.shape) + images.tobytes()
    lab = struct.pack(">BBBBI", 0, 0, 8, 1, len(labels)) + labels.astype(np.uint8).tobytes()
    for name, blob in ((f"{prefix}-images-idx3-ubyte", img), (f"{prefix}-labels-idx1-ubyte", lab)):
        with open(os.path.join(root, name + (".gz" if gz else "")), "wb") as f:
            f.write(gzip.compress(blob) if gz else blob)


# ---- checkpoints ------------------------------------------------------------------------

def write_teacher(path, name=TEACHER, num_classes=10, seed=0, wrap="model", head_scale=None, **meta):
    """A randomly initialised registered model saved as {'model': state_dict} (the published
    layout; wrap=None for a plain state dict). head_scale multiplies the head's weights: confident,
    input-dependent logits, something for a student to learn. Returns the path."""
    import timm
    register_test_models()   # also imports models: the paper's names
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes)
    if head_scale is not None:
        with torch.no_grad():
            model.head.weight.mul_(head_scale)
    sd = model.state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({wrap: sd, **meta} if wrap else sd, path)
    return path


def small_world(base, pool=24, n_test=16, **teacher_meta):
    """CIFAR-10 pickles, a 32-px pool and a MICRO teacher file under `base` -> namespace of their paths."""
    from types import SimpleNamespace
    w = SimpleNamespace(base=base, cifar=base / "cifar", pool=base / "pool")
    write_cifar(w.cifar, n_train=2, n_test=n_test)
    write_pool(w.pool, pool, size=32)
    w.teacher = write_teacher(base / "micro.pth", name=MICRO, **teacher_meta)
    return w


class _RunsCode:
    """Unpickling this calls open(marker, 'w'): proof that code ran."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (io.open, (self.marker, "w"))


def write_run_inputs(folder, pool=24, n_train=2, n_test=20):
    """What a small stage-1 + stage-2 run reads, under folder: pool/ (blobs), cifar/ (CIFAR-10 pickles, n_train
    per training file) and teacher.pth (the tiny teacher, confident: head x40, acc1 91.0) -> folder."""
    write_blob_pool(folder / "pool", n=pool)
    write_cifar(folder / "cifar", n_train=n_train, n_test=n_test)
    write_teacher(folder / "teacher.pth", TEACHER, head_scale=40, acc1=91.0)
    return folder


def small_distill_argv(world, out, *extra):
    """DFND_DeiT-train.py on write_run_inputs' folder: 8 images selected, batch 4, CPU, probe selection and PD."""
    return ["--dataset", "cifar10", "--data_cifar", world / "cifar", "--data_imagenet", world / "pool",
            "--num_select", 8, "--teacher", TEACHER, "--teacher_dir", world / "teacher.pth",
            "--selected_file", world / "sel", "--output_dir", out, "--batch_size", 4, "--workers", 0,
            "--device", "cpu", "--attnprobe_sel", "--attnprobe_dist", *extra]


def write_code_pickle(path, marker, legacy=False):
    """A checkpoint whose unpickling would create `marker` (any loader without weights_only runs it).
    legacy=True writes a bare pickle instead of torch's zip format."""
    obj = {"model": _RunsCode(marker), "epoch": 3}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return path


def truncated_copy(src, dst, fraction=0.5):
    with open(src, "rb") as f:
        data = f.read()
    write_bytes(dst, data[: int(len(data) * fraction)])
    return dst


def hold_lock(folder):
    """Hold `folder`/.lock as another run (pid 424242) would -> a function that releases it."""
    import fcntl
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".lock"), "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write("pid 424242")
    f.flush()
    return f.close


# ---- running the CLIs -------------------------------------------------------------------

def script_path(script):
    return os.path.join(ROOT, script)


def run_script(script, *args, timeout=120, env=None):
    """Run a CLI as a real child process -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, script_path(script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **CHILD_ENV, **(env or {})})


def start_script(script, *args, env=None, stdout=None, stderr=None):
    """Start a CLI as a child process (unbuffered output, to files if given) -> Popen."""
    return subprocess.Popen([sys.executable, script_path(script), *map(str, args)], cwd=ROOT,
                            stdout=stdout or subprocess.PIPE, stderr=stderr or subprocess.PIPE,
                            env={**os.environ, **CHILD_ENV, **(env or {})})


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's store)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_launcher(nproc=2):
    """The words that start `nproc` processes under torchrun on this machine, meeting on a free port."""
    return (sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()))


def rank_env(rank, world, port):
    """The variables torchrun gives rank `rank` of a one-node group of `world` meeting on 127.0.0.1:port."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def run_ranks(script, args, out_dir, world=2, timeout=180):
    """Run a CLI as `world` gloo processes with the environment torchrun gives each (CPU) -> (exit codes,
    stderr texts). Fails the test when a rank is still running `timeout` s later (a rank left waiting)."""
    import pytest
    port = free_port()
    procs, files = [], []
    for rank in range(world):
        env = rank_env(rank, world, port)
        files += [open(os.path.join(out_dir, f"out{rank}.txt"), "w"), open(os.path.join(out_dir, f"err{rank}.txt"), "w")]
        procs.append(start_script(script, *args, env=env, stdout=files[-2], stderr=files[-1]))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank was still waiting {timeout} s after the error")
    finally:
        stop_processes(procs, files)
    errs = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"err{rank}.txt")) as f:
            errs.append(f.read())
    return codes, errs


def stop_processes(procs, files=()):
    """Kill what still runs of `procs`, then close `files` (their output)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for f in files:
        f.close()


def argv(flags):
    """{flag: value} -> argv: None and False leave the flag out, True writes it bare, a list or tuple
    writes each item."""
    out = []
    for k, v in flags.items():
        if v is None or v is False:
            continue
        out.append(k)
        if v is not True:
            out += [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
    return out


def error_lines(err):
    """The non-blank lines of a CLI's stderr."""
    return [line for line in err.splitlines() if line.strip()]


def select_flags(w, sel, **over):
    """select_data.py's flags for a small_world-like `w` (pool, a MICRO teacher file) into `sel`."""
    flags = {"--data_imagenet": w.pool, "--teacher": MICRO, "--teacher_dir": w.teacher, "--num_select": 8,
             "--selected_file": sel, "--workers": 0}
    flags.update(over)
    return flags


def distill_flags(w, d, **over):
    """DFND_DeiT-train.py's flags for `w` (as select_flags, plus its cifar): selection d/sel, output d/out."""
    flags = {"--data_cifar": w.cifar, **select_flags(w, d / "sel"), "--output_dir": d / "out",
             "--epochs": 1, "--batch_size": 8}
    flags.update(over)
    return flags


def run_flags(script, flags):
    """run_script_inprocess with a {flag: value} dict (see argv) -> exit code."""
    return run_script_inprocess(script, *argv(flags))


def run_script_inprocess(script, *args):
    """Run a CLI in this process exactly as `python script args` would (argparse, __main__ block,
    cli_main) and return its exit code: 0 when main returns, else SystemExit's code. Exceptions
    that escape (= a traceback for the user) propagate. Signal handlers are restored afterwards.
    Saves the ~7 s torch/timm import of a child process; capture output with capsys."""
    saved_argv = sys.argv
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [script_path(script), *map(str, args)]
    try:
        runpy.run_path(script_path(script), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        for s, h in saved_handlers.items():
            signal.signal(s, h)


def wait_for(predicate, timeout=60.0, interval=0.005, proc=None):
    """Poll `predicate` until true; fail early if `proc` exits first. Returns the predicate's value."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"child exited (rc {proc.returncode}) before the condition was met")
        time.sleep(interval)
    raise AssertionError("timed out waiting for a condition")


def snapshot(*roots):
    """{path: (size, mtime_ns)} of every file and {path: None} of every folder under `roots`."""
    out = {}
    for root in roots:
        root = os.fspath(root)
        if not os.path.exists(root):
            continue
        if os.path.isfile(root):
            st = os.stat(root)
            out[root] = (st.st_size, st.st_mtime_ns)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            out[dirpath] = None
            for name in filenames:
                p = os.path.join(dirpath, name)
                st = os.stat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


def assert_nothing_written(before, after, folders):
    """Between two snapshots only the requested output folders may appear (empty, or holding the run lock)."""
    allowed = {os.fspath(f) for f in folders}
    locks = {os.path.join(f, ".lock") for f in allowed}
    new = set(after) - set(before)
    assert new <= allowed | locks, sorted(new - allowed - locks)
    assert not set(before) - set(after), "files were removed"
    changed = [p for p in before if p in after and before[p] != after[p] and p not in locks]
    assert not changed, changed


# ---- slow reference versions of fast code (tests only) -------------------------------------

def random_crop_flip_reference(x, padding, dy, dx, flip):
    """Per-image version of data.apply_crop_flip: pad, crop at (dy, dx), flip where `flip`."""
    import torch.nn.functional as F
    H, W = x.shape[2:]
    out = []
    for b in range(x.shape[0]):
        p = F.pad(x[b], (padding, padding, padding, padding))
        c = p[:, int(dy[b]):int(dy[b]) + H, int(dx[b]):int(dx[b]) + W]
        out.append(c.flip(-1) if bool(flip[b]) else c)
    return torch.stack(out)


def direct_scores(model, paths, blocks=(3, 7), head=0, resize=None):
    """The score written out plainly: PIL -> tensor -> normalise (ImageNet mean/std); full attention from
    hooked norm1 outputs. resize=s: the published wild-image transform, torchvision Resize((s, s)) first."""
    import torch.nn.functional as F
    from torchvision import transforms
    steps = [transforms.Resize((resize, resize))] if resize else []
    tf = transforms.Compose(steps + [transforms.ToTensor(),
                                     transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    captured = {}
    hooks = [model.blocks[b].norm1.register_forward_hook(lambda m, i, o, b=b: captured.__setitem__(b, o))
             for b in blocks]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    out = {"value_out": F.cross_entropy(logits, logits.argmax(1), reduction="none"), "pred_out": logits.argmax(1)}
    for b in blocks:
        attn = model.blocks[b].attn
        B, N, C = captured[b].shape
        with torch.no_grad():
            qkv = attn.qkv(captured[b]).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
            a = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (C // attn.num_heads) ** -0.5, dim=-1)
        probe = a[:, head, 0, 1:]
        out[f"value_blk{b}"] = F.cosine_similarity(probe, torch.full_like(probe, 1 / probe.shape[1]), dim=1)
    return out


def hand_accuracy(model, cifar_root, mean, std):
    """Top-1 / top-5 accuracy (%) of `model` on the CIFAR-10 test pickle, computed here without our loaders."""
    with open(os.path.join(cifar_root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(raw[b"data"]).view(-1, 3, 32, 32).float() / 255
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    y = torch.tensor(raw[b"labels"])
    with torch.no_grad():
        top = model.eval()(x).topk(5, dim=1).indices
    return 100 * (top[:, 0] == y).float().mean().item(), 100 * (top == y[:, None]).any(1).float().mean().item()


# ---- the fast paths (tests/test_fast_paths.py on the CPU, tests/test_cuda_paths.py on a GPU) -------

FAST_MEAN, FAST_STD = (0.5, 0.45, 0.4), (0.25, 0.24, 0.26)   # not ImageNet's: a swapped pair would show


def peaked_vit(depth=8, dim=64, heads=2, classes=10, seed=0):
    """A small random ViT whose attention and logits are not flat, so scores and argmax mean something."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=32, patch_size=4, embed_dim=dim, depth=depth, num_heads=heads,
                          qkv_bias=True, num_classes=classes).eval().requires_grad_(False)
    with torch.no_grad():
        m.head.weight.mul_(5)
        for blk in m.blocks:
            blk.attn.qkv.weight[:2 * dim].mul_(4)   # sharper q·k
    return m


def uint8_images(n, seed=1, chans=3, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, chans, size, size), dtype=torch.uint8, generator=g)


def decode_crop_flip(out, size, padding):
    """Recover (dy, dx, flip) per image from crops of an image whose pixel (r, c) holds r*size + c + 1."""
    centre = size // 2
    v0 = out[:, 0, centre, centre].long() - 1        # always inside the source image for padding <= size/4
    v1 = out[:, 0, centre, centre + 1].long() - 1
    r0, c0, c1 = v0 // size, v0 % size, v1 % size
    flip = c1 < c0
    dy = r0 - centre + padding
    dx = torch.where(flip, c0 - (size - 1 - centre), c0 - centre) + padding
    return dy, dx, flip


# ---- the selection report ------------------------------------------------------------------

def report_page(report_md):
    """report.md -> (kept, {class: (pool, kept)}, skipped, cut or None)."""
    text = report_md.read_text()
    kept = int(re.search(r"^- kept: ([\d,]+)", text, re.M).group(1).replace(",", ""))
    skipped = int(re.search(r"(\d+) skipped \(unreadable\)", text).group(1))
    cut = re.search(r"^- cut: ([-\d.e+]+) ", text, re.M)
    rows = re.findall(r"^\| (\d+)(?: \(collapsed\))? \| ([\d,]+) \| ([\d,]+) \|", text, re.M)
    table = {int(c): (int(p.replace(",", "")), int(k.replace(",", ""))) for c, p, k in rows}
    return kept, table, skipped, float(cut.group(1)) if cut else None


def assert_report_is_the_selection(folder, report_dir=None, num_classes=10):
    """report.md's counts are selection.pt's; every picture opens."""
    report_dir = report_dir or folder / "report"
    sel = torch.load(folder / "selection.pt", weights_only=True)
    pred_all = torch.load(folder / "pred_out.pth", weights_only=True)
    kept, table, skipped, _ = report_page(report_dir / "report.md")
    assert kept == len(sel["indices"])
    want_kept = torch.bincount(sel["pred"], minlength=num_classes)
    usable = torch.isfinite(torch.load(folder / "value_out.pth", weights_only=True)) & (pred_all >= 0)
    want_pool = torch.bincount(pred_all[usable], minlength=num_classes)
    assert table == {c: (int(want_pool[c]), int(want_kept[c])) for c in range(num_classes) if want_pool[c]}
    lines = (folder / "skipped.txt").read_text().splitlines() if (folder / "skipped.txt").exists() else []
    assert skipped == len(lines)
    for name in ("histograms.png", "classes.png"):
        with Image.open(report_dir / name) as im:
            im.load()
            assert im.width > 500 and im.height > 300, name
    with Image.open(report_dir / "contact_sheet.png") as im:   # a row of 4 + 4 + 4 tiles per class in the pool
        rows = min(20, len(table))
        assert im.width == round((1.5 + 14 * 0.8) * 100) and rows * 80 <= im.height <= rows * 120 + 40
    return sel
