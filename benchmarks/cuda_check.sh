#!/usr/bin/env bash
# The GPU checks of one short session on a CUDA machine: the CUDA tests (varlen flash attention, bf16 training,
# the output layer's row padding, sampler, sft.py on cuda), then the benchmark on SEDD-small in bf16:
#   1. training at 16 x 1024 tokens, eager: this project with and without the output-row padding, the original;
#   2. the same with --compile, profiled (the kernels that remain);
#   3. SFT-like padded batches (--sft-batches: packed varlen attention, prompt not scored), eager and compiled,
#      to decide whether training.compile can be on by default on CUDA;
#   4. compiled at 32 x 1024 tokens;
#   5. the sampler at 64 x 128 tokens.
#   bash benchmarks/cuda_check.sh [output_dir]        (default: benchmarks/results/cuda)
# Each step has its own time limit so that one slow step cannot eat the others' time.
set -uo pipefail
out=${1:-benchmarks/results/cuda}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
bench="$python benchmarks/bench.py --device cuda --model small --precision bf16 --steps 10"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$python -c "import torch, model.attention as a; print('torch', torch.__version__, torch.version.cuda,
  '| flash-attn package:', a.HAS_FLASH_ATTN, '| torch varlen_attn:', a.torch_varlen_attn is not None)" \
  | tee -a "$out/gpu.txt"

timeout 120 $python -m pytest -q -m gpu tests/test_cuda.py 2>&1 | tee "$out/pytest_cuda.log"

train="--task train --batch 16 --length 1024 --warmup 3"
timeout 100 $bench $train --impl ours original --json "$out/train_eager.json" 2>&1 | tee "$out/bench.log"
timeout 45 $bench $train --impl ours --no-pad-output --json "$out/train_eager_no_pad.json" 2>&1 | tee -a "$out/bench.log"
timeout 120 $bench $train --impl ours --compile --profile "$out" --json "$out/train_compile.json" \
  2>&1 | tee -a "$out/bench.log"

sft="--task train --impl ours --batch 16 --length 1024 --warmup 4 --sft-batches"
timeout 45 $bench $sft --json "$out/train_sft_eager.json" 2>&1 | tee -a "$out/bench.log"
timeout 150 $bench $sft --compile --json "$out/train_sft_compile.json" 2>&1 | tee -a "$out/bench.log"

timeout 120 $bench --task train --impl ours --batch 32 --length 1024 --warmup 3 --compile \
  --json "$out/train_compile_32.json" 2>&1 | tee -a "$out/bench.log"

timeout 90 $bench --task sample --batch 64 --length 128 --sample-steps 128 --sample-repeats 3 \
  --json "$out/sample.json" 2>&1 | tee -a "$out/bench.log"
