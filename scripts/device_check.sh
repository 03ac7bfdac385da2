#!/usr/bin/env bash
# The GPU check, ready for the day a GPU is at hand: one run, at most 8 minutes, one report.
#
#   bash scripts/device_check.sh [--cpu] [--wheels DIR] [--out DIR] [--budget SECONDS]
#
# For a machine with one NVIDIA GPU, Python with a CUDA build of torch, h5py, numpy, PyYAML,
# tqdm, matplotlib (onnx, onnxruntime) and no network. What it lacks (hydra-core, omegaconf,
# antlr4-python3-runtime, submitit, GitPython, gitdb, smmap; atlas-ftag-tools with scipy,
# hdf5plugin and requests) comes as wheels from --wheels DIR
# (`bash scripts/device_wheels.sh DIR` fetches them where there is a network), installed with
# `pip install --no-index --target`. Salt itself runs from this checkout (src/).
#
# Steps (each with its own time limit; a failing step is reported and the next one runs):
#   1. environment: python, torch, CUDA device, varlen kernel;
#   2. the tests marked `cuda` (skipped without a GPU);
#   3. GN2 training throughput (real dimensions, batch 4000, bf16) for every attention
#      backend, eager and compiled: jets/s, peak GPU memory, ms per step by phase;
#   4. the loader's jets/s with 0/4/8/16 workers on a generated 1M-jet sample;
#   5. GN2 trained with `python -m salt.train` for 300 steps, then `python -m salt.evaluate`.
# The report (markdown) goes to OUT/device_report.md, with each step's output.
#
# --cpu runs every step at tiny sizes on a machine without a GPU (a test does, so the one
# chance on a GPU is not lost to a typo).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CPU=0
WHEELS=""
OUT_DIR="${OUT:-$ROOT/device_check_out}"
BUDGET=480
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --wheels) WHEELS="$2"; shift ;;
        --out) OUT_DIR="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
REPORT="$OUT_DIR/device_report.md"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/salt_device_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1

if [ "$CPU" = 1 ]; then
    # tiny sizes: every step runs in seconds on a laptop CPU
    SIZE="--cpu (tiny sizes)"
    MODEL=(model.embed_dim=16 model.init_net.hidden_layers=[16] model.encoder.num_layers=1
           model.encoder.out_dim=16 model.attention.num_heads=2
           model.tasks.jet_classification.hidden_layers=[8]
           model.tasks.track_origin.hidden_layers=[8]
           model.tasks.track_vertexing.hidden_layers=[8])
    BATCH=100 PRECISION=32 SAMPLE_JETS=4000 LOADER_JETS=4000 WORKERS=0,2
    BENCH_STEPS=2 BENCH_WARMUP=1 COMPILE_BACKEND=aot_eager VARIANT_TIMEOUT=120
    TRAIN_STEPS=20 NUM_VAL=1000 NUM_TEST=1000 ACCEL=cpu
else
    SIZE="GPU (real sizes)"
    MODEL=()
    BATCH=4000 PRECISION=bf16 SAMPLE_JETS=1000000 LOADER_JETS=400000 WORKERS=0,4,8,16
    BENCH_STEPS=30 BENCH_WARMUP=5 COMPILE_BACKEND=inductor VARIANT_TIMEOUT=90
    TRAIN_STEPS=300 NUM_VAL=100000 NUM_TEST=200000 ACCEL=gpu
fi

{
    echo "# salt device check"
    echo
    echo "- mode: $SIZE; started $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
    echo "- budget: $BUDGET s in all; every step below has its own limit"
    echo
} > "$REPORT"

FAILED=()
# step TITLE LIMIT_SECONDS COMMAND...: run, time, append the output to the report
step() {
    local title="$1" limit="$2"
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 10 ]; then
        printf '## %s\n\nskipped: the %s s budget is spent\n\n' "$title" "$BUDGET" >> "$REPORT"
        FAILED+=("$title (no time left)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $title (limit ${limit} s)"
    local log="$WORK/step.log" t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    {
        printf '## %s\n\n' "$title"
        printf -- '- command: `%s`\n- exit status %s after %s s' "$*" "$rc" "$took"
        [ "$rc" = 124 ] && printf ' (stopped at its %s s limit)' "$limit"
        printf '\n\n```\n'
        # the end of long outputs (progress bars and warnings first)
        grep -v -e '^\s*$' -e 'it/s\]' -e 's/it\]' "$log" | tail -n 60
        printf '```\n\n'
    } >> "$REPORT"
    tail -n 15 "$log"
    [ "$rc" = 0 ] || FAILED+=("$title (exit $rc)")
}

# ---- 1. environment ---------------------------------------------------------------------
# salt runs from a copy of src/ and conf/ outside any git checkout: its provenance check then
# needs no git executable (the machine may have none, and a copied .git without it is an error)
mkdir -p "$WORK/salt"
cp -r "$ROOT/src" "$ROOT/conf" "$WORK/salt/"
SITE="$WORK/salt/src"
if [ -n "$WHEELS" ]; then
    step "install the missing packages from $WHEELS" 120 \
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" "$WHEELS"/*.whl
    SITE="$SITE:$WORK/site"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
step "environment" 60 "$PY" - <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cpus", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "capability", p.major, p.minor)
else:
    print("gpu: none (CUDA not available)")
from salt.models.attention import varlen_kernel
print("varlen kernel (torch.nn.attention.varlen):", varlen_kernel() is not None)
import importlib.util, hydra, omegaconf, submitit, ftag  # the packages the wheels bring
print("hydra", hydra.__version__, "omegaconf", omegaconf.__version__,
      "gitpython", importlib.util.find_spec("git") is not None, "atlas-ftag-tools", ftag.__version__)
import salt
print("salt from", salt.__file__)
EOF

# ---- 2. tests ---------------------------------------------------------------------------
# in one process (they share the GPU), without pyproject's -n: that machine has no pytest-xdist
step "tests marked cuda" 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider -p no:xdist \
    -o addopts=-ra tests

# ---- 3. the sample, then training throughput per backend ---------------------------------
SAMPLE_ROOT="$WORK/sample"
DATA=(data=sample "data.sample.dir=$SAMPLE_ROOT" "data.sample.num_jets=$SAMPLE_JETS")
step "write a $SAMPLE_JETS-jet sample" 150 "$PY" -c "
from salt.data.build import ensure_sample
print(ensure_sample('$SAMPLE_ROOT', $SAMPLE_JETS, 42))"
SAMPLE="$SAMPLE_ROOT/${SAMPLE_JETS}jets_seed42_v2"

step "training throughput: every attention backend, eager and compiled" 330 \
    "$PY" scripts/bench_train.py --matrix --backends packed,varlen,padded \
    --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP" --compile-backend "$COMPILE_BACKEND" \
    --variant-timeout "$VARIANT_TIMEOUT" --json "$OUT_DIR/bench_train.json" \
    "${DATA[@]}" "${MODEL[@]}" model=GN2 "data.batch_size=$BATCH" \
    "trainer.precision=$PRECISION" data.num_workers=auto

# ---- 4. the loader ----------------------------------------------------------------------
step "loader throughput" 120 "$PY" scripts/bench_data.py "$SAMPLE/train.h5" \
    --workers "$WORKERS" --batch-size "$BATCH" --num-jets "$LOADER_JETS" --repeat 1 \
    -- model=GN2 "${MODEL[@]}"

# ---- 5. train and evaluate ----------------------------------------------------------------
RUNS="$WORK/logs"
step "train GN2 with python -m salt.train ($TRAIN_STEPS steps)" 150 "$PY" -m salt.train \
    "${DATA[@]}" "${MODEL[@]}" force=true logger=local "log_dir=$RUNS" \
    "trainer.max_steps=$TRAIN_STEPS" trainer.max_epochs=1 "data.batch_size=$BATCH" \
    "trainer.precision=$PRECISION" "trainer.accelerator=$ACCEL" "data.num_val=$NUM_VAL" \
    trainer.progress_bar=false
RUN_DIR=$(ls -d "$RUNS"/*/ 2>/dev/null | head -n 1)
step "evaluate it with python -m salt.evaluate" 90 "$PY" -m salt.evaluate \
    "run_dir=${RUN_DIR:-$RUNS/none}" "data.num_test=$NUM_TEST" progress_bar=false

# ---- summary ------------------------------------------------------------------------------
{
    echo "## summary"
    echo
    echo "- took $(( $(date +%s) - START )) s"
    if [ ${#FAILED[@]} -eq 0 ]; then
        echo "- every step passed"
    else
        for f in "${FAILED[@]}"; do echo "- FAILED: $f"; done
    fi
} >> "$REPORT"
echo "report: $REPORT"
[ ${#FAILED[@]} -eq 0 ]
