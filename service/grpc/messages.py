"""The protobuf messages of Triton's `inference.GRPCInferenceService`, from a private pool.

Where they come from: Triton's published `grpc_service.proto` and `model_config.proto`, vendored
unmodified under `service/grpc/proto/` and compiled by protoc (`python -m service.grpc.generate`,
grpcio-tools pinned in `descriptors.GENERATOR`) into `descriptors.py`, which is committed. Why not
generated `_pb2` modules or tritonclient's: both register the names `inference.*` in protobuf's
process-wide default pool, where two different copies clash ("duplicate symbol") - so the server
would need the client library, and a process holding tritonclient (our tests, a user's app,
Locust) could not also import ours. Loaded into a pool of our own, the two never meet, and the
descriptors, unlike generated code, carry no protobuf runtime version check. The same pool
holds gRPC's standard health-check messages (`grpc.health.v1`), described in code below.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from service.grpc.descriptors import FILES

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"
POOL = descriptor_pool.DescriptorPool()
for _file in FILES:
    POOL.AddSerializedFile(_file)


HEALTH = "grpc.health.v1.Health"


def _health_file() -> bytes:
    """gRPC's standard health-checking messages (`grpc.health.v1`, what Kubernetes' gRPC probes
    and grpc_health_probe call), described here field for field: two messages do not warrant a
    vendored file and protoc."""
    d = descriptor_pb2
    f = d.FileDescriptorProto(name="onnxserve/grpc_health.proto", package="grpc.health.v1",
                              syntax="proto3")  # fmt: skip
    optional = d.FieldDescriptorProto.LABEL_OPTIONAL
    request = f.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, label=optional,
                      type=d.FieldDescriptorProto.TYPE_STRING)  # fmt: skip
    response = f.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(name="status", number=1, label=optional,
                       type=d.FieldDescriptorProto.TYPE_ENUM,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus")  # fmt: skip
    return f.SerializeToString()


POOL.AddSerializedFile(_health_file())


def message(name: str, package: str = PACKAGE) -> Any:
    """The message class `<package>.<name>` (nested types are attributes of it)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{package}.{name}"))


def method_path(rpc: str, service: str = SERVICE) -> str:
    """The HTTP/2 path of one RPC, e.g. `/inference.GRPCInferenceService/ModelInfer`."""
    return f"/{service}/{rpc}"


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
HealthCheckRequest = message("HealthCheckRequest", "grpc.health.v1")
HealthCheckResponse = message("HealthCheckResponse", "grpc.health.v1")
