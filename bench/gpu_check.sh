#!/usr/bin/env bash
# One short GPU window, one command: bash bench/gpu_check.sh
#
# On a fresh GPU machine with no network (PyTorch and Triton preinstalled, this project copied in as
# the working directory) it runs, each stage under its own `timeout` and all within DEADLINE_S:
#
#   0. preflight   versions, nvidia-smi, CUDA check; wheels in bench/wheels/ installed offline
#   1. gpu-tests   the tests that need a GPU (the compiled routes on CUDA first, dynamic shapes there,
#                  2^31 elements, direct launches, CUDA graphs, devices, tanh forms on the hardware),
#                  TRITON_INTERPRET unset: compiled kernels. It and stage 4 stop with SIGINT, so pytest
#                  still reports what failed before the deadline (CI runs the whole suite on CPU)
#   2. host        python -m bench host: host time per call with real launches
#   3. models      python -m bench models --models pixart --step-kinds train: eager, eager-graphs (the
#                  eager step captured whole in one CUDA graph), compiled (inductor fuses DyT's forward,
#                  our backward kernel), reduce-overhead (compiled + CUDA graphs), compiled-kernel (our
#                  kernels both ways); LayerNorm beside each. PixArt-α only: the compiled rows
#                  need most of the budget for their builds (FLUX: a later run, `--models flux`)
#   4. tests       the kernels' numeric test files on CUDA, most important first (as time allows)
#   5. kernels     python -m bench kernels --shapes all --dtypes bf16,fp32, every provider but Liger
#                  (bf16 first; torch.compile's builds of the compiled baselines take much of it); our
#                  rows carry the static model's prediction (bench/predictions.json) beside the measurement
#   6. liger       the same for LigerDyT alone, merged into the table: its autotuner compiles and
#                  times 18 configs per hidden size, dtype and pass, so it gets its own budget
#   7. inspect     python -m dyt_kernels.inspect --json: the static report (registers, round trips,
#                  the model's estimates) as this machine's Triton compiles the kernels (CI has the
#                  same report from the CPU: last, as what it adds is the machine's Triton version)
#
# The order is what the open work needs first: the GPU tests, then the host time and the training
# step under CUDA graphs and torch.compile, then the numerics suite, then the kernel benchmarks.
# The budgets (with ~15 s of preflight) add up to the deadline, so no stage starts starved.
#
# A stage that fails or times out is recorded and the next one runs. The benchmarks get a budget a
# little under their timeout so they stop cleanly; a SIGTERM from `timeout` still makes them write
# what they measured. Everything lands in $OUT when set (else bench/results/), at most 8 files:
# gpu_check.log, gpu_check.summary, inspect.json and <device>-<date>.{json,md,png} + -speedup.png.
#
# Without CUDA (a dry run on a developer machine) the tests stage is skipped (CI runs the suite on
# CPU) and the benchmarks run with --smoke on CPU, so the whole script can be checked anywhere.
#
# Knobs (environment): PYTHON, DEADLINE_S (450), GPU_TESTS_S (60), HOST_S (40), MODELS_S (130),
# TESTS_S (50), KERNELS_S (90), LIGER_S (20), INSPECT_S (35), BENCH_GIT_COMMIT (recorded in the
# results when the copied tree has no .git). Give the device call a timeout of DEADLINE_S + 60.
# Idempotent: rerunning overwrites the log and replaces the results' sections for the same day.
set -u
cd "$(dirname "$0")/.."

START=$SECONDS
# 15 minutes of device time in all: a start (1-2 min), this run, and ~4 minutes left for a rerun of
# what failed on the warm machine
DEADLINE_S=${DEADLINE_S:-450}
GPU_TESTS_S=${GPU_TESTS_S:-60}
HOST_S=${HOST_S:-40}
MODELS_S=${MODELS_S:-130}
TESTS_S=${TESTS_S:-50}
KERNELS_S=${KERNELS_S:-90}
LIGER_S=${LIGER_S:-20}
INSPECT_S=${INSPECT_S:-35}
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
SUMMARY="$DEST/gpu_check.summary"
: >"$LOG"
: >"$SUMMARY"

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET   # the suite must run the compiled kernels, not the CPU interpreter

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
record() { printf '%-10s %-28s %5ss\n' "$1" "$2" "$3" >>"$SUMMARY"; }

# The python that has torch: $PYTHON, else python3, else the project's venv.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3 python .venv/bin/python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
if [ -z "$PY" ]; then
  log "no python with torch found (set PYTHON=...)"; record preflight "fail (no torch)" 0; cat "$SUMMARY"; exit 1
fi

# Runs "$@" under a timeout no longer than the stage budget or what is left before the deadline.
# Usage: stage NAME BUDGET_S cmd...
FAILED=0
stage() {
  local name=$1 budget=$2 left t rc t0
  shift 2
  left=$((DEADLINE_S - (SECONDS - START)))
  t=$((budget < left ? budget : left))
  if [ "$t" -lt 20 ]; then
    log "== $name: skipped, ${left}s left before the deadline"; record "$name" "skipped (deadline)" 0; FAILED=1; return
  fi
  log "== $name (timeout ${t}s): $*"
  t0=$SECONDS
  timeout -s "${STAGE_SIGNAL:-TERM}" -k 15 "$t" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then record "$name" "ok" $((SECONDS - t0))
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record "$name" "timeout (rc $rc)" $((SECONDS - t0)); FAILED=1
  else record "$name" "fail (rc $rc)" $((SECONDS - t0)); FAILED=1
  fi
  log "== $name: rc $rc"
}
# The budget handed to a benchmark so it stops on its own before `timeout` fires: the stage's
# planned timeout (set by `plan`) less a margin for the row in flight and the final charts.
plan() { local left=$((DEADLINE_S - (SECONDS - START))); STAGE_T_PLANNED=$(($1 < left ? $1 : left)); }
budget_for() { local b=$(( STAGE_T_PLANNED - $1 )); echo $(( b > 10 ? b : 10 )); }

# ----- 0. preflight -------------------------------------------------------------------------------
t0=$SECONDS
log "python: $(command -v "$PY") ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
if [ -z "${BENCH_GIT_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  BENCH_GIT_COMMIT=$(git rev-parse HEAD); export BENCH_GIT_COMMIT
fi
log "commit: ${BENCH_GIT_COMMIT:-unknown}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    2>&1 | tee -a "$LOG"
fi
shopt -s nullglob
wheels=(bench/wheels/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ]; then
  SITE="${TMPDIR:-/tmp}/dyt_bench_site"
  log "installing ${#wheels[@]} wheel(s) offline into $SITE: ${wheels[*]}"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" \
      >>"$LOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$SITE"   # after the project and the image's own packages
  else
    log "wheel install failed; providers that need them will be skipped with the reason"
  fi
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
EOF
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  CUDA=1; SMOKE=()
else
  CUDA=0; SMOKE=(--smoke)
  log "no CUDA device: dry run (tests skipped, benchmarks with --smoke on CPU)"
fi
record preflight ok $((SECONDS - t0))

# ----- 1. GPU tests ---------------------------------------------------------------------------------
# The compiled routes first: inductor compiling and launching our kernels (wrap_triton in the custom
# ops) runs on no CPU, and a stage cut short by its timeout must not be what skips it.
GPU_COMPILED=(tests/test_modulate.py::test_torch_compile_fullgraph_triton_cuda
              tests/test_dynamic_shapes.py::test_compiled_routes_on_cuda_over_changing_sizes
              tests/test_dyt.py::test_int64_offsets_past_2_31_elements)
GPU_FILES=(tests/test_direct.py tests/test_cuda_graphs.py tests/test_devices.py tests/test_tanh.py)
if [ "$CUDA" -eq 1 ]; then
  # SIGINT: pytest stops as on Ctrl-C and still prints what failed (-rfE) before the deadline
  # (test_direct's stub-driver checks compile for sm_90 on the CPU and run in CI: not here)
  STAGE_SIGNAL=INT stage gpu-tests "$GPU_TESTS_S" "$PY" -m pytest -q -rfE "${GPU_COMPILED[@]}" "${GPU_FILES[@]}" \
    --deselect tests/test_direct.py::test_the_c_launch_gets_what_tritons_launcher_would_pass \
    --deselect tests/test_direct.py::test_direct_launches_run_the_kernel_specialized_for_their_integers
else
  log "== gpu-tests: skipped, no CUDA (CI runs the suite on CPU)"
  record gpu-tests "skipped (no CUDA)" 0
fi

# ----- 2. host, 3. models -----------------------------------------------------------------------------
stage host "$HOST_S" "$PY" -m bench host --out "$DEST" --rounds 10
plan "$MODELS_S"
# reduce-overhead right after compiled: the same graphs (inductor's caches make its build cheaper) under
# CUDA graphs, which the open work needs before our kernels compiled both ways (compiled-kernel)
stage models "$MODELS_S" "$PY" -m bench models --models pixart --step-kinds train --out "$DEST" \
  --compile eager,eager-graphs,compiled,reduce-overhead,compiled-kernel --budget-s "$(budget_for 25)" \
  ${SMOKE[@]+"${SMOKE[@]}"}

# ----- 4. the rest of the suite -----------------------------------------------------------------------
if [ "$CUDA" -eq 1 ]; then
  # The kernels' numerics on the hardware (its tanh forms are not the interpreter's) and the paths
  # around them, most important first. Only these files: the stage cannot finish the whole suite in
  # its budget, and collecting every file (the ecosystem tests import timm, diffusers and
  # transformers) took a third of it. CI runs the whole suite on the CPU.
  FIRST=(test_dyt test_modulate test_extremes test_layouts test_neg_views test_autograd test_signature_cache
         test_fuzz_differential test_modules test_dynamic_shapes test_saved_hooks test_dispatch_modes
         test_transforms test_subclasses)
  ORDERED=()
  for f in "${FIRST[@]}"; do [ -f "tests/$f.py" ] && ORDERED+=("tests/$f.py"); done
  DESELECT=()
  for t in "${GPU_COMPILED[@]}"; do DESELECT+=(--deselect "$t"); done
  STAGE_SIGNAL=INT stage tests "$TESTS_S" "$PY" -m pytest -q -rfE "${ORDERED[@]}" "${DESELECT[@]}"
else
  log "== tests: skipped, no CUDA (CI runs the suite on CPU)"
  record tests "skipped (no CUDA)" 0
fi

# ----- 5. kernel benchmarks, 6. Liger, 7. inspect -----------------------------------------------------
plan "$KERNELS_S"
stage kernels "$KERNELS_S" "$PY" -m bench kernels --shapes all --dtypes bf16,fp32 --out "$DEST" \
  --skip-providers liger_dyt --budget-s "$(budget_for 30)" ${SMOKE[@]+"${SMOKE[@]}"}
plan "$LIGER_S"
stage liger "$LIGER_S" "$PY" -m bench kernels --shapes all --dtypes bf16,fp32 --out "$DEST" \
  --providers liger_dyt --merge --budget-s "$(budget_for 10)" ${SMOKE[@]+"${SMOKE[@]}"}
GPU_MODEL=$("$PY" -c "import torch; print('H200' if torch.cuda.is_available() and 'H200' in torch.cuda.get_device_name(0) else 'H100')" 2>/dev/null || echo H100)
stage inspect "$INSPECT_S" "$PY" -m dyt_kernels.inspect --gpu "$GPU_MODEL" --json "$DEST/inspect.json"

log "done in $((SECONDS - START))s; files in $DEST:"
ls -la "$DEST" | tee -a "$LOG"
echo "---- gpu_check summary (stage, status, seconds) ----"
cat "$SUMMARY"
exit "$FAILED"
