"""tools/gpu_check.sh: without CUDA every part is a clean SKIP (CI has no GPU); with --cpu-smoke
(opt-in: AP_TEST_GPU_CHECK_SMOKE=1, ~2 min on 2 shared cores) every part runs for real at tiny sizes."""
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
NAMES = ("cuda tests", "torchrun resume", "benchmark", "demo --full cut")


def run(out, *args, timeout=60):
    env = {**os.environ, "PYTHON": sys.executable, "GC_WORK": str(out / "work"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", SCRIPT, str(out / "check"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(out))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_every_part_skips_without_cuda(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "check" / "summary.txt").read_text().splitlines()
    assert lines == [f"part {n} ({name}): SKIP (no CUDA)" for n, name in enumerate(NAMES, 1)]
    assert proc.stdout.splitlines() == lines
    assert torch.__version__ in (tmp_path / "check" / "env.txt").read_text()
    # one part on its own, and a refused argument
    assert run(tmp_path, "--part", "3").stdout.strip() == "part 3 (benchmark): SKIP (no CUDA)"
    bad = run(tmp_path, "--part", "5")
    assert bad.returncode == 2 and "unknown argument 5" in bad.stderr


@pytest.mark.skipif(not os.environ.get("AP_TEST_GPU_CHECK_SMOKE"),
                    reason="runs every part at tiny sizes (~2 min here): set AP_TEST_GPU_CHECK_SMOKE=1")
def test_cpu_smoke_runs_every_part(tmp_path):
    proc = run(tmp_path, "--cpu-smoke", "--tar", str(tmp_path / "back" / "check.tgz"), timeout=900)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "check"
    lines = (out / "summary.txt").read_text().splitlines()
    assert len(lines) == 4 and all(f"part {n} ({name}): PASS" in line
                                   for n, name, line in zip(range(1, 5), NAMES, lines)), lines
    assert "resumed after epoch 0" in lines[1]         # killed after its first epoch, not at the end
    log = [json.loads(line) for line in (out / "part2_log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["errors"] == {} and bench["scoring_img_per_s_ours"] > 0
    demo = json.loads((out / "demo_full" / "results.json").read_text())
    assert all(rule in demo for rule in ("random", "outlier", "probe_balanced", "oracle"))
    assert demo["seeds"] == [0, 1]
    with tarfile.open(tmp_path / "back" / "check.tgz") as tar:   # packed after the last part too
        names = set(tar.getnames())
        assert tar.extractfile("check/summary.txt").read().decode().splitlines() == lines
    assert {"check/bench.json", "check/part2_log.txt", "check/demo_full/results.json"} <= names
