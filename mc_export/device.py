"""The device a build is for: the GPU's identity recorded in the bundle and in its cache key (writer) and
attached to each stage's entry before its gate (stages)."""

from __future__ import annotations


def gpu_identity(cfg) -> dict | None:
    """The GPU a TensorRT or onnxruntime-gpu build is for (name, compute capability, TensorRT or execution-provider
    and CUDA versions); None for the CPU. A TensorRT build's precisions are checked against the GPU first: a clear
    error instead of a failure deep in the builder."""
    if cfg.target == "onnxruntime-gpu":
        from metacanvas_deploy.runtime.ort_cuda import GPU_PROVIDERS, cuda_identity

        return {**cuda_identity(), "provider": GPU_PROVIDERS[cfg.ort_provider]}
    if cfg.target != "tensorrt":
        return None
    from metacanvas_deploy.mc_export.tensorrt.precision import check_precision
    from metacanvas_deploy.runtime.trt_engine import device_identity

    identity = device_identity()
    for precision in cfg.precisions() if hasattr(cfg, "precisions") else (cfg.precision,):  # mixed: each stage's
        check_precision(precision, identity)
    return identity
