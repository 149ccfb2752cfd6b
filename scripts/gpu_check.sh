#!/usr/bin/env bash
# Every TensorRT check in one command, on a machine with an NVIDIA GPU and its driver:
#   scripts/gpu_check.sh [OUT_DIR]          (default: out/gpu_check, ignored by git)
# 1. bootstrap .venv (scripts/bootstrap.sh); 2. install TensorRT 10 + cuda-python (+ polygraphy for the lint
# test); 3. print the device identity engines will record; 4. pytest -m gpu (fp32 engine from the raw SANA step,
# parity against ONNX Runtime, CUDA-graph replay bit-identical to plain execution; engines from an fp16 TensorRT
# export gated against its references); 5. build a tiny SANA bundle for TensorRT and for ONNX Runtime, and one in
# two steps (`build --export-only`, then `engines`, as a GPU machine without torch would); 6. the latency
# benchmark on both, and their ratio; 7. the same for --target onnxruntime-gpu (onnxruntime-gpu swapped in for the
# CPU onnxruntime, and back at exit). Logs go to OUT_DIR.
# tensorrt-cu12 installs its libraries from NVIDIA's package index; on a machine without network, put every
# wheel in a folder and run with WHEELHOUSE=/that/folder (pip then installs from it alone).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu_check}
GPU_PINS=(tensorrt-cu12==10.16.1.11 cuda-python==12.9.4 polygraphy==0.53.6 onnx-graphsurgeon==0.6.1)
if [ -n "${WHEELHOUSE:-}" ]; then
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELHOUSE"
fi
mkdir -p "$OUT"

scripts/bootstrap.sh
PY=.venv/bin/python
"$PY" -m pip install -q "${GPU_PINS[@]}"

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.csv"
# Fails (BundleError) when TensorRT cannot see a GPU: then the gpu tests below would only skip.
"$PY" -c "from runtime.trt_engine import device_identity; print(device_identity())" | tee "$OUT/device.txt"

"$PY" -m pytest -p no:logging -m gpu -rs tests/test_tensorrt.py tests/test_tensorrt_export.py 2>&1 \
  | tee "$OUT/pytest_gpu.log"
"$PY" -m mc_export build --backbone sana --target tensorrt --steps 3 --out "$OUT/sana-trt" 2>&1 | tee "$OUT/build.log"
"$PY" -m mc_export build --backbone sana --target onnxruntime --steps 3 --out "$OUT/sana-ort" 2>&1 | tee -a "$OUT/build.log"
# export here, build there (both on this machine): the export needs no GPU, `engines` neither torch nor onnx
"$PY" -m mc_export build --backbone sana --target tensorrt --export-only --precision fp16 --steps 3 \
  --out "$OUT/sana-export-fp16" 2>&1 | tee -a "$OUT/build.log"
"$PY" -m mc_export engines --export "$OUT/sana-export-fp16" --out "$OUT/sana-trt-fp16" 2>&1 | tee -a "$OUT/build.log"
# the same model, weights and request on both backends; `report A B` prints B/A per stage
"$PY" -m benchmarks latency --bundle "$OUT/sana-ort" --out "$OUT/latency_ort.json" 2>&1 | tee "$OUT/latency.log"
"$PY" -m benchmarks latency --bundle "$OUT/sana-trt" --out "$OUT/latency_trt.json" 2>&1 | tee -a "$OUT/latency.log"
"$PY" -m benchmarks report "$OUT/latency_ort.json" "$OUT/latency_trt.json" | tee "$OUT/latency_trt_vs_ort.md"

# 7. ONNX Runtime on the GPU (--target onnxruntime-gpu): onnxruntime-gpu REPLACES the CPU onnxruntime (same
# package, conflicting files), so swap it in, run its gpu tests, build and benchmark, and swap back on exit.
ORT_PIN=onnxruntime==1.32.0 ORT_GPU_PIN=onnxruntime-gpu==1.32.0
trap '"$PY" -m pip uninstall -q -y onnxruntime-gpu; "$PY" -m pip install -q "$ORT_PIN"' EXIT
"$PY" -m pip uninstall -q -y onnxruntime
"$PY" -m pip install -q "$ORT_GPU_PIN"
"$PY" -c "from metacanvas_deploy.runtime.ort_cuda import cuda_identity; print(cuda_identity())" | tee "$OUT/ort_cuda_device.txt"
"$PY" -m pytest -p no:logging -m gpu -rs tests/test_ort_cuda.py 2>&1 | tee "$OUT/pytest_ort_gpu.log"
"$PY" -m mc_export build --backbone sana --target onnxruntime-gpu --steps 3 --out "$OUT/sana-ort-gpu" 2>&1 \
  | tee -a "$OUT/build.log"
"$PY" -m mc_export build --backbone sana --target onnxruntime-gpu --precision fp16 --steps 3 \
  --out "$OUT/sana-ort-gpu-fp16" 2>&1 | tee -a "$OUT/build.log"
"$PY" -m benchmarks latency --bundle "$OUT/sana-ort-gpu" --out "$OUT/latency_ort_gpu.json" 2>&1 | tee -a "$OUT/latency.log"
"$PY" -m benchmarks latency --bundle "$OUT/sana-ort-gpu-fp16" --out "$OUT/latency_ort_gpu_fp16.json" 2>&1 \
  | tee -a "$OUT/latency.log"
"$PY" -m benchmarks report "$OUT/latency_ort.json" "$OUT/latency_ort_gpu.json" "$OUT/latency_ort_gpu_fp16.json" \
  | tee "$OUT/latency_ort_gpu_vs_ort.md"
# ONNX Runtime's TensorRT provider, where this onnxruntime-gpu finds TensorRT's libraries (else the build says so)
if "$PY" -c "import onnxruntime as o, sys; sys.exit('TensorrtExecutionProvider' not in o.get_available_providers())"; then
  "$PY" -m mc_export build --backbone sana --target onnxruntime-gpu --ort-provider tensorrt --steps 3 \
    --out "$OUT/sana-ort-trt" 2>&1 | tee -a "$OUT/build.log"
fi
echo "gpu_check: all steps passed; logs in $OUT/"
