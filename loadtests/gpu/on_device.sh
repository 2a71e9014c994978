#!/bin/sh
# The GPU check on a machine reached only by copying files (docs/gpu.md, "Running it where you
# can only copy files"). Run from the project's root after `../shared/tools/gpu-prepare`, with the
# earlier wheel pieces already copied to $GPU_PIECES by earlier runs and the last piece,
# .gpu/wheel.sha256, .whl and model_repository carried in this one:
#   sh loadtests/gpu/on_device.sh [gpu_check arguments...]
# It puts the onnxruntime-gpu wheel back together, checks its sha256, installs it and the serving
# wheels beside the machine's own packages (no index, no dependencies), and runs the check into
# $OUT/gpu-check (or runs/gpu-check). NVIDIA's CUDA libraries must be there as pip wheels (torch's):
# the check puts them on LD_LIBRARY_PATH itself.
set -eu
pieces=${GPU_PIECES:-/tmp/gpu}
site=${GPU_SITE:-/tmp/site}
here=$PWD
mkdir -p "$pieces"
cp .gpu/part.* "$pieces"/
wheel=$(cut -d' ' -f3 .gpu/wheel.sha256)
cat "$pieces"/part.* > "$pieces/$wheel"
(cd "$pieces" && sha256sum -c "$here/.gpu/wheel.sha256")
python3 -m pip install -q --no-index --no-deps --target "$site" "$pieces/$wheel" .whl/*.whl
PYTHONPATH="$site:$here" PYTHONUNBUFFERED=1 exec python3 -m loadtests.gpu_check \
  --repository model_repository --out "${OUT:-runs}/gpu-check" "$@"
