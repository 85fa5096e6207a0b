"""tools/gpu_check.sh: without CUDA every part is a clean SKIP (CI has no GPU); with --cpu-smoke
(opt-in: AP_TEST_GPU_CHECK_SMOKE=1, ~3 min on 2 shared cores) every part runs for real at tiny sizes."""
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import benchmark   # benchmark/ is on the path (conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
NAMES = ("cuda tests", "torchrun resume", "benchmark", "demo --full cut", "benchmark 224", "demo PD held equal")
DEFAULT = 4                     # parts 1-4 run by default; 5 and 6 (a 10-minute call each) when asked for
PD_RULES = ("random_pd", "outlier_balanced_pd", "probe_balanced", "tok_balanced_pd", "oracle_pd")


def run(out, *args, timeout=60):
    env = {**os.environ, "PYTHON": sys.executable, "GC_WORK": str(out / "work"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", SCRIPT, str(out / "check"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(out))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_every_part_skips_without_cuda(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "check" / "summary.txt").read_text().splitlines()
    assert lines == [f"part {n} ({name}): SKIP (no CUDA)" for n, name in enumerate(NAMES[:DEFAULT], 1)]
    assert proc.stdout.splitlines() == lines
    assert torch.__version__ in (tmp_path / "check" / "env.txt").read_text()
    # parts on their own, the two asked-for ones too, and a refused argument
    assert run(tmp_path, "--part", "3").stdout.strip() == "part 3 (benchmark): SKIP (no CUDA)"
    assert run(tmp_path, "--part", "5", "6").stdout.splitlines() == [
        f"part {n} ({NAMES[n - 1]}): SKIP (no CUDA)" for n in (5, 6)]
    bad = run(tmp_path, "--part", "7")
    assert bad.returncode == 2 and "unknown argument 7" in bad.stderr


@pytest.mark.skipif(not os.environ.get("AP_TEST_GPU_CHECK_SMOKE"),
                    reason="runs every part at tiny sizes (~3 min here): set AP_TEST_GPU_CHECK_SMOKE=1")
def test_cpu_smoke_runs_every_part(tmp_path):
    proc = run(tmp_path, "--cpu-smoke", "--tar", str(tmp_path / "back" / "check.tgz"), "--part",
               *map(str, range(1, len(NAMES) + 1)), timeout=900)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "check"
    lines = (out / "summary.txt").read_text().splitlines()
    assert len(lines) == len(NAMES) and all(f"part {n} ({name}): PASS" in line
                                            for n, name, line in zip(range(1, 7), NAMES, lines)), lines
    assert "resumed after epoch 0" in lines[1]         # killed after its first epoch, not at the end
    log = [json.loads(line) for line in (out / "part2_log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["errors"] == {} and bench["scoring_img_per_s_ours"] > 0
    demo = json.loads((out / "demo_full" / "results.json").read_text())
    assert all(rule in demo for rule in ("random", "outlier", "probe_balanced", "oracle"))
    assert demo["seeds"] == [0, 1]
    # part 5: the 224-px sections and both scripts' estimates, in its line too
    bench224 = json.loads((out / "bench224.json").read_text())
    assert bench224["errors"] == {} and bench224["loader224_img_per_s"] > 0
    assert all(bench224[k] for k in benchmark.required_keys_224())
    assert "tinyimagenet ours" in lines[4] and "imagenet ours" in lines[4]
    # part 6: both shares, every rule with PD, two seeds, the same teachers; compared with random_pd in its line
    comps = json.loads((out / "demo_pd" / "comparisons.json").read_text())
    assert sorted(comps) == ["0.05", "0.2"]
    teachers = []
    for share in ("0.2", "0.05"):
        r = json.loads((out / "demo_pd" / f"r{share}" / "results.json").read_text())
        assert r["seeds"] == [0, 1] and r["pool"]["relevant_share"] == float(share)
        assert all(rule in r for rule in PD_RULES)
        rules_line = next(x for x in (out / "demo_pd" / f"r{share}" / "results.md").read_text().splitlines()
                          if x.startswith("Rules: "))
        assert rules_line.count("with PD") == len(PD_RULES) and "no PD" not in rules_line
        teachers.append(r["teacher_checkpoints"])
        assert len(comps[share]["comparisons"]) == 2 * len(PD_RULES) - 3   # vs random_pd (4), vs oracle_pd (3)
    assert teachers[0] == teachers[1]                  # trained once, reused by the second share
    assert "share 0.2:" in lines[5] and "share 0.05:" in lines[5] and "minus random_pd" in lines[5]
    with tarfile.open(tmp_path / "back" / "check.tgz") as tar:   # packed after the last part too
        names = set(tar.getnames())
        assert tar.extractfile("check/summary.txt").read().decode().splitlines() == lines
    assert {"check/bench.json", "check/part2_log.txt", "check/demo_full/results.json", "check/bench224.json",
            "check/demo_pd/r0.05/results.json", "check/demo_pd/comparisons.json"} <= names
