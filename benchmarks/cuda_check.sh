#!/usr/bin/env bash
# The GPU checks of one short session on a CUDA machine: the CUDA tests (varlen flash attention, bf16 training,
# sampler, sft.py on cuda), then the benchmark on SEDD-small: training at 1024 tokens (bf16 and fp32, this
# project and the original code path; MFU from the printed GFLOP/s) and the sampler at 128 tokens.
#   bash benchmarks/cuda_check.sh [output_dir]        (default: benchmarks/results/cuda)
# Each step has its own time limit so that one slow step cannot eat the others' time.
set -uo pipefail
out=${1:-benchmarks/results/cuda}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$python -c "import torch, model.attention as a; print('torch', torch.__version__, torch.version.cuda,
  '| flash-attn package:', a.HAS_FLASH_ATTN, '| torch varlen_attn:', a.torch_varlen_attn is not None)" \
  | tee -a "$out/gpu.txt"

timeout 150 $python -m pytest -q -m gpu tests/test_cuda.py \
  2>&1 | tee "$out/pytest_cuda.log"

timeout 150 $python benchmarks/bench.py --device cuda --model small --task train --batch 16 --length 1024 \
  --precision bf16 fp32 --steps 10 --warmup 3 --json "$out/train_small_16x1024.json" 2>&1 | tee "$out/bench.log"

timeout 90 $python benchmarks/bench.py --device cuda --model small --task sample --batch 64 --length 128 \
  --sample-steps 128 --sample-repeats 3 --precision bf16 fp32 --json "$out/sample_small_64x128.json" \
  2>&1 | tee -a "$out/bench.log"

timeout 110 $python benchmarks/bench.py --device cuda --model small --task train --impl ours --compile \
  --batch 16 --length 1024 --precision bf16 --steps 10 --warmup 3 --json "$out/train_small_16x1024_compile.json" \
  2>&1 | tee -a "$out/bench.log"
