#!/usr/bin/env bash
# GPU check: one script, at most ~8 minutes on one H100, in three independently time-limited parts.
#   (a) the CUDA-relevant tests (pytest): tests/test_cuda.py (TF32 flags take effect; IBP/CROWN bounds sound
#       on CUDA and equal to the CPU float64 ones; a training step on CUDA equals the CPU step; training on
#       CUDA sets TF32 as configured), tests/test_precision.py (TF32/AMP switches), tests/data/test_batches.py
#       (pinned CUDA batches equal CPU batches). These are the files `grep -l cuda tests` finds, less
#       test_bad_input.py/test_sweep.py, which only check the "CUDA is not available" messages. No MILP tests
#       (highspy is not needed).
#   (b) training throughput, CNN7 on CIFAR shapes: images/s of forward, forward+IBP, a CC-IBP step, a CC-Dist
#       step, and the CC-IBP step with each option: TF32 (--tf32), the attack in bf16 (--amp), torch.compile
#       (--compile, its first step timed apart) (benchmarks/gpu_throughput.py).
#   (c) a shortened MNIST comparison with CNN7 (ε = 0.1, presets mnist-0.1-*): a PGD-AT teacher, then CC-IBP,
#       CC-Dist (from the teacher) and CC-Dist towards 0 (--dist-target zero, no teacher), each a few epochs on
#       a fixed training subset; then `certkd evaluate` of all four on the first test points, as one table.
# A part that fails or hits its time limit is reported and the next part still runs; a summary ends the output.
#
# Needs only python3 with torch, numpy, click, pyyaml, safetensors, scikit-learn, tqdm, pytest; certkd is run
# from the source tree (PYTHONPATH=src), not installed.
#
# Environment (defaults in brackets):
#   OUT              where the figures go                          [benchmarks/results/gpu_check]
#   MNIST_DIR        folder with the 4 MNIST .gz files (IDX)       [data_cache/mnist]
#   RUNS             scratch folder for the part (c) runs           [$TMPDIR/certkd_gpu_check_runs]
#   DEVICE           auto, cuda or cpu                             [auto]
#   GPU_CHECK_SMALL  1: tiny sizes, for a dry run on a CPU         [0]
#   TRAIN_LIMIT, TEACHER_EPOCHS, STUDENT_EPOCHS, EVAL_LIMIT, BETA, BATCH: part (c)/(b) sizes (see below)
#   LIMIT_A, LIMIT_B, LIMIT_C: time limits of the parts in seconds [110, 170, 230]
#
# Run:  OUT=/some/dir MNIST_DIR=data_cache/mnist bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/gpu_check}
MNIST_DIR=${MNIST_DIR:-data_cache/mnist}
RUNS=${RUNS:-${TMPDIR:-/tmp}/certkd_gpu_check_runs}
DEVICE=${DEVICE:-auto}
SMALL=${GPU_CHECK_SMALL:-0}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
LIMIT_A=${LIMIT_A:-110}
LIMIT_B=${LIMIT_B:-170}
LIMIT_C=${LIMIT_C:-230}

if [ "$SMALL" = 1 ]; then   # dry run on a CPU: same logic, tiny sizes
    TRAIN_LIMIT=${TRAIN_LIMIT:-256}; TEACHER_EPOCHS=${TEACHER_EPOCHS:-1}; STUDENT_EPOCHS=${STUDENT_EPOCHS:-2}
    EVAL_LIMIT=${EVAL_LIMIT:-50}; BATCH=${BATCH:-8}
    MODEL_SET=(--set "model_kwargs={width: 4, linear: 16}")
    THROUGHPUT_ARGS=(--width 8 --linear 32 --batch "$BATCH" --repeats 2 --warmup 1 --no-compile)
else
    TRAIN_LIMIT=${TRAIN_LIMIT:-10000}; TEACHER_EPOCHS=${TEACHER_EPOCHS:-3}; STUDENT_EPOCHS=${STUDENT_EPOCHS:-6}
    EVAL_LIMIT=${EVAL_LIMIT:-1000}; BATCH=${BATCH:-128}
    MODEL_SET=()
    THROUGHPUT_ARGS=(--batch "$BATCH" --repeats 10 --warmup 3)
fi
BETA=${BETA:-0.003}   # docs/method.md §7.9: 1e-3–3e-3 with the summed distance; the presets' 1.0 is far too large

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{a_cuda_tests,b_throughput,c_mnist_comparison}.log "$OUT"/{pytest_cuda.xml,throughput.json} \
      "$OUT"/{mnist_comparison,summary}.txt   # no stale figures from an earlier run
MNIST_DIR=$(cd "$MNIST_DIR" 2>/dev/null && pwd || echo "$MNIST_DIR")   # absolute: runs are evaluated from $RUNS
export OUT MNIST_DIR RUNS DEVICE PY TRAIN_LIMIT TEACHER_EPOCHS STUDENT_EPOCHS EVAL_LIMIT BETA
START=$SECONDS
SUMMARY=()

# run_part NAME LIMIT CMD...: run CMD under `timeout LIMIT`, log to $OUT/NAME.log, record the outcome.
run_part() {
    local name=$1 limit=$2 t0=$SECONDS rc status
    shift 2
    echo "=== part $name (limit ${limit}s) ==="
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124|137) status="TIMED OUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    SUMMARY+=("$(printf '%-28s %-24s %4ds' "$name" "$status" $((SECONDS - t0)))")
    echo "=== part $name: $status ($((SECONDS - t0)) s) ==="
}

# ---------------------------------------------------------------------------------------- (a)
part_a() {
    $PY - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}"
         if torch.cuda.is_available() else ""))
EOF
    $PY -m pytest -q -rs -p no:cacheprovider -m "not slow" --junitxml="$OUT/pytest_cuda.xml" \
        tests/test_cuda.py tests/test_precision.py tests/data/test_batches.py
}

# ---------------------------------------------------------------------------------------- (b)
part_b() {
    $PY benchmarks/gpu_throughput.py --device "$DEVICE" "${THROUGHPUT_ARGS[@]}" --out "$OUT/throughput.json"
}

# ---------------------------------------------------------------------------------------- (c)
# Each command has its own limit inside the part's: teacher 60 s, each student 50 s, evaluation 40 s (250 s).
# The inner timeouts run with --foreground so that they stay in the part's process group: when the part's own
# timeout fires it kills them too (a plain inner `timeout` starts its own group and would outlive the part).
part_c() {
    local common=(--data-dir "$MNIST_DIR" --device "$DEVICE" --quiet --force
                  --set "train_limit=$TRAIN_LIMIT" --set "eval_limit=200" "${MODEL_SET[@]}")
    local se=$STUDENT_EPOCHS ramp=$((STUDENT_EPOCHS > 2 ? STUDENT_EPOCHS - 2 : 1))
    local student=(--epochs "$se" --set eps_start=1 --set "eps_length=$ramp" --set "lr_milestones=[$se]"
                   --set "test_interval=$se")
    if ! ls "$MNIST_DIR"/train-images-idx3-ubyte* >/dev/null 2>&1; then
        echo "no MNIST files in $MNIST_DIR (set MNIST_DIR to the folder with the 4 .gz files)"; return 2
    fi
    rm -rf "$RUNS"; mkdir -p "$RUNS"
    local te=$TEACHER_EPOCHS rc=0 t0
    echo "MNIST ε=0.1, CNN7${MODEL_SET[*]:+ ${MODEL_SET[*]}}, $TRAIN_LIMIT training images; teacher $te epochs (PGD-AT),"
    echo "students $se epochs (ramp $ramp), β = $BETA; evaluation on the first $EVAL_LIMIT test points"
    t0=$SECONDS
    timeout --foreground -k 5 60 $PY -m certkd teacher --preset mnist-0.1-teacher "${common[@]}" --epochs "$te" \
        --set eps_length=1 --set "lr_milestones=[$te]" --set "test_interval=$te" --out "$RUNS/teacher" \
        || { echo "teacher: failed or timed out (exit $?)"; rc=1; }
    echo "teacher: $((SECONDS - t0)) s"
    local name extra
    for name in cc-ibp cc-dist target-0; do
        t0=$SECONDS
        case $name in
            cc-ibp) extra=(--preset mnist-0.1-ccibp) ;;
            cc-dist) extra=(--preset mnist-0.1-ccdist --teacher "$RUNS/teacher" --beta "$BETA") ;;
            target-0) extra=(--preset mnist-0.1-ccdist --dist-target zero --beta "$BETA") ;;
        esac
        if [ "$name" = cc-dist ] && [ ! -e "$RUNS/teacher/checkpoints/latest" ]; then
            echo "$name: skipped (no teacher)"; rc=1; continue
        fi
        timeout --foreground -k 5 50 $PY -m certkd train "${extra[@]}" "${common[@]}" "${student[@]}" --out "$RUNS/$name" \
            || { echo "$name: failed or timed out (exit $?)"; rc=1; }
        echo "$name: $((SECONDS - t0)) s"
    done
    local runs=()
    for name in teacher cc-ibp cc-dist target-0; do
        [ -e "$RUNS/$name/checkpoints/latest" ] && runs+=("$RUNS/$name")
    done
    [ ${#runs[@]} -gt 0 ] || { echo "no run to evaluate"; return 1; }
    {
        echo "# MNIST ε=0.1 CNN7 comparison (benchmarks/gpu_check.sh part c), $(date -u +%Y-%m-%dT%H:%MZ)"
        echo "# $TRAIN_LIMIT training images; teacher PGD-AT $te epochs; students $se epochs (ε ramp $ramp), β = $BETA"
        echo "# runs in $RUNS; train seconds and last-epoch training terms per run:"
        $PY - "${runs[@]}" <<'EOF'
import json, sys
from pathlib import Path
for run in sys.argv[1:]:
    lines = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    tr = lines[-1]["train"]
    terms = ", ".join(f"{k} {tr[k]:.4g}" for k in ("loss", "robust_loss", "dist", "eps") if k in tr)
    print(f"#   {Path(run).name}: {len(lines)} epochs, {sum(r['time_s'] for r in lines):.1f} s; {terms}")
EOF
        (cd "$RUNS" && timeout --foreground -k 5 40 $PY -m certkd evaluate "${runs[@]##*/}" --limit "$EVAL_LIMIT" --device "$DEVICE")
    } 2>&1 | tee "$OUT/mnist_comparison.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
    return $rc
}

export -f part_a part_b part_c
# arrays do not survive `export`: pass them to the subshells through declarations
DECL="$(declare -p THROUGHPUT_ARGS MODEL_SET)"
export DECL

run_part a_cuda_tests "$LIMIT_A" bash -c 'eval "$DECL"; part_a'
run_part b_throughput "$LIMIT_B" bash -c 'eval "$DECL"; part_b'
run_part c_mnist_comparison "$LIMIT_C" bash -c 'eval "$DECL"; part_c'

{
    echo "=== gpu_check summary ($((SECONDS - START)) s in all; figures in $OUT) ==="
    printf '%s\n' "${SUMMARY[@]}"
    [ -f "$OUT/throughput.json" ] && $PY - "$OUT/throughput.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"throughput ({r['device_name']}, batch {r['batch']}, images/s): "
      + ", ".join(f"{k} {v['images_per_s']:.0f}" for k, v in r["rows"].items()))
EOF
    [ -f "$OUT/mnist_comparison.txt" ] && grep -E '^(eps=|\|)' "$OUT/mnist_comparison.txt"
} 2>&1 | tee "$OUT/summary.txt"
