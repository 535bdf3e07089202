#!/usr/bin/env bash
# The GPU checks, in one run: the CUDA-graph sampler's test; smoke test, throughput and MFU of
# training and encoding; quantizer throughput; sampling speed at the paper's 1.4B shape
# (growing caches against CUDA graphs); the encode stage against the bare model at 256x256;
# FID Inception throughput; the cost of deterministic kernels; a small `rqpipe demo` on the GPU.
# Usage: bash bench/gpu.sh [LOG]
set -uo pipefail
log=${1:-gpu.log}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_rqtransformer.py -k cuda
  timeout 300 python3 bench/gpu_check.py
  timeout 120 python3 bench/gpu_check.py --deterministic
  timeout 100 python3 bench/quantizer.py --device cuda
  timeout 240 python3 bench/sampling.py --device cuda --dtype bfloat16 --width 1536 --heads 24 \
      --spatial-layers 42 --depth-layers 6 --codebook-size 16384 --batches 8 100 200 500 \
      --uncached-batch 8 --repeats 2
  timeout 150 python3 bench/encode.py --device cuda --preset imagenet256-8x8x4 --size 256 \
      --per-class 1024 --batch 128 --dtype bfloat16
  timeout 60 python3 bench/evaluate.py --device cuda --images 5000 --batch 250
  timeout 60 python3 bench/evaluate.py --device cuda --images 5000 --batch 250 --dtype bfloat16
  # the pipeline itself on the GPU: the demo at a few steps, both training stages and the
  # actors on CUDA (the stages' use_gpu), in a throwaway run dir
  run=$(mktemp -d)
  timeout 300 python3 -m pipeline.cli demo --run-dir "$run/demo" train_vae.use_gpu=true \
      train_ar.use_gpu=true encode.use_gpu=true sample.use_gpu=true evaluate.use_gpu=true \
      train_vae.steps=50 train_ar.steps=50 train_ar.deterministic=true sample.num_samples=48 \
      && python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['prompt_check'])" \
          "$run/demo/demo-report.json"
  rm -rf "$run"
} 2>&1 | tee "$log"
