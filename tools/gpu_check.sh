#!/usr/bin/env bash
# Check a GPU machine: the CUDA paths, the real training command, the speed table and the demo.
#
#   bash tools/gpu_check.sh OUTDIR [--part N ...] [--cpu-smoke] [--tar FILE.tgz]
#
# --tar: after every part, OUTDIR is packed into FILE.tgz (for a device tool that returns few files).
#
# Parts, in order, each under `timeout` (seconds; env-overridable) and logged to OUTDIR/partN.log:
#   1 cuda tests (GC_T1=90):   tests/test_cuda_paths.py (bf16 vs fp32 scores, inductor scorer vs eager,
#                              compiled CUDA-graph distill step vs eager, on-device crop+flip statistics),
#                              the CUDA-only test of test_data.py and tests/test_fast_paths.py (less its CPU
#                              benchmark test: part 3 runs the benchmark)
#   2 torchrun (GC_T2=150):    DFND_DeiT-train.py under torchrun (NCCL) with --compile --cuda_graphs on
#                              generated CIFAR-10 pickles, a 4,096-image pool (8 scoring batches of 512: one
#                              compiled shape) and a random deit_base_patch4_32_teacher, 3 epochs: SIGKILLed
#                              once last.pth holds an epoch, rerun; checks "resumed from" mid-run, epochs 0,1,2
#                              logged once each, finite losses, test_acc1, summary.json. The issue budgets
#                              2 min; 150 s because two cold compiles (scorer, step) come before epoch 0
#   3 benchmark (GC_T3=240):   benchmark.py --compile --cuda_graphs --seconds 1 --cache_images 1024 (GC_BENCH_ARGS)
#   4 demo (GC_T4=240):        demo.py --full cut to the mismatch pool at share 0.2, seeds 0 1, rules random
#                              outlier probe_balanced oracle, and GC_DEMO_ARGS (default --teacher_epochs 15
#                              --student_epochs 15). Measured on one H200: 95 s (teachers 42 s, students 33 s,
#                              the rest pool and scoring); GC_DEMO_ARGS="--teacher_epochs 30 --student_epochs 30": 157 s.
# OUTDIR/summary.txt gets one line per part as it finishes (PASS/FAIL/SKIP/TIMEOUT + key figures);
# bulky inputs (pool, checkpoints, demo images) go to GC_WORK (default /tmp/gpu_check_work), and the
# small results (bench.json, log.txt, summary.json, results*.json/md, figures) are copied into OUTDIR.
# Without CUDA every part is SKIP (exit 0) unless --cpu-smoke: then tiny sizes on the CPU, no compile,
# gloo instead of NCCL. Uses ${PYTHON:-python3}; installs nothing. Fashion-MNIST for part 4: $FMNIST,
# else data/fashion-mnist, else /usr/share/datasets/fashion-mnist, else generated IDX files (noted).
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = --_part ]; then   # internal: one part, run by the driver below under `timeout`
  N=$2
  case $N in
  1)
    if [ "$SMOKE" = 1 ]; then export AP_TEST_DEVICE=cpu; fi
    # -v: a timeout still shows which tests passed; the CPU benchmark test is left to part 3
    "$PY" -m pytest -v -p no:cacheprovider --durations 5 --junitxml "$OUTDIR/part1_junit.xml" \
      tests/test_cuda_paths.py tests/test_data.py::test_crop_flip_cuda_matches_cpu tests/test_fast_paths.py \
      -k "not benchmark_script"
    rc=$?; tail -n 1 "$OUTDIR/part1.log" | tr -d '=' | sed 's/^ *//; s/ *$//' > "$OUTDIR/part1.result"; exit $rc ;;
  2)
    D=$GC_WORK/fake; RUN=$GC_WORK/run2; rm -rf "$RUN" "$D/sel"
    if [ "$SMOKE" = 1 ]; then
      SIZES=(--pool 160 --cifar_train 100 --cifar_test 50 --teacher deit_tiny_patch4_32_teacher)
      FLAGS=(--device cpu --num_select 96 --batch_size 16 --teacher deit_tiny_patch4_32_teacher --workers 0)
    else
      SIZES=(--pool 4096 --cifar_train 2000 --cifar_test 1000 --teacher deit_base_patch4_32_teacher)
      FLAGS=(--device cuda --num_select 3000 --batch_size 128 --teacher deit_base_patch4_32_teacher --workers 4
             --compile --cuda_graphs)
    fi
    "$PY" tools/make_fake_data.py "$D" "${SIZES[@]}" || exit 3
    CMD=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 DFND_DeiT-train.py --dataset cifar10
         --data_cifar "$D/cifar" --data_imagenet "$D/pool" --teacher_dir "$D/teacher.pth" --nb_classes 10
         --selected_file "$D/sel" --output_dir "$RUN" --epochs 3 --holdout 0.1 --attnprobe_sel
         --attnprobe_dist "${FLAGS[@]}")
    echo "+ ${CMD[*]}"
    # SIGKILL to torchrun and every process under it at once (its worker runs in a session of its
    # own, and has loader workers), as a dying machine would; the lists are read before the kill
    tree() { echo "$1"; for c in $(pgrep -P "$1" || cat /proc/"$1"/task/*/children); do tree "$c"; done 2>/dev/null; }
    "${CMD[@]}" > "$OUTDIR/part2_run1.log" 2>&1 & pid=$!
    trap 'kill -KILL $(tree $pid) 2>/dev/null' EXIT; trap 'exit 143' TERM   # a timeout takes the run along
    until [ -s "$RUN/student/last.pth" ] || ! kill -0 $pid 2>/dev/null; do sleep 0.05; done
    victims=$(tree $pid); kill -KILL $victims 2>/dev/null; wait $pid; rc1=$?
    for p in $victims; do for _ in $(seq 100); do [ -d /proc/$p ] && ! grep -q ') Z' /proc/$p/stat 2>/dev/null || break
      sleep 0.05; done; done
    lines=$(grep -c '"epoch"' "$RUN/log.txt" 2>/dev/null); echo "run 1: rc $rc1, killed with ${lines:-0} epoch line(s)"
    if [ "$rc1" != 137 ] || [ "${lines:-0}" -ge 3 ]; then
      echo "run 1 was not cut off (rc $rc1, ${lines:-0} epochs): $(tail -n 1 "$OUTDIR/part2_run1.log")" > "$OUTDIR/part2.result"; exit 1
    fi
    "${CMD[@]}" > "$OUTDIR/part2_run2.log" 2>&1 || { echo "rerun failed (rc $?)" > "$OUTDIR/part2.result"; exit 1; }
    cp "$RUN/log.txt" "$OUTDIR/part2_log.txt"; cp "$RUN/summary.json" "$OUTDIR/part2_summary.json" 2>/dev/null
    "$PY" - "$RUN" "$OUTDIR/part2_run2.log" > "$OUTDIR/part2.result" <<'EOF'
import json, math, re, sys
run, log2 = sys.argv[1], open(sys.argv[2]).read()
m = re.search(r"resumed from \S+ after epoch (\d+)", log2)
rows = [json.loads(l) for l in open(f"{run}/log.txt") if l.strip()]
problems = [] if m and int(m.group(1)) < 2 else [f"the rerun did not resume mid-run ({m and m.group(0)})"]
if [r["epoch"] for r in rows] != [0, 1, 2]:
    problems.append(f"log epochs {[r['epoch'] for r in rows]}, not [0, 1, 2]")
problems += [f"epoch {r['epoch']}: {k} = {v}" for r in rows for k, v in r.items()
             if k.startswith("train_") and isinstance(v, float) and not math.isfinite(v)]
problems += [f"epoch {r['epoch']}: no test_acc1" for r in rows if "test_acc1" not in r]
summary = json.load(open(f"{run}/summary.json"))
rate = " ".join(f"{r['train_img_per_s']:.0f}" for r in rows)
print("; ".join(problems) if problems else
      f"resumed after epoch {m.group(1)}; img/s per epoch {rate}; loss {rows[-1]['train_loss']:.4f}; "
      f"test_acc1 {summary['final_acc1']:.2f}")
sys.exit(1 if problems else 0)
EOF
    ;;
  3)
    if [ "$SMOKE" = 1 ]; then ARGS=(--tiny --device cpu); else read -ra ARGS <<< "${GC_BENCH_ARGS---seconds 1 --cache_images 1024}"
      ARGS=(--device cuda --compile --cuda_graphs "${ARGS[@]}"); fi
    "$PY" benchmark/benchmark.py "${ARGS[@]}" --json "$OUTDIR/bench.json" || exit $?
    "$PY" - "$OUTDIR/bench.json" > "$OUTDIR/part3.result" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
f = lambda k: "-" if r.get(k) is None else f"{r[k]:,.0f}" if r[k] > 100 else f"{r[k]:.2f}"
print(f"scoring {f('scoring_img_per_s_ours_best')} img/s ({r.get('scoring_best_variant')}) vs published "
      f"{f('scoring_img_per_s_published')} ({f('scoring_speedup')}x); train b256 {f('train_img_per_s_batch256_ours')} "
      f"({r.get('train_best_variant_batch256')}) vs {f('train_img_per_s_batch256_published')} "
      f"({f('train_speedup_batch256')}x); large batch {f('train_img_per_s_large_batch')}; cache/core "
      f"{f('cache_img_per_s_per_core')}; errors {r['errors'] or 'none'}")
sys.exit(1 if r["errors"] else 0)
EOF
    ;;
  4)
    DEMO=$GC_WORK/demo_full; rm -rf "$DEMO"
    FM=; for d in "${FMNIST:-}" data/fashion-mnist /usr/share/datasets/fashion-mnist; do
      [ -z "$FM" ] && [ -n "$d" ] && ls "$d"/train-images-idx3-ubyte* >/dev/null 2>&1 && FM=$d; done
    if [ -n "$FM" ]; then DATA=(--fmnist "$FM"); else DATA=(--fake_data); echo "no Fashion-MNIST: generated data"; fi
    RULES=(--seeds 0 1 --rules random outlier probe_balanced oracle)
    if [ "$SMOKE" = 1 ]; then ARGS=(--tiny --device cpu); else read -ra ARGS <<< "${GC_DEMO_ARGS---teacher_epochs 15 --student_epochs 15}"
      ARGS=(--full --device cuda --pool mismatch --relevant_share 0.2 "${ARGS[@]}"); fi
    # whatever the demo wrote comes along, also when the timeout stops it (its per-epoch lines are in part4.log)
    trap 'mkdir -p "$OUTDIR/demo_full"; cp -r "$DEMO"/results*.json "$DEMO"/results.md "$DEMO"/figures \
      "$OUTDIR/demo_full/" 2>/dev/null' EXIT; trap 'exit 143' TERM
    "$PY" demo/demo.py "${ARGS[@]}" "${RULES[@]}" "${DATA[@]}" --out "$DEMO" || exit $?
    "$PY" - "$DEMO/results.json" "${FM:-generated data}" > "$OUTDIR/part4.result" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rules = "; ".join(f"{k} acc1 {r[k]['student_acc1']:.2f} prec {r[k]['selection_precision']:.3f}"
                  for k in ("random", "outlier", "probe_balanced", "oracle"))
t = r["timing"]
print(f"teacher acc1 {r['teacher_acc1']:.2f}; {rules}; {r['total_seconds']:.0f} s (teachers {t['teacher_seconds']:.0f}, "
      f"students {t['student_phase_seconds']:.0f}); {sys.argv[2]}")
EOF
    ;;
  esac
  exit
fi

# ---- driver ------------------------------------------------------------------------------------
OUTDIR=${1:?usage: tools/gpu_check.sh OUTDIR [--part N ...] [--cpu-smoke] [--tar FILE.tgz]}; shift
PARTS=(); SMOKE=0; TAR=
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --tar) TAR=${2:?--tar needs a file}; shift; mkdir -p "$(dirname "$TAR")"; TAR=$(cd "$(dirname "$TAR")" && pwd)/$(basename "$TAR") ;;
    --part) ;;
    [1-4]) PARTS+=("$1") ;;
    *) echo "error: unknown argument $1 (expected --part N ... or --cpu-smoke)" >&2; exit 2 ;;
  esac; shift
done
[ ${#PARTS[@]} -gt 0 ] || PARTS=(1 2 3 4)
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
export OUTDIR SMOKE PY GC_WORK=${GC_WORK:-${TMPDIR:-/tmp}/gpu_check_work} PYTHONUNBUFFERED=1
mkdir -p "$GC_WORK"
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo "no torch in $PY")
if [ "$SMOKE" = 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
{ date -u; "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
  'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  nvidia-smi 2>/dev/null; } > "$OUTDIR/env.txt" 2>&1
NAMES=(x "cuda tests" "torchrun resume" "benchmark" "demo --full cut")
LIMITS=(x "${GC_T1:-90}" "${GC_T2:-150}" "${GC_T3:-240}" "${GC_T4:-240}")
for n in "${PARTS[@]}"; do
  head="part $n (${NAMES[$n]}):"
  if [ "$CUDA" != 1 ] && [ "$SMOKE" != 1 ]; then echo "$head SKIP ($([ "$CUDA" = 0 ] && echo no CUDA || echo "$CUDA"))" | tee -a "$OUTDIR/summary.txt"; continue; fi
  t0=$(date +%s); rm -f "$OUTDIR/part$n.result"
  timeout -k 10 "${LIMITS[$n]}" bash "$SELF" --_part "$n" > "$OUTDIR/part$n.log" 2>&1; rc=$?
  case $rc in 0) st=PASS ;; 124|137) st="TIMEOUT (${LIMITS[$n]} s)" ;; *) st="FAIL (rc $rc)" ;; esac
  info=$(cat "$OUTDIR/part$n.result" 2>/dev/null || grep -av -e Terminated -e Killed "$OUTDIR/part$n.log" | tail -n 1)
  echo "$head $st in $(( $(date +%s) - t0 )) s: $info" | tee -a "$OUTDIR/summary.txt"
  if [ -n "$TAR" ]; then tar czf "$TAR.part" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" && mv "$TAR.part" "$TAR"; fi
done
exit 0
