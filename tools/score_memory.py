"""Peak memory of scoring a large pool (docs/speed.md, "Memory"): select_data.py on a generated pool of
32x32 PNGs in tar shards, with a micro ViT teacher (patch 8, dim 32, depth 2, 2 heads, probes on
blocks 0 and 1; 1000 classes by default, so probs_out is N x 1000 fp16: the memory of the per-image
arrays, not of a large model), run as a child process while this one samples the child's
/proc/PID/status every 0.1 s. Prints the peak resident memory, split into anonymous memory (what the
process itself holds) and mapped file pages (the memory-mapped cache and score arrays: page cache
the kernel can drop), plus getrusage's ru_maxrss.

    python tools/score_memory.py OUT [--images 131072] [--classes 1000] [--chunk_size 65536]

OUT keeps the pool and teacher between runs; each run scores into a fresh OUT/sel_<n>.
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def write_pool(folder, n, shard=16384):
    """n small PNGs (generated, seeded) in tar shards of `shard` images."""
    import io
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(0, n, shard):
        path = os.path.join(folder, f"{s // shard:05d}.tar")
        if os.path.exists(path):   # written by an earlier, cut-off call
            for _ in range(s, min(n, s + shard)):   # the same draws, so the later shards come out the same
                rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            continue
        with tarfile.open(path + ".part", "w") as tar:
            for i in range(s, min(n, s + shard)):
                base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize((32, 32), Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                info = tarfile.TarInfo(f"{i:08d}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
        os.replace(path + ".part", path)


TEACHER = "score_memory_vit"


def register_teacher():
    import fixtures
    fixtures.register_micro_vit(TEACHER, depth=2)


def child(argv):
    """Run select_data.py in this process with the micro teacher registered."""
    import runpy
    register_teacher()
    sys.argv = [os.path.join(ROOT, "select_data.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


def sample(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("out")
    p.add_argument("--images", type=int, default=131072)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--chunk_size", type=int, default=65536)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more select_data.py flags")
    args = p.parse_args()
    pool_dir = os.path.join(args.out, f"pool_{args.images}")
    if not os.path.isdir(pool_dir):
        write_pool(pool_dir + ".part", args.images)
        os.replace(pool_dir + ".part", pool_dir)
    teacher = os.path.join(args.out, f"{TEACHER}_{args.classes}.pth")
    if not os.path.exists(teacher):
        import timm
        import torch
        register_teacher()
        torch.manual_seed(0)
        torch.save({"model": timm.create_model(TEACHER, num_classes=args.classes).state_dict()}, teacher)
    sel = os.path.join(args.out, f"sel_{args.images}")
    shutil.rmtree(sel, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--data_imagenet", pool_dir, "--teacher",
           TEACHER, "--probe_blocks", "0", "1", "--teacher_dir", teacher, "--num_select", str(args.images // 2),
           "--selected_file", sel, "--attnprobe_sel", "--workers", "0", "--device", "cpu",
           "--chunk_size", str(args.chunk_size), *args.extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    peak = {}
    while proc.poll() is None:
        for key, value in sample(proc.pid).items():
            peak[key] = max(peak.get(key, 0), value)
        time.sleep(0.1)
    if proc.returncode:
        sys.exit(f"select_data.py failed (exit {proc.returncode})")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    mib = 2 ** 20
    print(f"{args.images:,} images, {args.classes} classes, chunk {args.chunk_size:,}: "
          f"{time.time() - t0:.0f} s; peak RSS {peak.get('VmRSS', 0) / mib:,.0f} MiB (sampled; "
          f"ru_maxrss {maxrss / mib:,.0f} MiB), of it anonymous {peak.get('RssAnon', 0) / mib:,.0f} MiB and "
          f"mapped files {peak.get('RssFile', 0) / mib:,.0f} MiB (peaks of each)")


if __name__ == "__main__":
    main()
