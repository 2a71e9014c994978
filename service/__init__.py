"""onnxserve: serve ONNX models over the Open Inference Protocol with dynamic batching."""

__version__ = "0.1.0"
