#!/usr/bin/env bash
# GPU verification in one run, for a machine with an NVIDIA GPU (and no network):
#   bash benchmarks/gpu_check.sh            # writes env.txt, tests.txt, bench* to $OUT
# - environment: GPU, driver, torch/CUDA, whether TensorRT and cuda-python are installed;
# - tests marked gpu: the torch backend on CUDA (eager and CUDA graphs) against the CPU
#   step, the TensorRT backend's CUDA side (tests/test_tensorrt_plumbing.py) and, where
#   TensorRT is installed, the real engine (tests/test_tensorrt.py);
# - masa-rt bench: torch on CUDA (CUDA graphs) and ONNX Runtime on the CPU, 1..1024 streams;
# - benchmarks/engine_step.py: the encoder step alone on CUDA, and a round split.
# Wheels missing from the machine (pyzmq on a bare CUDA image) can be put in .whl/.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nproc
  python3 -c "import sys, torch, onnxruntime as o; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), \
'onnxruntime', o.__version__, o.get_available_providers())"
  python3 -m pip list 2>/dev/null | grep -iE \
    "^(cuda[-_a-z0-9]*|nvidia-cuda-nvrtc[-_a-z0-9]*|tensorrt[-_a-z0-9]*|onnx[-_a-z0-9]*|torch|pyzmq|msgpack|numpy) "
} 2>&1 | tee "$OUT/env.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -m pytest -q -rs tests/test_backends.py tests/test_tensorrt.py \
  tests/test_tensorrt_plumbing.py tests/test_export.py 2>&1 | tee "$OUT/tests.txt"
masa-rt bench --backend torch --device cuda --backend onnxruntime \
  --streams 1 16 64 256 1024 --iters 200 --e2e-clients 8 --seconds 5 --no-casa \
  --out "$OUT/bench_gpu.json" --plot "$OUT/bench_gpu.png" 2>&1 | tee "$OUT/bench.txt"
# Where the time goes: the encoder step alone (CUDA graphs), then a whole pipeline round
# split into encoder and everything else (resampling, featurisation, aligner: CPU work).
SHIPPED=masa_rt/assets/masa_hands_causal.pt
python3 benchmarks/engine_step.py --encoder-only --backend torch --device cuda \
  --checkpoint $SHIPPED --streams 1 16 64 256 1024 4096 --iters 300 \
  --out "$OUT/encoder_gpu.json" 2>&1 | grep streams | tee "$OUT/encoder.txt"
python3 benchmarks/engine_step.py --backend torch --device cuda --checkpoint $SHIPPED \
  --streams 1 16 64 256 1024 --iters 200 --out "$OUT/split_gpu.json" 2>&1 \
  | grep streams | tee -a "$OUT/encoder.txt"
