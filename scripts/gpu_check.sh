#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one go, most important first: the CUDA-marked tests, the
# embedded model's default run on CUDA, one calibration step at Llama-3-8B's shape, the MX quantizer
# against a tensor copy, the per-block calibration cost as d grows, and the skew exponential.
#
#   bash scripts/gpu_check.sh [OUT] [SECONDS]     # default: results/gpu_check, 480 s in all
#
# Each step gets at most its own limit and what is left of SECONDS, so a slow step cannot starve the
# rest of its budget unnoticed: OUT/summary.txt says each step's exit status and seconds (124: it ran
# out of time). Each step's output is in OUT/<step>.log; the run's record is OUT/run_record.json.
# PYTHON picks the interpreter (default .venv/bin/python, else python3).
set -u
OUT=${1:-results/gpu_check}
BUDGET=${2:-480}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT"
DEADLINE=$(($(date +%s) + BUDGET))

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 left=$((DEADLINE - $(date +%s)))
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        echo "$name: not run (the budget is spent)" | tee -a "$OUT/summary.txt"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, torch.cuda.get_device_name())"
} >"$OUT/summary.txt" 2>&1

step pytest_cuda 180 "$PYTHON" -m pytest -m cuda -p no:cacheprovider -v tests/test_mx.py tests/test_offload.py \
    tests/test_transforms.py

results=$(mktemp -d)
step run_tiny 150 "$PYTHON" run.py model=tiny logger=none device=auto "paths.results_dir=$results" \
    "paths.output_dir=$results/outputs"
cp "$results"/runs/*.json "$OUT/run_record.json" 2>/dev/null
rm -rf "$results"

step calib_8b 200 "$PYTHON" scripts/bench_calibrate.py --sizes 4096 --blocks 32 --vocab 128256 --samples 4 \
    --seq-len 2048 --steps 3 --transforms "affine qr" "affine block_diag" --modes end_to_end --device cuda

step bench_mx 120 "$PYTHON" scripts/bench_mx.py --devices cuda --size 16384 \
    --formats mxfp4_e2m1 mxfp6_e2m3 mxfp8_e4m3 nvfp4

step calib_sizes 150 "$PYTHON" scripts/bench_calibrate.py --sizes 1024 2048 4096 --seq-len 2048 --steps 4 \
    --device cuda

step skew_exp 60 "$PYTHON" scripts/bench_skew_exp.py --sizes 576 1536 4096 --device cuda
