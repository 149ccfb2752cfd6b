"""Per-backbone request preparation for `runtime.pipeline.Pipeline`: which inputs a task takes, what the
planner sees, the denoise engine's extra inputs, and decoding. One module per backbone, one `Host` class each."""
