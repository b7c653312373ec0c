#!/usr/bin/env bash
# The GPU checks of one short session on a CUDA machine: the CUDA tests (varlen flash attention, bf16 training,
# the output layer's row padding, the compiled fused loss kernel, sampler, sft.py on cuda), then the benchmark on
# SEDD-small in bf16:
#   1. training at 16 x 1024 tokens, compiled blocks: the fused loss kernel (CUDA's default) against the eager
#      one-buffer kernel (--no-fused-loss), profiled; the same eager (no --compile);
#   2. compiled with CUDA graphs (reduce-overhead) at 32 x 1024 tokens;
#   3. the sampler at 64 x 128 tokens, 128 steps: the original, ours, ours without the output-row padding, ours
#      with compiled blocks; a profile of ours at 16 steps (where a sampler step's time goes).
#   bash benchmarks/cuda_check.sh [output_dir]        (default: benchmarks/results/cuda)
# Each step has its own time limit so that one slow step cannot eat the others' time.
set -uo pipefail
out=${1:-benchmarks/results/cuda}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
bench="$python benchmarks/bench.py --device cuda --model small --precision bf16 --steps 10"
log="$out/bench.log"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$python -c "import torch, model.attention as a; print('torch', torch.__version__, torch.version.cuda,
  '| flash-attn package:', a.HAS_FLASH_ATTN, '| torch varlen_attn:', a.torch_varlen_attn is not None)" \
  | tee -a "$out/gpu.txt"

timeout 150 $python -m pytest -q -m gpu tests/test_cuda.py 2>&1 | tee "$out/pytest_cuda.log"

train="--task train --impl ours --batch 16 --length 1024 --warmup 3"
timeout 120 $bench $train --compile --profile "$out/fused" --json "$out/train_compile.json" 2>&1 | tee "$log"
timeout 100 $bench $train --compile --no-fused-loss --json "$out/train_compile_one_buffer.json" 2>&1 | tee -a "$log"
timeout 45 $bench $train --json "$out/train_eager.json" 2>&1 | tee -a "$log"
timeout 45 $bench $train --no-fused-loss --json "$out/train_eager_one_buffer.json" 2>&1 | tee -a "$log"
timeout 110 $bench --task train --impl ours --batch 32 --length 1024 --warmup 3 --compile-mode reduce-overhead \
  --json "$out/train_reduce_overhead_32.json" 2>&1 | tee -a "$log"

sample="--task sample --batch 64 --length 128 --sample-steps 128 --sample-repeats 3"
timeout 60 $bench $sample --impl original ours --json "$out/sample.json" 2>&1 | tee -a "$log"
timeout 40 $bench $sample --impl ours --no-pad-output --json "$out/sample_no_pad.json" 2>&1 | tee -a "$log"
timeout 90 $bench $sample --impl ours --compile --json "$out/sample_compile.json" 2>&1 | tee -a "$log"
timeout 40 $bench --task sample --impl ours --batch 64 --length 128 --sample-steps 16 --sample-repeats 1 \
  --profile "$out/sample_profile" 2>&1 | tee -a "$log"
