"""The TensorRT target: which precisions a GPU can take (`precision`), optimisation profiles from a component's
spec (`profiles`) and the engine builder (`builder`).

Nothing here imports tensorrt or cuda at module level: `import mc_export.tensorrt.precision` works on a CPU-only
machine, and only `builder.build_engine` / `builder.device_identity` need an NVIDIA GPU with TensorRT 10.
"""
