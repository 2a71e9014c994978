"""The protobuf messages of Triton's `inference.GRPCInferenceService`, from a private pool.

Where they come from: Triton's published `grpc_service.proto` and `model_config.proto`, vendored
unmodified under `service/grpc/proto/` and compiled by protoc (`python -m service.grpc.generate`,
grpcio-tools pinned in `descriptors.GENERATOR`) into `descriptors.py`, which is committed. Why not
generated `_pb2` modules or tritonclient's: both register the names `inference.*` in protobuf's
process-wide default pool, where two different copies clash ("duplicate symbol") - so the server
would need the client library, and a process holding tritonclient (our tests, a user's app,
Locust) could not also import ours. Loaded into a pool of our own, the two never meet, and the
descriptors, unlike generated code, carry no protobuf runtime version check.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool, message_factory

from service.grpc.descriptors import FILES

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"
POOL = descriptor_pool.DescriptorPool()
for _file in FILES:
    POOL.AddSerializedFile(_file)


def message(name: str) -> Any:
    """The message class `inference.<name>` (nested types are attributes of it)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


def method_path(rpc: str) -> str:
    """The HTTP/2 path of one RPC, e.g. `/inference.GRPCInferenceService/ModelInfer`."""
    return f"/{SERVICE}/{rpc}"


ServerLiveRequest = message("ServerLiveRequest")
ServerLiveResponse = message("ServerLiveResponse")
ServerReadyRequest = message("ServerReadyRequest")
ServerReadyResponse = message("ServerReadyResponse")
ModelReadyRequest = message("ModelReadyRequest")
ModelReadyResponse = message("ModelReadyResponse")
ServerMetadataRequest = message("ServerMetadataRequest")
ServerMetadataResponse = message("ServerMetadataResponse")
ModelMetadataRequest = message("ModelMetadataRequest")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
InferParameter = message("InferParameter")
InferTensorContents = message("InferTensorContents")
ModelConfigRequest = message("ModelConfigRequest")
ModelConfigResponse = message("ModelConfigResponse")
ModelStatisticsRequest = message("ModelStatisticsRequest")
ModelStatisticsResponse = message("ModelStatisticsResponse")
RepositoryIndexRequest = message("RepositoryIndexRequest")
RepositoryIndexResponse = message("RepositoryIndexResponse")
RepositoryModelLoadRequest = message("RepositoryModelLoadRequest")
RepositoryModelLoadResponse = message("RepositoryModelLoadResponse")
RepositoryModelUnloadRequest = message("RepositoryModelUnloadRequest")
RepositoryModelUnloadResponse = message("RepositoryModelUnloadResponse")
