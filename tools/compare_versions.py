#!/usr/bin/env python3
"""Prove that two checkouts of the Attention Probe repository compute the same results, bit for bit,
for the published commands (select_data.py, DFND_DeiT-train.py, torchrun, --eval_only, demo/demo.py).

    python compare_versions.py OLD_REPO NEW_REPO [--work DIR] [--only CASE ...] [--list]

1. Inputs are generated ONCE under DIR/inputs (seeded; the OLD repo's own test helpers write them, in a
   child process, so this process never imports either repository): a wild pool folder (PNG and JPEG
   images of several sizes, odd-but-valid files and broken ones), CIFAR-10 python pickles (train and test
   batches), a deit_tiny_patch4_32_teacher checkpoint and a DataParallel-style student checkpoint for
   --eval_only. DIR/inputs/manifest.json holds the sha256 of every input file; it is checked before and
   after every case (a version that writes into its inputs is an error).
2. Every case runs its command lines in OLD_REPO, then in NEW_REPO (cwd = the repo, one thread, no GPU,
   no bytecode written into the repos), writing under DIR/old/<case>/ and DIR/new/<case>/; stdout and
   stderr go to DIR/<side>/_logs/<case>/.
3. The two output trees of a case are compared file by file (rules: see COMPARISON RULES below), and the
   exit codes of every command. The report prints EQUAL / DIFFERENT / ERROR per case, the first
   differences and the notes, then "ALL EQUAL" (exit 0) or "DIFFERENCES FOUND" (exit 1).

COMPARISON RULES
  * *.pth / *.pt: torch.load(weights_only=True, map_location='cpu'), compared recursively: tensors by
    dtype, shape and their raw bytes (bit for bit: NaN payloads and -0.0 count), dicts key by key, lists
    and tuples element by element, scalars by type and value (float NaN == NaN). Keys on one side only are
    NOTES. A top-level 'args' entry (the resolved flags) and 'provenance' (git sha, versions) are compared as
    notes only, like args.json.
  * *.npy: dtype, shape and raw bytes. Other binary files (PNG figures, the uint8 pool cache): bytes, but
    curves.png, drawn from the compared log with an img/s (wall time) panel, is listed as excluded.
  * log.txt and other JSON-lines logs: every key of every line, except timing keys; key-set differences
    per line are notes; a different number of lines is a difference.
  * args.json / *.args.json: differences and missing keys are notes only (new flags may appear).
  * other *.json (summary.json, scores_meta.json, the demo's results*.json, ...): every shared key must
    be equal, timing keys excluded; keys on one side only are notes.
  * plain text (selected.txt, skipped.txt, ids.txt, manifest.csv, results.md, ...): byte equality after
    path normalisation; results.md additionally has its wall-time figures masked.
  * stdout of --eval_only: its last line, a JSON object, compared like a JSON file.
  * Everywhere: a timing key is any key containing 'seconds' or 'per_s' (train_img_per_s, train_seconds,
    epoch_seconds, img_per_s, export_seconds, total_seconds, ...) - wall time differs between any two runs.
    Strings are compared after replacing the side's run folder (DIR/old, DIR/new) by <RUN> and the
    repository path by <REPO>.
  * Skipped: *.lock files, anything under a hidden (dot) folder, __pycache__, and the demo's *.log files
    (captured terminal output: progress bars and wall times; the numbers in them are also in the
    compared log.txt / results files).
  * A file only in OLD is a difference (the new version lost an output); a file only in NEW is a note.
  * Case-specific exclusions (VOLATILE) are listed in the report when used: in demo_tiny the demo writes
    its own pool images, so their mtimes - and with them the pool fingerprint (sha256 over ids, sizes and
    mtimes) in scores_meta.json, the cache's meta.json and selection.pt - differ between any two runs.
"""
import argparse
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

GEN_VERSION = 4
TEACHER = "deit_tiny_patch4_32_teacher"
STUDENT = "deit_tiny_patch4_32"
FMNIST = "/usr/share/datasets/fashion-mnist"
NUM_SELECT = 96          # select_data cases
NUM_DISTILL = 128        # distillation cases (4 steps per epoch at batch 32)
EPOCHS = 2
PER_CLASS = 12
MAX_SHOWN = 8            # differences printed per case
CMD_TIMEOUT = 900
TIMING_EXACT = {"train_img_per_s", "train_seconds", "epoch_seconds"}
SIDES = ("old", "new")


def is_timing_key(k):
    """Wall-time keys: train_img_per_s, train_seconds, epoch_seconds, img_per_s, total_seconds, ... ('per_s' as a
    word: the demo's *_per_seed keys are results)."""
    return isinstance(k, str) and (k in TIMING_EXACT or "seconds" in k or re.search(r"(^|_)per_s(_|$)", k) is not None)


# =========================================================================================== inputs

def generate_inputs(dst, repo):
    """Runs in a child process with cwd = OLD repo: writes the inputs with the repo's own test helpers."""
    sys.path[:0] = [repo, os.path.join(repo, "tests")]
    import inspect
    import numpy as np
    import torch
    import timm
    import models  # noqa: F401  (registers the paper's model names)
    import fixtures
    torch.set_num_threads(1)
    # the CIFAR and teacher writers moved from tests/test_distill.py into tests/fixtures.py: OLD may be either
    in_fixtures = "head_scale" in inspect.signature(fixtures.write_teacher).parameters
    pool = os.path.join(dst, "pool")
    # 32-px images plus one of each odd-but-valid file (gray, palette, CMYK, 16-bit, 1600x1200 JPEG, 3x2 PNG,
    # truncated JPEG/PNG, ...) and one of each broken file (empty, cut header, text, HTML, decompression bomb)
    fixtures.write_pool(os.path.join(pool, "a32"), 200, size=32, seed=0, subfolders=4, odd=16, broken=9)
    fixtures.write_pool(os.path.join(pool, "b40"), 60, size=40, seed=1, subfolders=2)
    fixtures.write_pool(os.path.join(pool, "c24"), 40, size=24, seed=2, subfolders=1)
    fixtures.write_pool(os.path.join(pool, "d64"), 30, size=64, seed=3, subfolders=1)
    rng = np.random.default_rng(4)
    for i in range(30):                       # non-square, various sizes, both formats
        w, h = (int(v) for v in rng.integers(20, 90, 2))
        ext = ("png", "jpg")[i % 2]
        img = fixtures.smooth_rgb(w, h, 5000 + i)
        fixtures.write_bytes(os.path.join(pool, "e_rect", f"r_{i:03d}_{w}x{h}.{ext}"),
                             fixtures.encode(img, "PNG" if ext == "png" else "JPEG", quality=90))
    # CIFAR-10 python pickles: 5 train batches of 20 (for --pos_num), a test batch of 64
    if in_fixtures:
        fixtures.write_cifar(os.path.join(dst, "cifar"), n_train=20, n_test=64, seed=0)
    else:
        import test_distill
        test_distill.make_cifar10(os.path.join(dst, "cifar"), n_train=100, n_test=64, seed=0)
    # teacher: the tests' tiny teacher (random init, head x40: confident, input-dependent logits, acc1 91.0
    # recorded -> noise-adaptation 0.91), with q and k of every block scaled x4 so that its attention (the
    # probe) is far from uniform and input-dependent, not the near-uniform attention of a random init
    tpath = os.path.join(dst, "teacher.pth")
    if in_fixtures:
        fixtures.write_teacher(tpath, TEACHER, seed=0, head_scale=40, acc1=91.0)
    else:
        test_distill.save_tiny_teacher(tpath, seed=0)
    ck = torch.load(tpath, weights_only=True)
    sd = ck["model"]
    for k in sd:
        if k.endswith("attn.qkv.weight"):
            d = sd[k].shape[1]
            sd[k][:2 * d] *= 4.0
    # ... and its logits standardised per class on 256 images that are not in the pool (head rescaled and
    # re-biased): every class gets predicted, instead of one class for nearly every image
    model = timm.create_model(TEACHER, num_classes=10)
    model.load_state_dict(sd)
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.stack([torch.from_numpy(np.asarray(fixtures.smooth_rgb(32, 32, 90000 + i))).permute(2, 0, 1)
                     for i in range(256)]).float() / 255
    with torch.no_grad():
        feats = model.forward_head(model.forward_features((x - mean) / std), pre_logits=True)
        logits = feats @ sd["head.weight"].T + sd["head.bias"]
        mu, sigma = logits.mean(0), logits.std(0)
        scale = 3.0 / sigma
        sd["head.weight"] = sd["head.weight"] * scale[:, None]
        sd["head.bias"] = (sd["head.bias"] - mu) * scale
    torch.save(ck, tpath)
    # a student checkpoint in DataParallel form (state_dict, 'module.' prefix) for --eval_only
    torch.manual_seed(1)
    student = timm.create_model(STUDENT, num_classes=10)
    torch.save({"state_dict": {"module." + k: v for k, v in student.state_dict().items()}},
               os.path.join(dst, "student_dp.pth"))


def sha256_file(path):
    # not utils.file_sha256: this script imports neither of the repositories it compares
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_hashes(root, skip=("manifest.json",)):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if rel in skip:
                continue
            st = os.lstat(p)
            out[rel] = [sha256_file(p), st.st_mtime_ns]
    return out


def ensure_inputs(work, old_repo, py):
    inp = os.path.join(work, "inputs")
    manifest = os.path.join(inp, "manifest.json")
    if os.path.exists(manifest):
        m = json.load(open(manifest))
        if m.get("version") == GEN_VERSION and tree_hashes(inp) == m["files"]:
            print(f"inputs: reusing {inp} ({len(m['files'])} files, generated by {m['generated_by']})")
            return inp, m
        print(f"inputs: {inp} is stale or was modified: generating again")
    shutil.rmtree(inp, ignore_errors=True)
    os.makedirs(inp)
    t0 = time.time()
    proc = subprocess.run([py, os.path.abspath(__file__), "--_generate", inp, "--_repo", old_repo],
                          cwd=old_repo, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: generating the inputs failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    files = tree_hashes(inp)
    m = {"version": GEN_VERSION, "generated_by": os.path.abspath(old_repo), "files": files}
    with open(manifest, "w") as f:
        json.dump(m, f, indent=1)
    print(f"inputs: generated {len(files)} files in {inp} in {time.time() - t0:.1f}s")
    return inp, m


# =========================================================================================== cases

class Cmd:
    def __init__(self, argv, json_stdout=False, module=None):
        self.argv, self.json_stdout, self.module = argv, json_stdout, module


class Copy:
    """Copy a folder of this case (harness step, the same on both sides), leaving out `exclude` names."""
    def __init__(self, src, dst, exclude=()):
        self.src, self.dst, self.exclude = src, dst, tuple(exclude)


SELECTION_OUTPUTS = ("selection.pt", "selected.txt", "class_weights.pth", ".lock")


def build_cases(inp):
    P, C, T = (os.path.join(inp, x) for x in ("pool", "cifar", "teacher.pth"))

    def sel(folder, *extra, seed="0", workers="0"):
        return Cmd(["select_data.py", "--data_imagenet", P, "--teacher", TEACHER, "--teacher_dir", T,
                    "--num_select", str(NUM_SELECT), "--selected_file", "{O}/" + folder, "--device", "cpu",
                    "--workers", workers, "--seed", seed, *extra])

    def dist_args(*extra, epochs=EPOCHS, out="out", selected="sel"):
        return ["DFND_DeiT-train.py", "--dataset", "cifar10", "--data_cifar", C, "--data_imagenet", P,
                "--teacher", TEACHER, "--teacher_dir", T, "--num_select", str(NUM_DISTILL),
                "--selected_file", "{O}/" + selected, "--output_dir", "{O}/" + out, "--nb_classes", "10",
                "--epochs", str(epochs), "--batch_size", "32", "--seed", "0", "--device", "cpu",
                "--workers", "0", *extra]

    pd = ("--attnprobe_sel", "--attnprobe_dist")
    cases = {
        "select_attnprobe": dict(steps=[sel("sel", "--attnprobe_sel", workers="2")],
                                 what="published probe rule (2 decoding workers)"),
        "select_outlier": dict(steps=[sel("sel"), Copy("sel", "sel_per_class", SELECTION_OUTPUTS),
                                      sel("sel_per_class", "--per_class", str(PER_CLASS))],
                               what="DFND rule, then --per_class on the reused scores"),
        "select_random": dict(steps=[sel("sel", "--random", seed="3")], what="--random --seed 3"),
        "select_rule_confidence": dict(
            steps=[sel("sel", "--rule", "confidence"),
                   sel("sel_signals", "--attnprobe_sel", "--store_signals"),
                   Copy("sel_signals", "sel_reuse", SELECTION_OUTPUTS),
                   sel("sel_reuse", "--rule", "confidence", "--per_class", str(PER_CLASS))],
            what="--rule confidence; --store_signals; --rule on the stored signals"),
        "distill_pd": dict(steps=[Cmd(dist_args(*pd))], what="selection + KD + NA + PD, 2 epochs"),
        "distill_robust": dict(steps=[Cmd(dist_args("--attnprobe_sel", "--robust", "--holdout", "0.1"))],
                               what="class-weighted KD, 10% held out"),
        "distill_pos_num": dict(steps=[Cmd(dist_args(*pd, "--pos_num", "2"))], what="+2 labeled images per class"),
        "distill_resume": dict(steps=[Cmd(dist_args(*pd, epochs=1)), Copy("out", "out_after_epoch1", (".lock",)),
                                      Cmd(dist_args(*pd))],
                               what="1 epoch, then the same command with --epochs 2 (extended from last.pth)"),
        "distill_torchrun": dict(steps=[Cmd(dist_args(*pd), module=["-m", "torch.distributed.run", "--standalone",
                                                                    "--nproc_per_node", "2"])],
                                 what="torchrun, 2 gloo ranks on the CPU"),
        "eval_only": dict(steps=[Cmd(["DFND_DeiT-train.py", "--data_cifar", C, "--eval_only",
                                      "{RUN}/distill_pd/out/student/final.pth", "--device", "cpu", "--workers", "0"],
                                     json_stdout=True),
                                 Cmd(["DFND_DeiT-train.py", "--dataset", "cifar10", "--data_cifar", C, "--eval_only",
                                      os.path.join(inp, "student_dp.pth"), "--device", "cpu", "--workers", "0"],
                                     json_stdout=True)],
                          requires=["distill_pd"],
                          what="this side's distill_pd final.pth; a shared DataParallel student file"),
        "demo_tiny": dict(steps=[Cmd(["demo/demo.py", "--tiny", "--out", "{O}/demo", "--fmnist", FMNIST,
                                      "--device", "cpu"])],
                          what="Fashion-MNIST demo, --tiny preset",
                          # fnmatch: '*' also matches '/'
                          volatile=[("demo/*scores_meta.json", ("pool",)),
                                    ("demo/*scores_meta.json", ("teacher_sha256",)),
                                    ("demo/*/cache/meta.json", ("fingerprint",)),
                                    ("demo/*selection.pt", ("scores", "pool")),
                                    ("demo/*selection.pt", ("scores", "teacher_sha256"))]),
    }
    return cases


def child_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT", "LOCAL_RANK", "RANK",
                                                            "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="",
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def render(argv, run_dir, case_dir):
    return [a.replace("{O}", case_dir).replace("{RUN}", run_dir) for a in argv]


def run_case(name, case, repo, run_dir, py, log):
    """Run a case's steps in `repo` -> list of step results."""
    case_dir = os.path.join(run_dir, name)
    log_dir = os.path.join(run_dir, "_logs", name)
    for d in (case_dir, log_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    results = []
    for k, step in enumerate(case["steps"]):
        if isinstance(step, Copy):
            src, dst = os.path.join(case_dir, step.src), os.path.join(case_dir, step.dst)
            if os.path.isdir(src):
                shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(*step.exclude))
            results.append(dict(kind="copy", text=f"copy {step.src} -> {step.dst} (without {', '.join(step.exclude)})"))
            continue
        argv = [py, *(step.module or []), *render(step.argv, run_dir, case_dir)]
        out_path, err_path = (os.path.join(log_dir, f"cmd{k}.{s}") for s in ("stdout", "stderr"))
        t0 = time.time()
        with open(out_path, "w") as fo, open(err_path, "w") as fe:
            proc = subprocess.Popen(["nice", "-n", "10", *argv], cwd=repo, env=child_env(), stdout=fo, stderr=fe,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=CMD_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)   # the group this harness started (torchrun's ranks too)
                proc.wait()
                rc = "timeout"
        seconds = time.time() - t0
        results.append(dict(kind="cmd", argv=argv, rc=rc, seconds=seconds, stdout=out_path, stderr=err_path,
                            json_stdout=step.json_stdout))
        log(f"    [{os.path.basename(run_dir)}] cmd{k}: rc {rc}, {seconds:.1f}s")
    return results


# =========================================================================================== comparison

class Report:
    def __init__(self, norm_old, norm_new):
        self.diffs, self.notes, self.compared, self.current = [], [], 0, "commands"
        self.excluded = {}      # reason -> set of what was left out
        self.args_notes = {}    # "key: old vs new" -> files
        self.norm = {"old": norm_old, "new": norm_new}

    def diff(self, text):
        self.diffs.append((self.current, text))

    def shown_diffs(self, limit):
        """The first difference of each file (up to `limit`), then more of the same files."""
        first, rest = [], []
        seen = set()
        for where, text in self.diffs:
            (rest if where in seen else first).append(text)
            seen.add(where)
        return (first + rest)[:limit], len({w for w, _ in self.diffs})

    def note(self, text):
        self.notes.append(text)

    def args_note(self, where, text):
        """A difference in the resolved arguments (args.json, a checkpoint's 'args'): grouped over files."""
        key = where[len(self.current):] if where.startswith(self.current) else where
        key = key[len("['args']"):] if key.startswith("['args']") else key
        self.args_notes.setdefault(f"{key or '(args)'}: {text}", set()).add(self.current)

    def exclude(self, reason, what):
        self.excluded.setdefault(reason, set()).add(what)


def make_normaliser(run_dir, repo):
    pairs = sorted([(os.path.abspath(run_dir), "<RUN>"), (os.path.realpath(run_dir), "<RUN>"),
                    (os.path.abspath(repo), "<REPO>"), (os.path.realpath(repo), "<REPO>")],
                   key=lambda p: -len(p[0]))

    def norm(s):
        for a, b in pairs:
            s = s.replace(a, b)
        return s
    return norm


def fmt(v, limit=80):
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


def _bits_equal_torch(a, b):
    import torch
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    if a.is_sparse or b.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    x, y = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
    try:
        return torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    except RuntimeError:
        return torch.equal(x, y)


def _tensor_diff_text(a, b):
    import torch
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"dtype/shape {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    try:
        x, y = a.detach().double(), b.detach().double()
        ne = ~((x == y) | (x.isnan() & y.isnan()))
        d = (x - y).abs()
        d = d[torch.isfinite(d)]
        mx = float(d.max()) if d.numel() else float("nan")
        if int(ne.sum()) == 0:
            return "equal values, different bits (signed zeros or NaN payloads)"
        return f"{int(ne.sum())}/{a.numel()} elements differ, max abs diff {mx:.3g}"
    except Exception:
        return "tensors differ"


def _scalar_equal(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


def cmp_values(a, b, where, rep, note_only=False, volatile=()):
    """Recursive comparison; differences go to rep.diffs (or rep.notes when note_only)."""
    import numpy as np
    try:
        import torch
    except ImportError:
        torch = None
    if note_only:
        def out(text):
            head, _, tail = text.partition(": ")
            rep.args_note(head, tail)
    else:
        out = rep.diff
    if torch is not None and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if not _bits_equal_torch(a, b):
            out(f"{where}: {_tensor_diff_text(a, b)}")
        return
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            out(f"{where}: {np_diff_text(a, b)}")
        return
    if isinstance(a, dict) and isinstance(b, dict):
        ka, kb = set(a), set(b)
        for side, keys in (("old", ka - kb), ("new", kb - ka)):
            if keys:
                text = f"keys only in {side}: {sorted(map(str, keys))}"
                rep.args_note(where, text) if note_only else rep.note(f"{where}: {text}")
        for k in [k for k in a if k in b]:
            if is_timing_key(k):
                rep.exclude("timing keys", k)
                continue
            if (k,) in volatile:
                rep.exclude(f"volatile ({VOLATILE_WHY})", re.sub(r"^.*/", "", f"{where}[{k!r}]"))
                continue
            sub = tuple(v[1:] for v in volatile if v and v[0] == k)
            cmp_values(a[k], b[k], f"{where}[{k!r}]", rep, note_only, sub)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) and not note_only:
            rep.note(f"{where}: {type(a).__name__} in old, {type(b).__name__} in new")
        if len(a) != len(b):
            out(f"{where}: length {len(a)} vs {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            cmp_values(x, y, f"{where}[{i}]", rep, note_only, volatile)
        return
    if isinstance(a, str) and isinstance(b, str):
        if rep.norm["old"](a) != rep.norm["new"](b):
            out(f"{where}: {fmt(a)} vs {fmt(b)}")
        return
    if isinstance(a, (int, float, bool, type(None), bytes, complex)) or isinstance(b, (int, float, bool, type(None))):
        if not _scalar_equal(a, b):
            extra = ""
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
                try:
                    extra = f" (abs diff {abs(a - b):.3g})"
                except Exception:
                    pass
            out(f"{where}: {fmt(a)} ({type(a).__name__}) vs {fmt(b)} ({type(b).__name__}){extra}")
        return
    if type(a) is not type(b):
        out(f"{where}: type {type(a).__name__} vs {type(b).__name__}")
        return
    if a != b:
        out(f"{where}: {fmt(a)} vs {fmt(b)}")


VOLATILE_WHY = ("pool fingerprint over file mtimes, teacher file hash over its recorded git sha; the demo writes "
                "its own pool images and trains its own teacher")


def np_diff_text(a, b):
    import numpy as np
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"dtype/shape {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
    try:
        x, y = a.astype(np.float64), b.astype(np.float64)
        ne = ~((x == y) | (np.isnan(x) & np.isnan(y)))
        d = np.abs(x - y)
        d = d[np.isfinite(d)]
        if int(ne.sum()) == 0:
            return "equal values, different bits (signed zeros or NaN payloads)"
        return f"{int(ne.sum())}/{a.size} elements differ, max abs diff {float(d.max()) if d.size else float('nan'):.3g}"
    except Exception:
        return "arrays differ"


def load_torch(path):
    import torch
    return torch.load(path, weights_only=True, map_location="cpu")


def cmp_torch_file(pa, pb, rel, rep, volatile):
    try:
        a = load_torch(pa)
    except Exception as e:
        a = e
    try:
        b = load_torch(pb)
    except Exception as e:
        b = e
    if isinstance(a, Exception) or isinstance(b, Exception):
        if isinstance(a, Exception) and isinstance(b, Exception):
            rep.note(f"{rel}: neither side loads with weights_only=True; compared as bytes")
            cmp_bytes(pa, pb, rel, rep)
        else:
            rep.diff(f"{rel}: loads on one side only (old: {fmt(a)}, new: {fmt(b)})")
        return
    for key in ("args", "provenance"):   # the flags, the code's versions (a git sha differs between any two)
        if isinstance(a, dict) and isinstance(b, dict) and (key in a or key in b):
            if key in a and key in b:
                cmp_values(a[key], b[key], f"{rel}[{key!r}]", rep, note_only=True)
            a = {k: v for k, v in a.items() if k != key}
            b = {k: v for k, v in b.items() if k != key}
    cmp_values(a, b, rel, rep, volatile=volatile)


def cmp_npy(pa, pb, rel, rep):
    import numpy as np
    try:
        a, b = np.load(pa, mmap_mode="r", allow_pickle=False), np.load(pb, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        rep.note(f"{rel}: not a plain .npy ({e}); compared as bytes")
        return cmp_bytes(pa, pb, rel, rep)
    if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc") \
            or np.asarray(a).tobytes() != np.asarray(b).tobytes():
        rep.diff(f"{rel}: {np_diff_text(np.asarray(a), np.asarray(b))}")


def cmp_bytes(pa, pb, rel, rep):
    if os.path.getsize(pa) != os.path.getsize(pb) or sha256_file(pa) != sha256_file(pb):
        rep.diff(f"{rel}: bytes differ ({os.path.getsize(pa)} vs {os.path.getsize(pb)} bytes)")


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


def mask_markdown(text):
    """results.md: the wall time and every table's 'seconds' column differ between any two runs."""
    text = re.sub(r"Total wall time: [0-9.]+ min", "Total wall time: <masked> min", text)
    out, col = [], None
    for line in text.split("\n"):
        if line.startswith("|"):
            cells = line.split("|")
            heads = [c.strip() for c in cells]
            if "seconds" in heads:
                col = heads.index("seconds")
            elif col is not None and len(cells) > col and not set(cells[col].strip()) <= set("-:"):
                cells[col] = " <masked> "
                line = "|".join(cells)
        else:
            col = None
        out.append(line)
    return "\n".join(out)


def cmp_text(pa, pb, rel, rep, masker=None):
    a, b = rep.norm["old"](read_text(pa)), rep.norm["new"](read_text(pb))
    if masker:
        a, b = masker(a), masker(b)
    if a == b:
        return
    la, lb = a.split("\n"), b.split("\n")
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            rep.diff(f"{rel} line {i + 1}: {fmt(x, 100)} vs {fmt(y, 100)}")
            return
    rep.diff(f"{rel}: {len(la)} vs {len(lb)} lines")


def parse_json_lines(path):
    lines = []
    for ln in read_text(path).splitlines():
        if ln.strip():
            lines.append(json.loads(ln))
    return lines


def cmp_json_lines(pa, pb, rel, rep):
    try:
        a, b = parse_json_lines(pa), parse_json_lines(pb)
    except ValueError:
        return cmp_text(pa, pb, rel, rep)
    if len(a) != len(b):
        rep.diff(f"{rel}: {len(a)} vs {len(b)} lines")
    for i, (x, y) in enumerate(zip(a, b)):
        cmp_values(x, y, f"{rel} line {i + 1}", rep)


def cmp_json(pa, pb, rel, rep, note_only=False, volatile=()):
    try:
        a, b = json.loads(read_text(pa)), json.loads(read_text(pb))
    except ValueError:
        return cmp_text(pa, pb, rel, rep)
    cmp_values(a, b, rel, rep, note_only=note_only, volatile=volatile)


def walk(root):
    """{relative path: absolute path} of the files and symlinks to compare, and the skipped ones."""
    files, skipped = {}, []
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            p = os.path.join(dirpath, d)
            if d.startswith(".") or d == "__pycache__":
                skipped.append(os.path.relpath(p, root) + "/")
            elif os.path.islink(p):
                files[os.path.relpath(p, root)] = p
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if name.endswith(".lock") or name.startswith(".") or name.endswith(".log"):
                skipped.append(rel)
            else:
                files[rel] = p
    return files, skipped


def compare_file(pa, pb, rel, rep, volatile_rules):
    vol = tuple(keys for pattern, keys in volatile_rules if fnmatch.fnmatch(rel, pattern))
    rep.current = rel
    name = os.path.basename(rel)
    la, lb = os.path.islink(pa), os.path.islink(pb)
    if la or lb:
        if la and lb:
            if rep.norm["old"](os.readlink(pa)) != rep.norm["new"](os.readlink(pb)):
                rep.diff(f"{rel}: symlink targets {os.readlink(pa)} vs {os.readlink(pb)}")
        else:
            rep.diff(f"{rel}: a symlink on one side only")
        return
    if name == "curves.png" or name.endswith(".curves.png"):
        # drawn from the log beside it (compared), with an img/s panel: wall time, differs between any two runs
        rep.exclude("curves.png (the log it draws is compared; its img/s panel is wall time)", rel)
        return
    if name.endswith((".pth", ".pt")):
        cmp_torch_file(pa, pb, rel, rep, vol)
    elif name.endswith(".npy"):
        cmp_npy(pa, pb, rel, rep)
    elif name == "log.txt" or re.search(r"log(\.\d+)?\.txt$", name):
        cmp_json_lines(pa, pb, rel, rep)
    elif name == "args.json" or name.endswith(".args.json") or re.match(r"args\.\d+\.json$", name):
        cmp_json(pa, pb, rel, rep, note_only=True)
    elif name.endswith(".json"):
        cmp_json(pa, pb, rel, rep, volatile=vol)
    elif name.endswith(".md"):
        cmp_text(pa, pb, rel, rep, masker=mask_markdown)
    elif name.endswith((".txt", ".csv", ".tsv", ".yaml", ".yml")):
        cmp_text(pa, pb, rel, rep)
    else:
        cmp_bytes(pa, pb, rel, rep)
    rep.compared += 1


def last_json_line(path):
    for ln in reversed(read_text(path).splitlines()):
        ln = ln.strip()
        if ln.startswith("{"):
            try:
                return json.loads(ln)
            except ValueError:
                pass
    return None


def compare_case(name, case, res, run_dirs, repos):
    rep = Report(make_normaliser(run_dirs["old"], repos["old"]), make_normaliser(run_dirs["new"], repos["new"]))
    ro, rn = res["old"], res["new"]
    for k, (a, b) in enumerate(zip(ro, rn)):
        if a["kind"] != "cmd":
            continue
        rep.current = f"cmd{k}"
        if a["rc"] != b["rc"]:
            rep.diff(f"cmd{k}: exit code {a['rc']} vs {b['rc']}")
        elif a["rc"] != 0:
            rep.diff(f"cmd{k}: failed on both sides (exit code {a['rc']}): nothing proven")
        for side, r in (("old", a), ("new", b)):
            if r["rc"] != 0:
                tail = read_text(r["stderr"]).strip().splitlines()[-3:]
                rep.note(f"cmd{k} {side} stderr tail: " + " | ".join(tail))
        if a["json_stdout"]:
            ja, jb = last_json_line(a["stdout"]), last_json_line(b["stdout"])
            if ja is None or jb is None:
                rep.diff(f"cmd{k} stdout: no JSON result line (old: {ja is not None}, new: {jb is not None})")
            else:
                cmp_values(ja, jb, f"cmd{k} stdout JSON", rep)
                rep.compared += 1
    fa, skipped_a = walk(os.path.join(run_dirs["old"], name))
    fb, skipped_b = walk(os.path.join(run_dirs["new"], name))
    only_old = sorted(set(fa) - set(fb))
    only_new = sorted(set(fb) - set(fa))
    for rel in only_old:
        rep.current = rel
        rep.diff(f"{rel}: only in old")
    if only_new:
        rep.note(f"files only in new: {only_new[:10]}" + (f" (+{len(only_new) - 10})" if len(only_new) > 10 else ""))
    for rel in sorted(set(fa) & set(fb)):
        try:
            compare_file(fa[rel], fb[rel], rel, rep, case.get("volatile", ()))
        except Exception as e:   # a file that cannot be read on either side is a difference, not a crash
            rep.diff(f"{rel}: comparison failed: {type(e).__name__}: {e}")
    skipped = sorted(set(skipped_a) | set(skipped_b))
    return rep, skipped


# =========================================================================================== main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("old_repo", nargs="?")
    ap.add_argument("new_repo", nargs="?")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "compare_versions"),
                    help="work folder: inputs/, old/, new/ (default $TMPDIR/compare_versions)")
    ap.add_argument("--only", nargs="+", default=None, metavar="CASE", help="run only these cases")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the commands (default: this one)")
    ap.add_argument("--list", action="store_true", help="list the cases and their commands, run nothing")
    ap.add_argument("--_generate", help=argparse.SUPPRESS)
    ap.add_argument("--_repo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._generate:
        return generate_inputs(args._generate, args._repo)
    if not args.old_repo or not args.new_repo:
        ap.error("OLD_REPO and NEW_REPO are required")
    repos = {"old": os.path.abspath(args.old_repo), "new": os.path.abspath(args.new_repo)}
    for side, r in repos.items():
        for script in ("select_data.py", "DFND_DeiT-train.py", "demo/demo.py"):
            if not os.path.isfile(os.path.join(r, script)):
                sys.exit(f"error: {side} repo {r} has no {script}")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    all_cases = build_cases(os.path.join(work, "inputs"))
    if args.list:
        for name, case in all_cases.items():
            print(f"{name}: {case['what']}")
            for s in case["steps"]:
                if isinstance(s, Copy):
                    print(f"    (copy {s.src} -> {s.dst}, without {', '.join(s.exclude)})")
                else:
                    print("    python " + " ".join([*(s.module or []), *s.argv]).replace(work, "$WORK"))
        return 0
    only = args.only or list(all_cases)
    unknown = [c for c in only if c not in all_cases]
    if unknown:
        sys.exit(f"error: unknown case(s) {unknown}; cases: {' '.join(all_cases)}")
    py = os.path.abspath(args.python) if os.sep in args.python else args.python
    inp, manifest = ensure_inputs(work, repos["old"], py)
    run_dirs = {s: os.path.join(work, s) for s in SIDES}
    # run order: the chosen cases, with the cases they need (eval_only needs distill_pd's student) first
    order = []
    for c in only:
        for dep in all_cases[c].get("requires", []):
            if dep not in order:
                order.append(dep)
        if c not in order:
            order.append(c)
    print(f"old: {repos['old']}\nnew: {repos['new']}\nwork: {work}\ncases: {' '.join(order)}\n", flush=True)
    totals = {s: 0.0 for s in SIDES}
    verdicts = {}
    for name in order:
        case = all_cases[name]
        print(f"== {name}: {case['what']}", flush=True)
        res = {}
        for side in SIDES:
            res[side] = run_case(name, case, repos[side], run_dirs[side], py, lambda t: print(t, flush=True))
            totals[side] += sum(r.get("seconds", 0) for r in res[side])
            now = tree_hashes(inp)
            if now != manifest["files"]:
                changed = sorted(k for k in set(now) | set(manifest["files"]) if now.get(k) != manifest["files"].get(k))
                sys.exit(f"error: the {side} run of {name} changed the inputs: {changed[:10]}")
        rep, skipped = compare_case(name, case, res, run_dirs, repos)
        status = "EQUAL" if not rep.diffs else "DIFFERENT"
        if any(r.get("rc") not in (0, None) for side in SIDES for r in res[side] if r["kind"] == "cmd") and \
                all(str(a.get("rc")) == str(b.get("rc")) for a, b in zip(res["old"], res["new"])):
            status = "ERROR"
        verdicts[name] = status
        t_old = sum(r.get("seconds", 0) for r in res["old"])
        t_new = sum(r.get("seconds", 0) for r in res["new"])
        print(f"   {status}  ({rep.compared} files/results compared; old {t_old:.0f}s, new {t_new:.0f}s)")
        shown, n_files = rep.shown_diffs(MAX_SHOWN)
        for d in shown:
            print(f"     - {d}")
        if rep.diffs:
            print(f"     ({len(rep.diffs)} differences in {n_files} file(s)/command(s)"
                  + (f"; first {len(shown)} shown, the first of each file first)" if len(rep.diffs) > len(shown) else ")"))
        for n in rep.notes[:MAX_SHOWN]:
            print(f"     note: {n}")
        if len(rep.notes) > MAX_SHOWN:
            print(f"     note: ... and {len(rep.notes) - MAX_SHOWN} more notes")
        for k, (text, files) in enumerate(sorted(rep.args_notes.items())):
            if k == MAX_SHOWN:
                print(f"     note: ... and {len(rep.args_notes) - MAX_SHOWN} more argument differences")
                break
            files = sorted(files)
            print(f"     note (arguments, not compared): {text}  [{len(files)} file(s), e.g. {files[0]}]")
        for reason, what in sorted(rep.excluded.items()):
            what = sorted(what)
            print(f"     excluded, {reason}: {', '.join(what[:20])}" + (f" (+{len(what) - 20})" if len(what) > 20 else ""))
        if skipped:
            print(f"     not compared: {len(skipped)} lock/hidden/.log paths")
        print(flush=True)
    print("summary:")
    for name in order:
        print(f"  {verdicts[name]:9s} {name}")
    print(f"run time: old {totals['old'] / 60:.1f} min, new {totals['new'] / 60:.1f} min")
    ok = all(v == "EQUAL" for v in verdicts.values())
    print("ALL EQUAL" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
