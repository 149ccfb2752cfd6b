"""MetaCanvas deployment compiler: PyTorch reference -> ONNX -> engines."""

__version__ = "0.1.0"
