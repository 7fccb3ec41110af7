#!/usr/bin/env bash
# The one-GPU check. On a machine with one NVIDIA GPU, from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check_out
#     bash benchmarks/gpu_check.sh --dry-run [OUT_DIR] # every step's setup, tiny sizes, on the CPU
#
# Writes one Markdown table per step into OUT_DIR and joins them into OUT_DIR/summary.md:
#   env.md                   the machine (GPU, torch, CUDA, commit)
#   step_cost_bf16.md        SGD/SAM/ASAM/SSAM variants of benchmarks/step_cost.py under bf16 autocast
#   step_cost_fp16.md        the same in fp16 with a GradScaler (SAM.step(closure, grad_scaler=...))
#   step_cost_fp32.md        benchmarks/step_cost.py itself (fp32; its opt/fb and state MB columns)
#   implicit_bf16.md         implicit SSAM with output-dim 2:4 masks (2:4 semi-structured dX) vs SAM
#   implicit_fp16.md         the same in fp16
#   fisher_cost.md           batched Fisher (SSAM-F) vs the authors' batch-1 loop, time and peak memory
# Every table has a peak-memory column (torch.cuda.max_memory_allocated per variant's step).
# Each step has its own time limit, so the whole script stays under 8 minutes; a step that fails or
# runs out of time is reported in summary.md and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ $DRY == 1 ]]; then
    DEV=cpu; FLAGS=(--dry-run --device cpu); SC=(--models resnet18:4:8 --rounds 1 --warmup 0 --scores random --only "2:4" --threads 1)
    FC=(--width 4 --num-samples 4 --repeats 1 --device cpu --no-memory --threads 1); LIMIT=120
else
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: no CUDA device is visible to torch (use --dry-run to check the setup on a CPU)" >&2
        exit 2
    fi
    DEV=cuda; FLAGS=(--device cuda); SC=(--models resnet18:64:128 --rounds 5 --warmup 2 --device cuda); FC=(--device cuda --repeats 3); LIMIT=0
fi

STATUS=()
run() {  # run NAME SECONDS CMD...: one step under its own time limit
    local name=$1 secs=$2; shift 2
    [[ $LIMIT != 0 ]] && secs=$LIMIT
    echo "== $name (limit ${secs}s): $*" >&2
    local t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    if [[ $rc == 0 ]]; then STATUS+=("| $name | ok | ${took}s |"); else
        STATUS+=("| $name | FAILED (exit $rc$([[ $rc == 124 ]] && echo ', time limit')) | ${took}s |")
        tail -5 "$OUT/$name.log" >&2
    fi
}

# Budgets in seconds (sum 450 < 8 min); each is generous for one H200-class GPU.
run env             30 python benchmarks/gpu_check.py env --out "$OUT/env.md" "${FLAGS[@]}"
run step_cost_bf16 100 python benchmarks/gpu_check.py step-cost --precision bf16 --out "$OUT/step_cost_bf16.md" "${FLAGS[@]}"
run step_cost_fp16 100 python benchmarks/gpu_check.py step-cost --precision fp16 --out "$OUT/step_cost_fp16.md" "${FLAGS[@]}"
run step_cost_fp32  80 python benchmarks/step_cost.py "${SC[@]}" --out "$OUT/step_cost_fp32.md"
run implicit_bf16   40 python benchmarks/gpu_check.py implicit --precision bf16 --out "$OUT/implicit_bf16.md" "${FLAGS[@]}"
run implicit_fp16   40 python benchmarks/gpu_check.py implicit --precision fp16 --out "$OUT/implicit_fp16.md" "${FLAGS[@]}"
run fisher_cost     60 bash -c "python benchmarks/fisher_cost.py ${FC[*]} > '$OUT/fisher_cost.md'"

{
    echo "# GPU check ($([[ $DRY == 1 ]] && echo 'DRY RUN on the CPU: setup check only' || echo "device $DEV"), $(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "| step | status | wall |"; echo "|---|---|---:|"
    printf '%s\n' "${STATUS[@]}"
    for f in env step_cost_bf16 step_cost_fp16 step_cost_fp32 implicit_bf16 implicit_fp16 fisher_cost; do
        [[ -s "$OUT/$f.md" ]] && { echo; cat "$OUT/$f.md"; }
    done
} > "$OUT/summary.md"
echo "wrote $OUT/summary.md" >&2
grep -q FAILED "$OUT/summary.md" && exit 1
exit 0
