"""Service settings: one pydantic-settings object (env prefix `ONNXSERVE_`), built on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BatchingOverride(BaseModel):
    """Per-model serving knobs; a field left unset keeps the model config's value.

    `variant` serves a version's accepted `optimized`, `int8` or `fp16` graph instead of
    `model.onnx`.
    """

    max_batch_size: int | None = Field(default=None, ge=1)
    max_queue_delay_ms: float | None = Field(default=None, ge=0)
    max_queue_size: int | None = Field(default=None, ge=1)
    timeout_ms: float | None = Field(default=None, gt=0)
    instance_count: int | None = Field(default=None, ge=1)
    variant: Literal["optimized", "int8", "fp16"] | None = None
    max_rows: int | None = Field(default=None, ge=1)
    max_elements: int | None = Field(default=None, ge=1)
    max_dim: int | None = Field(default=None, ge=1)
    device_ids: list[int] | None = Field(
        default=None, description="GPUs to place instances on, round-robin (Triton's gpus)."
    )


class Settings(BaseSettings):
    """Everything the server can be told, from flags or `ONNXSERVE_*` environment variables.

    `ONNXSERVE_MODEL_OVERRIDES='{"cnn": {"max_batch_size": 8}}'` overrides one model's batching.
    """

    model_config = SettingsConfigDict(env_prefix="ONNXSERVE_", extra="ignore")

    repository: Path = Path("model_repository")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(
        default=8001, ge=0, le=65535, description="gRPC (KServe v2 / Triton) port; 0 disables it."
    )
    grpc_server: Literal["native", "grpcio"] = Field(
        default="native",
        description="gRPC's HTTP/2 server: onnxserve's own (service/grpc/h2server.py) or grpcio's.",
    )
    models: list[str] | None = Field(
        default=None, description="Models to load at start-up (default: every model found)."
    )
    version_policy: Literal["latest", "all"] = Field(
        default="latest",
        description="Versions served when a model's config names no version_policy: the "
        "highest, or all.",
    )
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        default="none",
        description="Triton's: none = the repository is read at start-up and the load/unload API "
        "is refused; explicit = only the load/unload API changes what serves; poll = the "
        "repository is rescanned every repository_poll_secs.",
    )
    repository_poll_secs: float = Field(default=15.0, gt=0)
    load_model: list[str] | None = Field(
        default=None, description="Explicit mode: models to load at start-up ('*' = all)."
    )
    strict_readiness: bool = Field(
        default=True,
        description="Ready only when every model that should serve does (Triton's default).",
    )
    default_max_batch_size: int = Field(
        default=32, ge=1, description="max_batch_size of a batchable model whose config names none."
    )

    providers: list[str] | None = Field(
        default=None,
        description="Execution providers in order of preference (default: TensorRT, CUDA, CPU, "
        "filtered by what onnxruntime offers).",
    )
    require_gpu: bool = False
    intra_op_threads: int = Field(default=0, ge=0, description="0 sizes threads to the cores.")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    device_id: int = Field(default=0, ge=0)
    gpu_mem_limit: int = Field(default=0, ge=0, description="CUDA arena limit in bytes (0: none).")
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = "kNextPowerOfTwo"
    use_tf32: bool = Field(default=False, description="TF32 matmuls (off keeps FP32 parity).")
    enable_cuda_graph: bool = False
    io_binding: bool = Field(default=False, description="IO binding on GPU providers.")
    trt_engine_cache_path: Path | None = Field(
        default=None, description="Where TensorRT keeps engines and timing caches."
    )

    batching: bool = Field(default=True, description="False runs every request on its own.")
    inline_compute_us: float = Field(
        default=200.0,
        ge=0,
        description="A lone one-row request to an idle model whose one-row runs take under this "
        "runs on the event loop, sparing two thread hops (0: always in the model's thread).",
    )
    one_cpu_inline_ms: float = Field(
        default=5.0,
        ge=0,
        description="On a process that may run on one CPU only (taskset, a Kubernetes CPU set), a "
        "batch expected to take under this runs on the event loop at any load: no thread runs "
        "beside the loop there, so handing it to one only costs context switches (0: never).",
    )
    default_batching: BatchingOverride = Field(default_factory=BatchingOverride)
    model_overrides: dict[str, BatchingOverride] = Field(default_factory=dict)

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_json_body_bytes: int = Field(
        default=2 * 1024 * 1024,
        ge=1024,
        description="JSON bodies (after inflation): decoding holds the event loop (~20 ms per "
        "MB); larger batches go as binary tensors, up to max_body_bytes.",
    )
    max_rows: int = Field(default=4096, ge=1, description="Rows per request (per model: limits).")
    max_elements: int = Field(
        default=4 * 1024 * 1024, ge=1, description="Elements per request, all inputs together."
    )
    max_dim: int = Field(
        default=4096, ge=1, description="Length of each dynamic non-batch axis (e.g. a window)."
    )
    fast_lane: bool = Field(
        default=True,
        description="Serve infer routes from the HTTP protocol (the direct lane) or a thin ASGI "
        "lane, not through FastAPI (same codec, dataplane and errors).",
    )
    api_keys_file: Path | None = Field(
        default=None, description="API keys with scopes; reloaded when the file changes."
    )
    anonymous_scopes: list[Literal["infer", "read", "metrics"]] | None = Field(
        default=None,
        description="Scopes open without a key (default: infer, read and metrics without a keys "
        "file; none with one).",
    )
    unsafe_anonymous_admin: bool = Field(
        default=False, description="Model control and jobs without a key (local development)."
    )
    allowed_hosts: list[str] | None = Field(
        default=None,
        description="Host header names accepted (default: the loopback names when bound to "
        "loopback, any otherwise).",
    )
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    graceful_timeout_s: float = Field(default=30.0, gt=0)
    drain_s: float = Field(
        default=0.5, ge=0, description="At shutdown, idle connections stay open this long."
    )
    backlog: int = Field(default=2048, ge=1)
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=1,
        description="Server processes answering on one port (service/workers.py); 'auto': one "
        "per core this process may use, or 1 when a GPU provider is active.",
    )
    worker_state_dir: Path | None = Field(
        default=None,
        description="Set by the --workers supervisor for its workers (not for users): the folder "
        "where they share model state, readiness and metrics. None: a single process.",
    )
    jobs_root: Path | None = Field(
        default=None, description="Batch-scoring jobs may read and write only under this folder."
    )
    jobs_concurrency: int = Field(default=1, ge=1, description="Batch-scoring jobs run at once.")
    saturation_target_ms: float = Field(
        default=50.0, gt=0, description="Queue time at which onnxserve_saturation reads 1."
    )
    log_level: str = "info"
    access_log: bool = Field(
        default=False, description="One line per request, with the key's name."
    )

    def batching_for(self, model: str) -> BatchingOverride:
        """The overrides for one model: its own entry over the server-wide defaults."""
        merged = self.default_batching.model_dump(exclude_none=True)
        own = self.model_overrides.get(model, BatchingOverride())
        merged.update(own.model_dump(exclude_none=True))
        return BatchingOverride(**merged)


def get_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, with explicit overrides (e.g. CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
