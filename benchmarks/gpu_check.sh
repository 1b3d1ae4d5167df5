#!/usr/bin/env bash
# The GPU check, in one command on a lent GPU machine (no network): installs the wheels that
# benchmarks/gpu_prepare.sh put in .gpu/wheels, then runs the embedding throughput benchmark on the
# GPU (the model alone in fp32/fp16/bf16, and `embed` end to end with --device cuda: JPEGs decoded
# by nvjpeg in batches, embedstore/data/device_decode.py), the device-decode tests and the search
# benchmark (faiss on the GPU where a GPU build is installed, else on the CPU), writing JSON to
# $OUT (the device tool's output folder) or benchmarks/results/. Sized to finish in under 8 minutes.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
site=/tmp/embedstore-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/wheels/*.whl
mkdir -p /tmp/embedstore-shim && ln -sfn "$PWD/cli" /tmp/embedstore-shim/embedstore_cli
export PYTHONPATH="$PWD:/tmp/embedstore-shim:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu_nvidia_smi.csv" || true
python3 -c "import torch, faiss, embedstore; print(torch.__version__, torch.cuda.get_device_name(0), faiss.__version__)"
# nvjpeg: the batched device decode against the CPU path (the CUDA test runs only here); needs pytest
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_device_decode.py 2>&1 | tail -3 || true
timeout 330 python3 benchmarks/embed_throughput.py --data .gpu/data --datasets imagenette --repeats 2 \
  --stages model,auto --device cuda --json-out "$out/gpu_embed_throughput.json" 2>&1 | tail -20
timeout 120 python3 benchmarks/search.py --rows 200000 --queries 500 --methods auto,hnsw,ivf-pq,faiss-IndexFlatIP \
  --out "$out/gpu_search.json" 2>&1 | tail -12
