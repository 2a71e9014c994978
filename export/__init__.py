"""Export trained models to ONNX, verify them against PyTorch, and build the model repository.

Imports `models/` and `service.model_config`; `service/` never imports this package at module level.
"""
