"""The Open Inference Protocol's gRPC binding (Triton's `inference.GRPCInferenceService`).

Modules: messages (the protobuf classes, from the vendored protos), tensors (the codec), status
(errors as gRPC codes), inference (the servicer), server (start and stop), generate (rebuilds
descriptors.py from proto/*.proto).
"""
