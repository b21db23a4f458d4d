#!/usr/bin/env bash
# The GPU engine benchmark as run on a lent H100/H200 (bench/RESULTS.md): the device's python3 has torch,
# transformers and CUDA; the rest of our dependencies travel as wheels in .whl/ (see README "Benchmarks").
# The same 1/8/32-row measurements as the CPU's `make bench` (bench/engine.py), on the GPU path: the float weights
# in bf16 (the quantized serving modes are CPU-only), with prefixes and without.
# Usage: OUT=/some/dir bash bench/gpu.sh [extra bench.engine options, e.g. --new-tokens 512]
set -euo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
# 3 rounds (make bench's CPU default is 5, for that VM's noise): a lent GPU's minutes are few and its rounds steadier.
for model in llama-1b smollm2-135m; do
  python3 -m bench.engine --model "random:$model" --device cuda --dtype bfloat16 --weights fp32 --rows 1,8,32,64 \
    --repeat 3 "$@" \
    --out "$OUT/engine_gpu_$model.json" 2>&1 | tee "$OUT/engine_gpu_$model.txt"
done
# The exactness contract on the GPU: in float32, engine and PEFT one at a time should give the same greedy tokens
# (bf16 on random weights has near-flat logits, so identical-token counts there say little).
python3 -m bench.engine --model random:llama-1b --device cuda --dtype float32 --weights fp32 --rows 16 --new-tokens 32 \
  --repeat 1 --configs engine_prefixes,peft_sequential --out "$OUT/engine_gpu_fp32_equality.json" 2>&1 \
  | tee "$OUT/engine_gpu_fp32_equality.txt"
