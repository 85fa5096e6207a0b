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
#   5 benchmark 224 (GC_T5=300): benchmark.py --sections d e f --compile --seconds 1 (GC_BENCH224_ARGS) -> bench224.json
#                              (bench224.json.partial after a time limit):
#                              scoring with deit_small/deit_base_patch16_224 (bf16 eager, compiled; published fp32),
#                              the KD+NA+PD step of each -> deit_tiny_patch16_224 at batch 256 (eager, compiled,
#                              published with its NA loop and with a tensor NA), the loader on generated photo-size
#                              JPEGs at 16 workers (default, --fast_decode; published transforms at 8), end-to-end
#                              estimates of training_tinyimagenet.sh and training_imagenet.sh. Not yet run on a GPU;
#                              expected ~200 s: 4 cold compiles (part 3 compiled the 32-px scorer and 4 steps in its
#                              160 s), the fp32 published rows ~5 s each, the loaders ~15 s.
#   6 demo PD held equal (GC_T6=420): demo.py --full, mismatch pool at shares 0.2 then 0.05 (GC_DEMO_PD_SHARES; two
#                              runs sharing one teacher per seed through --teachers), seeds 0 1, rules random_pd
#                              outlier_balanced_pd probe_balanced tok_balanced_pd oracle_pd (each with PD), and
#                              GC_DEMO_PD_ARGS (default --teacher_epochs 30 --student_epochs 30 --jobs 5) ->
#                              demo_pd/. Not yet run; expected ~290 s from part 4's 157 s (pool 54 s, two teachers
#                              80 s, 8 students 46 s at 4 at once): pools 54 + ~45 s (12.6 k images at 0.05), the
#                              teachers once, 10 students at 0.2 ~60 s (5 at once), 10 at 0.05 (632 kept) ~30 s.
# Parts 1-4 (the default; 420 s on one H200) fit one 10-minute call; 5 and 6 are asked for, one call each:
#   bash tools/gpu_check.sh runs/gpu_check --part 5 --tar OUT.tgz; then the same with --part 6.
# OUTDIR/summary.txt gets one line per part as it finishes (PASS/FAIL/SKIP/TIMEOUT + key figures);
# bulky inputs (pool, checkpoints, demo images) go to GC_WORK (default /tmp/gpu_check_work), and the
# small results (bench.json, log.txt, summary.json, results*.json/md, figures) are copied into OUTDIR.
# Without CUDA every part is SKIP (exit 0) unless --cpu-smoke: then tiny sizes on the CPU, no compile,
# gloo instead of NCCL. Uses ${PYTHON:-python3}; installs nothing. Fashion-MNIST for part 4: $FMNIST,
# else data/fashion-mnist, else /usr/share/datasets/fashion-mnist, else generated IDX files (noted); so for part 6.
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

fmnist() {   # sets FM (the folder, or empty) and DATA (demo.py's data arguments)
  FM=; for d in "${FMNIST:-}" data/fashion-mnist /usr/share/datasets/fashion-mnist; do
    [ -z "$FM" ] && [ -n "$d" ] && ls "$d"/train-images-idx3-ubyte* >/dev/null 2>&1 && FM=$d; done
  if [ -n "$FM" ]; then DATA=(--fmnist "$FM"); else DATA=(--fake_data); echo "no Fashion-MNIST: generated data"; fi
}

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
    fmnist
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
  5)
    if [ "$SMOKE" = 1 ]; then ARGS=(--tiny --device cpu); else read -ra ARGS <<< "${GC_BENCH224_ARGS---seconds 1}"
      ARGS=(--device cuda --compile "${ARGS[@]}"); fi
    J=$OUTDIR/bench224.json; rm -f "$J" "$J.partial"
    "$PY" benchmark/benchmark.py --sections d e f "${ARGS[@]}" --json "$J"; rc=$?
    [ -e "$J" ] || [ -e "$J.partial" ] || exit $rc
    # after a failure bench224.json.partial holds the sections that finished: their figures still go in the line
    "$PY" - "$J" > "$OUTDIR/part5.result" <<'EOF' || exit 1
import json, os, sys
sys.path.insert(0, "benchmark")
from benchmark import tag224   # the teacher's part of the JSON keys
path = sys.argv[1] if os.path.exists(sys.argv[1]) else sys.argv[1] + ".partial"
r = json.load(open(path))
f = lambda k: "-" if r.get(k) is None else f"{r[k]:,.0f}" if r[k] > 100 else f"{r[k]:.2f}"
t = [tag224(t) for t in r.get("teachers224", [])]
score = "; ".join(f"score {k} {f(f'scoring224_{k}_img_per_s_ours_best')} ({r.get(f'scoring224_{k}_best_variant')}) "
                  f"vs {f(f'scoring224_{k}_img_per_s_published')} ({f(f'scoring224_{k}_speedup')}x)" for k in t)
step = "; ".join(f"step {k}->tiny {f(f'train224_{k}_img_per_s_ours')} ({r.get(f'train224_{k}_best_variant')}) vs "
                 f"{f(f'train224_{k}_img_per_s_published')} ({f(f'train224_{k}_speedup')}x; tensor NA "
                 f"{f(f'train224_{k}_img_per_s_published_tensor_na')})" for k in t)
load = (f"loader {r.get('loader224_workers')} workers {f('loader224_img_per_s')}, --fast_decode "
        f"{f('loader224_img_per_s_fast_decode')}, published {r.get('loader224_published_workers')} workers "
        f"{f('loader224_img_per_s_published')} img/s")
est = "; ".join(f"{s.split('_')[1].split('.')[0]} ours {e['ours_hours']:.1f} h (distillation "
                f"{e['ours_bounds']['default']['distillation']}; {e['ours_hours_fast_decode']:.1f} h fast) "
                f"vs published {e['published_hours']:.1f} h" for s, e in r.get("end_to_end_224", {}).items()
                if "ours_hours" in e)
print("; ".join(x for x in (score, step, load, est) if x) + f"; errors {r['errors'] or 'none'}"
      + ("" if path == sys.argv[1] else " (partial: stopped early)"))
sys.exit(1 if r["errors"] else 0)
EOF
    exit $rc ;;
  6)
    DEMO=$GC_WORK/demo_pd; rm -rf "$DEMO"
    fmnist
    # every rule trains with PD: their differences are the images' alone
    RULES=(--seeds 0 1 --rules random_pd outlier_balanced_pd probe_balanced tok_balanced_pd oracle_pd)
    if [ "$SMOKE" = 1 ]; then ARGS=(--tiny --device cpu); else
      read -ra ARGS <<< "${GC_DEMO_PD_ARGS---teacher_epochs 30 --student_epochs 30 --jobs 5}"
      ARGS=(--full --device cuda "${ARGS[@]}"); fi
    read -ra SHARES <<< "${GC_DEMO_PD_SHARES:-0.2 0.05}"
    # whatever the runs wrote comes along, also when the timeout stops them
    trap 'for s in "${SHARES[@]}"; do mkdir -p "$OUTDIR/demo_pd/r$s"; cp -r "$DEMO/r$s"/results*.json \
      "$DEMO/r$s"/results.md "$DEMO/r$s"/figures "$OUTDIR/demo_pd/r$s/" 2>/dev/null; done' EXIT; trap 'exit 143' TERM
    for s in "${SHARES[@]}"; do   # the first run trains one teacher per seed into --teachers, the next reuses them
      "$PY" demo/demo.py "${ARGS[@]}" --pool mismatch --relevant_share "$s" "${RULES[@]}" "${DATA[@]}" \
        --teachers "$DEMO/teachers" --out "$DEMO/r$s" || exit $?
    done
    mkdir -p "$OUTDIR/demo_pd"
    "$PY" - "$OUTDIR/demo_pd/comparisons.json" "${FM:-generated data}" "${SHARES[@]/#/$DEMO/r}" \
      > "$OUTDIR/part6.result" <<'EOF'
import json, sys
sys.path.insert(0, "demo")
from demo import compare   # the demo's spread criterion (demo.py compares with random and oracle, absent here)
out, data, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
rules = ("random_pd", "outlier_balanced_pd", "probe_balanced", "tok_balanced_pd", "oracle_pd")
parts, table = [], {}
for run in runs:
    r = json.load(open(f"{run}/results.json"))
    share = r["pool"]["relevant_share"]
    comps = [dict(a=a, b=ref, **compare(r[a]["student_acc1_per_seed"], r[ref]["student_acc1_per_seed"]))
             for ref in ("random_pd", "oracle_pd") for a in rules if a not in (ref, "random_pd")]
    table[f"{share:g}"] = {"rules": {k: {f: r[k][f] for f in ("student_acc1", "student_acc1_per_seed",
                                                               "selection_precision")} for k in rules},
                           "teacher_acc1": r["teacher_acc1"], "pool": r["pool"], "total_seconds": r["total_seconds"],
                           "comparisons": comps}
    acc = ", ".join(f"{k} {r[k]['student_acc1']:.2f} ({r[k]['selection_precision']:.2f})" for k in rules)
    vs = ", ".join(f"{c['a']} {c['diff']:+.2f}{'*' if c['beyond_spread'] else ''}" for c in comps
                   if c["b"] == "random_pd")
    parts.append(f"share {share:g}: teacher {r['teacher_acc1']:.2f}; acc1 (precision) {acc}; minus random_pd: {vs}; "
                 f"{r['total_seconds']:.0f} s")
json.dump(table, open(out, "w"), indent=1)
print(" | ".join(parts) + f" | * beyond the spread; {data}")
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
    [1-6]) PARTS+=("$1") ;;
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
NAMES=(x "cuda tests" "torchrun resume" "benchmark" "demo --full cut" "benchmark 224" "demo PD held equal")
LIMITS=(x "${GC_T1:-90}" "${GC_T2:-150}" "${GC_T3:-240}" "${GC_T4:-240}" "${GC_T5:-300}" "${GC_T6:-420}")
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
