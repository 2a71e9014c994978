"""The model repository at run time: finds models on disk, loads and unloads them.

A loaded model version owns a pool of ONNX Runtime sessions (`ModelRuntime`), a `Batcher`, a
thread pool to run batches in, and its metric children.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path

import numpy as np

from service.batcher import Batcher
from service.codec import NP_TYPES
from service.config import Settings
from service.errors import BadRequest, NotFound, ServeError, Unavailable
from service.metrics import Metrics, ModelMetrics
from service.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    Batching,
    ConfigError,
    ModelConfig,
    load_config,
    version_dirs,
)
from service.runtime import ModelRuntime, RuntimeOptions

log = logging.getLogger(__name__)


class State(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"


@dataclass
class LoadedModel:
    """One servable model version."""

    name: str
    version: int
    config: ModelConfig
    batching: Batching
    instances: int
    runtime: ModelRuntime
    batcher: Batcher
    metrics: ModelMetrics
    executor: ThreadPoolExecutor
    model_file: str = MODEL_FILE

    @property
    def not_ready_reason(self) -> str | None:
        return self.runtime.not_ready_reason

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    async def close(self) -> None:
        """Finish accepted work, then release the threads and gauges."""
        await self.batcher.close()
        self.executor.shutdown(wait=True)
        self.metrics.remove()


def warm_up_inputs(config: ModelConfig, batch_sizes: tuple[int, ...]) -> list[dict]:
    """Zero inputs shaped from the config (dynamic non-batch axes set to 8), one per batch size."""
    examples = []
    for rows in batch_sizes:
        example = {}
        for spec in config.inputs:
            shape = [rows] + [8 if d == -1 else d for d in spec.shape[1:]]
            example[spec.name] = np.zeros(shape, dtype=NP_TYPES[spec.datatype])
        examples.append(example)
    return examples


class Repository:
    """Models on disk and the versions of them that are loaded."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.root = Path(settings.repository)
        self.metrics = metrics
        self._loaded: dict[str, dict[int, LoadedModel]] = {}
        self._states: dict[str, tuple[State, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.runtime_options = RuntimeOptions(
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            cudnn_conv_algo_search=settings.cudnn_conv_algo_search,
            device_id=settings.device_id,
            require_gpu=settings.require_gpu,
        )

    # -- discovery --------------------------------------------------------------------------
    def on_disk(self) -> list[str]:
        """Names of the models whose folder holds a config.json."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).is_file())

    def index(self) -> list[dict]:
        """Every model on disk or loaded, each version with its state (the repository index)."""
        entries = []
        for name in sorted(set(self.on_disk()) | set(self._loaded)):
            loaded = self._loaded.get(name, {})
            state, reason = self._states.get(name, (State.UNLOADED, ""))
            versions = set(version_dirs(self.root / name)) | set(loaded)
            for version in sorted(versions):
                model = loaded.get(version)
                if model is not None:
                    v_state = State.READY if model.ready else State.UNAVAILABLE
                    v_reason = model.not_ready_reason or ""
                elif state in (State.LOADING, State.UNAVAILABLE):
                    v_state, v_reason = state, reason
                else:
                    v_state, v_reason = State.UNLOADED, ""
                entry = {"name": name, "version": str(version), "state": v_state.value}
                if v_reason:
                    entry["reason"] = v_reason
                entries.append(entry)
            if not versions:
                entries.append({"name": name, "state": state.value, "reason": reason})
        return entries

    @property
    def loaded(self) -> dict[str, dict[int, LoadedModel]]:
        return self._loaded

    def all_ready(self) -> bool:
        """True when no model is loading or failed, and every loaded version is ready."""
        if any(s in (State.LOADING, State.UNAVAILABLE) for s, _ in self._states.values()):
            return False
        return all(m.ready for versions in self._loaded.values() for m in versions.values())

    # -- lookup -----------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded version asked for (the highest by default); 404/400/503 otherwise."""
        versions = self._loaded.get(name)
        if not versions:
            if name in self.on_disk():
                state, reason = self._states.get(name, (State.UNLOADED, ""))
                detail = f": {reason}" if reason else ""
                raise Unavailable(f"model '{name}' is {state.value.lower()}{detail}")
            known = ", ".join(sorted(set(self.on_disk()) | set(self._loaded))) or "none"
            raise NotFound(f"unknown model '{name}' (models: {known})")
        if version is None or version == "":
            model = versions[max(versions)]
        else:
            if not version.isdigit():
                raise BadRequest(f"model version must be a positive integer, got {version!r}")
            found = versions.get(int(version))
            if found is None:
                served = ", ".join(str(v) for v in sorted(versions))
                raise NotFound(f"model '{name}' has no version {version} loaded (loaded: {served})")
            model = found
        if not model.ready:
            raise Unavailable(f"model '{name}' is not ready: {model.not_ready_reason}")
        return model

    def config_of(self, name: str) -> ModelConfig:
        """A model's config, loaded or not (404 if there is no such model)."""
        versions = self._loaded.get(name)
        if versions:
            return versions[max(versions)].config
        if name not in self.on_disk():
            raise NotFound(f"unknown model '{name}'")
        try:
            return load_config(self.root / name / CONFIG_FILE)
        except ConfigError as exc:
            raise Unavailable(str(exc)) from None

    # -- load / unload ----------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load the models named in the settings, or every model on disk."""
        for name in self.settings.models or self.on_disk():
            try:
                await self.load(name)
            except (NotFound, BadRequest, Unavailable) as exc:
                log.error("model %s not loaded: %s", name, exc.message)

    async def load(self, name: str) -> list[LoadedModel]:
        """(Re)load a model's versions from disk; a reload swaps in the new ones, then drains."""
        if name not in self.on_disk():
            raise NotFound(f"no model '{name}' in repository {self.root}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            old = self._loaded.get(name, {})
            if not old:  # a reload keeps serving (and stays READY) while the new one loads
                self._states[name] = (State.LOADING, "")
            try:
                models = await asyncio.to_thread(self._build, name)
            except Exception as exc:  # a bad config, ORT refusing the file, a missing version
                error: ServeError = (
                    BadRequest(str(exc))
                    if isinstance(exc, ConfigError)
                    else Unavailable(f"model '{name}' failed to load: {exc}")
                )
                if not old:
                    self._states[name] = (State.UNAVAILABLE, error.message)
                raise error from None
            for model in models:
                model.batcher.start()
            self._loaded[name] = {m.version: m for m in models}
            self._states[name] = (State.READY, "")
            for model in old.values():
                await model.close()
            for model in models:  # after the old ones let go of the same label sets
                model.metrics.pending.set_function(partial(getattr, model.batcher, "depth"))
                model.metrics.set_provider(model.runtime.provider)
            log.info(
                "loaded %s versions %s on %s",
                name,
                [m.version for m in models],
                models[0].runtime.provider,
            )
            return models

    async def unload(self, name: str) -> None:
        """Stop serving a model; requests already accepted are finished first."""
        if name not in self._loaded and name not in self.on_disk():
            raise NotFound(f"unknown model '{name}'")
        async with self._locks.setdefault(name, asyncio.Lock()):
            old = self._loaded.pop(name, {})
            self._states[name] = (State.UNLOADED, "")
            for model in old.values():
                await model.close()

    async def close(self) -> None:
        """Unload everything (at shutdown)."""
        for name in list(self._loaded):
            await self.unload(name)

    def _build(self, name: str) -> list[LoadedModel]:
        folder = self.root / name
        config = load_config(folder / CONFIG_FILE)
        if config.name != name:
            raise ConfigError(f"{folder / CONFIG_FILE}: name: '{config.name}' != folder '{name}'")
        versions = version_dirs(folder)
        if not versions:
            raise FileNotFoundError(f"no <version>/{MODEL_FILE} under {folder}")
        if self.settings.version_policy == "latest":
            versions = versions[-1:]
        override = self.settings.batching_for(name)
        batching = config.batching.model_copy(
            update=override.model_dump(exclude_none=True, exclude={"instance_count", "variant"})
        )
        if not self.settings.batching:
            batching = batching.model_copy(update={"max_batch_size": 1, "max_queue_delay_ms": 0})
        instances = override.instance_count or config.instance_count
        return [
            self._build_version(config, v, batching, instances, override.variant) for v in versions
        ]

    def _model_file(self, config: ModelConfig, version: int, variant: str | None) -> Path:
        """The graph to serve: model.onnx, or a variant the build accepted."""
        folder = self.root / config.name / str(version)
        if variant is None:
            return folder / MODEL_FILE
        entry = next((v for v in config.versions if v.version == version), None)
        for candidate in entry.variants if entry else []:
            if candidate.kind == variant and candidate.accepted:
                return folder / candidate.file
        raise FileNotFoundError(f"version {version} has no accepted {variant} variant")

    def _build_version(
        self,
        config: ModelConfig,
        version: int,
        batching: Batching,
        instances: int,
        variant: str | None = None,
    ) -> LoadedModel:
        path = self._model_file(config, version, variant)
        history = {v.version: v for v in config.versions}
        if config.task == "anomaly" and version in history:  # each version's own calibration
            own = history[version].metrics.get("threshold")
            if own is not None:
                config = config.model_copy(update={"threshold": own})
        runtime = ModelRuntime(path, self.runtime_options, instances)
        runtime.warm_up(warm_up_inputs(config, tuple(sorted({1, batching.max_batch_size}))))
        metrics = self.metrics.for_model(config.name, str(version))
        executor = ThreadPoolExecutor(instances, thread_name_prefix=f"ort-{config.name}-{version}")
        batcher = Batcher(
            run=runtime.run,
            executor=executor,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_ms=batching.max_queue_delay_ms,
            max_queue_size=batching.max_queue_size,
            timeout_ms=batching.timeout_ms,
            instances=instances,
            on_batch=metrics.batch,
        )
        return LoadedModel(
            config.name, version, config, batching, instances, runtime, batcher, metrics, executor,
            path.name,
        )  # fmt: skip
