"""Export models to ONNX, verify them against PyTorch, and publish them into the model repository:
the three reference models (`onnxserve build`) and users' own modules (`onnxserve export`).

Imports `models/` and `service.model_config`; `service/` never imports this package at module level.
"""
