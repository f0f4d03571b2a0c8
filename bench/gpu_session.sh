#!/usr/bin/env bash
# Everything a lent GPU is for, in one call that fits a 10-minute command: install nf4kern into
# the machine's Python (no downloads: --no-deps, its packages are already there), check every
# kernel against the float64 reference on the GPU (nf4kern.selfcheck --large: bit-exact quant,
# every matmul / QLoRA gradient, every autotuning candidate), then time quant, matmul and LoRA
# and write their GPU sections into docs/benchmarks.md. Each stage has its own time limit, so a
# slow one cannot take the others' results with it; logs and docs/benchmarks.md go to $OUT.
#
#   device run:  bash bench/gpu_session.sh        (timeout_s 600)
set -u
OUT=${OUT:-/tmp/nf4kern-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/stages.txt"
    tail -n 3 "$OUT/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
stage install 60 "$PY" -m pip install --no-deps --no-build-isolation -e .
stage selfcheck 200 "$PY" -m nf4kern.selfcheck --large
stage quant 50 "$PY" bench/quant.py --write-docs
stage matmul 150 "$PY" bench/matmul.py --quick --write-docs
stage lora 60 "$PY" bench/lora.py --quick --write-docs
cp docs/benchmarks.md "$OUT/benchmarks.md"
