#!/usr/bin/env bash
# The GPU checks of one session, in one go, on a machine with an NVIDIA GPU:
#
#   SHIP=/tmp/ship OUT=/tmp/gpu-out [STEPS="check conv cuda cpu"] bash benchmarks/gpu/session.sh
#
# from the repository root (every step runs `python -m benchmarks...`):
# 1. benchmarks.gpu.check: versions, ORT CUDA EP vs torch inference, client training and the
#    ClientApp's train handler on CUDA vs CPU, the providers the serving pool's engines obtain;
#    benchmarks.gpu.conv_search: cuDNN's algorithm search modes vs dynamic batch shapes;
# 2. benchmarks.serving.bench --providers cuda: our KServe v2 server with its engines on the CUDA
#    EP vs raw onnxruntime CUDA sessions vs a no-op endpoint, least-loaded vs round-robin, the
#    dispatcher's overhead;
# 3. benchmarks.serving.bench --providers cpu on this machine's cores (the 2-core CI machine
#    cannot show what a bigger CPU does with the batch-1 and policy loads).
#
# Written for machines with no package index whose python3 already holds torch: what else the
# project needs comes as files in $SHIP (onnxruntime-gpu as ort.tar.xz, possibly split into
# ort.tar.xz.part-*; wheels in $SHIP/wheels; wrk and its LuaJIT in $SHIP/bin), installed into
# /tmp/site. Where pip works, `pip install -e .` replaces all that. Each step has its own time
# limit and a failure does not stop the next one; logs and results go to $OUT.
set -u
cd "$(dirname "$0")/../.."  # the repository root: python -m benchmarks..., PYTHONPATH=$PWD
SHIP=${SHIP:-/tmp/ship}
OUT=${OUT:-/tmp/gpu-out}
SITE=/tmp/site
PY=${PY:-python3}
mkdir -p "$OUT" "$SITE"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONUNBUFFERED=1
started=$(date +%s)
step() { echo "== [$(($(date +%s) - started)) s] $*"; }

step "install into $SITE"
if [ -d "$SHIP/wheels" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$SHIP"/wheels/*.whl 2>&1 | tail -3
fi
if ls "$SHIP"/ort.tar.xz.part-* >/dev/null 2>&1; then
    cat "$SHIP"/ort.tar.xz.part-* >"$SHIP/ort.tar.xz"
fi
if [ -f "$SHIP/ort.tar.xz" ]; then
    rm -rf "$SITE/onnxruntime"
    $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
        "$SHIP/ort.tar.xz" "$SITE"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SHIP/bin:$SITE/bin:$PATH"
# pip's nvidia-* CUDA libraries (those torch uses), for processes that never import torch
nvidia_libs=$($PY - <<'EOF'
import glob, os, site
dirs = {os.path.dirname(p) for sp in site.getsitepackages()
        for p in glob.glob(f"{sp}/nvidia/**/lib*.so*", recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="$SHIP/bin:$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import onnxruntime as o, torch, flwr, fastapi; print('ort', o.__version__, o.get_available_providers(), '| torch', torch.__version__, '| flwr', flwr.__version__)"
wrk --version 2>&1 | head -1

STEPS=" ${STEPS:-check conv cuda cpu} "
if [[ $STEPS == *" check "* ]]; then
    step "benchmarks.gpu.check"
    timeout 200 $PY -m benchmarks.gpu.check --seconds 1 2>&1 | tee "$OUT/gpu_check.log"
fi
if [[ $STEPS == *" conv "* ]]; then
    step "benchmarks.gpu.conv_search"
    timeout 120 $PY -m benchmarks.gpu.conv_search 2>&1 | grep -v "^\[" | tee "$OUT/conv_search.log"
fi
if [[ $STEPS == *" cuda "* ]]; then
    step "benchmarks.serving.bench --providers cuda"
    timeout "${CUDA_BENCH_S:-260}" $PY -m benchmarks.serving.bench --providers cuda --skip-ray \
        --models cnn,resnet18 --rounds 2 --window 2 --out "$OUT/serving-cuda.json" \
        >"$OUT/serving-cuda.log" 2>&1
    tail -n 60 "$OUT/serving-cuda.log"
fi
if [[ $STEPS == *" cpu "* ]]; then
    step "benchmarks.serving.bench --providers cpu ($(nproc) cores)"
    timeout "${CPU_BENCH_S:-110}" $PY -m benchmarks.serving.bench --providers cpu --skip-ray \
        --models cnn --sections http,policy --rounds 1 --window 2 \
        --out "$OUT/serving-cpu.json" >"$OUT/serving-cpu.log" 2>&1
    tail -n 40 "$OUT/serving-cpu.log"
fi
step "done"
