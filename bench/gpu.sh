#!/usr/bin/env bash
# The GPU checks, in one run: the CUDA-graph sampler's test; smoke test, throughput and MFU of
# training and encoding; quantizer throughput; sampling speed at the paper's 1.4B shape
# (growing caches against CUDA graphs); the encode stage against the bare model at 256x256;
# FID Inception throughput.
# Usage: bash bench/gpu.sh [LOG]
set -uo pipefail
log=${1:-gpu.log}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_rqtransformer.py -k cuda
  timeout 300 python3 bench/gpu_check.py
  timeout 100 python3 bench/quantizer.py --device cuda
  timeout 240 python3 bench/sampling.py --device cuda --dtype bfloat16 --width 1536 --heads 24 \
      --spatial-layers 42 --depth-layers 6 --codebook-size 16384 --batches 8 100 200 500 \
      --uncached-batch 8 --repeats 2
  timeout 150 python3 bench/encode.py --device cuda --preset imagenet256-8x8x4 --size 256 \
      --per-class 1024 --batch 128 --dtype bfloat16
  timeout 60 python3 bench/evaluate.py --device cuda --images 5000 --batch 250
  timeout 60 python3 bench/evaluate.py --device cuda --images 5000 --batch 250 --dtype bfloat16
} 2>&1 | tee "$log"
