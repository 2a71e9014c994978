"""The model repository at run time: finds models on disk, loads, swaps and unloads them.

A model is a folder `<root>/<name>/` holding version folders `<version>/model.onnx` and, if the
user wants, a (possibly partial) `config.json`: the rest is completed from the graph
(`service.autocomplete`). A loaded model version owns a pool of ONNX Runtime sessions
(`ModelRuntime`), a `Batcher`, a thread pool to run batches in, its metric children and its
Triton statistics.

Changing what serves (start-up, the load API, a repository poll) goes through `reconcile`: the
versions the policy wants are built and warmed off the event loop, then swapped in at once;
requests already admitted to a replaced version finish on it while it drains. A version that
fails to load leaves what was serving in place and is listed UNAVAILABLE with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path

import numpy as np

from service.autocomplete import complete_config, graph_tensors
from service.batcher import Batcher
from service.codec import NP_TYPES
from service.config import BatchingOverride, Settings
from service.errors import BadRequest, NotFound, ServeError, Unavailable
from service.metrics import Metrics, ModelMetrics
from service.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    Batching,
    ConfigError,
    ModelConfig,
    Version,
    VersionPolicy,
    read_config_doc,
    version_dirs,
)
from service.runtime import ModelRuntime, RuntimeOptions, available_cores
from service.stats import ModelStats
from service.validation import Limits, resolve_limits
from service.versions import parse_version

log = logging.getLogger(__name__)

LISTING_TTL_S = 1.0  # how old the listing behind 404s may be
#: A file's identity for change detection: (size, mtime in ns); None when absent.
Stamp = tuple[int, int] | None


class State(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"


def stamp(path: Path) -> Stamp:
    """Size and modification time of `path`, or None if it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


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
    stats: ModelStats = field(default_factory=ModelStats)
    limits: Limits = Limits(max_rows=4096, max_elements=4 << 20, max_dim=4096)
    #: The config.json and model file stamps it was built from (a change means: reload).
    source: tuple[Stamp, Stamp] = (None, None)

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


def warm_up_inputs(
    config: ModelConfig, batch_sizes: tuple[int, ...], lengths: tuple[int, ...] = (8,)
) -> list[dict[str, np.ndarray]]:
    """Neutral inputs shaped from the config: for each batch size and dynamic-axis length (zeros,
    or empty strings for BYTES). A model without a batch axis gets its own shape only."""
    examples = []
    sizes = batch_sizes if config.batchable else (0,)
    dynamic = any(-1 in (s.shape[1:] if config.batchable else s.shape) for s in config.inputs)
    lengths = lengths if dynamic else lengths[:1]
    for rows in sizes:
        for length in lengths:
            example = {}
            for spec in config.inputs:
                dims = spec.shape[1:] if config.batchable else spec.shape
                shape = ([rows] if config.batchable else []) + [
                    length if d == -1 else d for d in dims
                ]
                dtype = NP_TYPES[spec.datatype]
                example[spec.name] = (
                    np.full(shape, "", dtype=object)
                    if dtype.kind == "O"
                    else np.zeros(shape, dtype)
                )
            examples.append(example)
    return examples


@dataclass
class _Failure:
    """Why a model (version None) or one of its versions did not load, and from which files."""

    reason: str
    source: tuple[Stamp, Stamp] = (None, None)


def is_model_dir(path: Path) -> bool:
    """A model folder: not hidden, holding a config.json or a version folder."""
    if path.name.startswith(".") or not path.is_dir():
        return False
    return (path / CONFIG_FILE).is_file() or any(
        c.name.isdigit() and c.is_dir() for c in path.iterdir()
    )


class Repository:
    """Models on disk and the versions of them that are loaded."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.root = Path(settings.repository)
        self.metrics = metrics
        self._loaded: dict[str, dict[int, LoadedModel]] = {}
        self._loading: set[str] = set()
        self._unloaded: set[str] = set()  # unloaded through the API: not reloaded by a poll
        self._failures: dict[str, dict[int | None, _Failure]] = {}
        self._seen: dict[tuple[str, int], Stamp] = {}  # model file stamps at the last poll
        self._locks: dict[str, asyncio.Lock] = {}
        self._listing: frozenset[str] = frozenset()
        self._listed_at = -LISTING_TTL_S

    # -- discovery --------------------------------------------------------------------------
    def known(self, name: str) -> bool:
        """Whether `name` is a model of the repository, from a listing at most a second old: a
        request for an unknown model must not cost a directory walk each (it answers 404)."""
        now = time.monotonic()
        if now - self._listed_at > LISTING_TTL_S:
            self._listing, self._listed_at = frozenset(self.on_disk()), now
        return name in self._listing or name in self._loaded

    def on_disk(self) -> list[str]:
        """Names of the model folders: those holding a config.json or a version folder."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if is_model_dir(p))

    def has_on_disk(self, name: str) -> bool:
        """Whether `name` is a model folder (`on_disk` for one name, without listing them all)."""
        return is_model_dir(self.root / name)

    def index(self) -> list[dict]:
        """Every model on disk or loaded, each version with its state (the repository index)."""
        entries = []
        for name in sorted(set(self.on_disk()) | set(self._loaded)):
            loaded = self._loaded.get(name, {})
            failures = self._failures.get(name, {})
            versions = set(version_dirs(self.root / name)) | set(loaded)
            versions |= {v for v in failures if v is not None}
            model_failure = failures.get(None)
            for version in sorted(versions):
                model = loaded.get(version)
                reason = ""
                if model is not None:
                    state = State.READY if model.ready else State.UNAVAILABLE
                    reason = model.not_ready_reason or ""
                elif version in failures:
                    state, reason = State.UNAVAILABLE, failures[version].reason
                elif name in self._loading and not loaded:
                    state = State.LOADING
                elif model_failure is not None and not loaded:
                    state, reason = State.UNAVAILABLE, model_failure.reason
                else:
                    state = State.UNLOADED
                entry = {"name": name, "version": str(version), "state": state.value}
                if reason:
                    entry["reason"] = reason
                entries.append(entry)
            if not versions:
                state = State.UNAVAILABLE if model_failure else State.UNLOADED
                entry = {"name": name, "state": state.value}
                if model_failure:
                    entry["reason"] = model_failure.reason
                entries.append(entry)
        return entries

    @property
    def loaded(self) -> dict[str, dict[int, LoadedModel]]:
        return self._loaded

    def problems(self) -> list[str]:
        """Why the server is not ready: models loading, failed, or loaded but not ready."""
        found = [f"{name}: loading" for name in sorted(self._loading)]
        for name, failures in sorted(self._failures.items()):
            if name in self._loaded and None not in failures:
                continue  # a failed new version beside a serving one: the model still serves
            reason = next(iter(failures.values())).reason
            found.append(f"{name}: UNAVAILABLE ({reason})")
        found += [f"{m.name}: {m.not_ready_reason}" for m in self.models() if not m.ready]
        return found

    def models(self) -> list[LoadedModel]:
        """Every loaded model version."""
        return [m for versions in self._loaded.values() for m in versions.values()]

    def all_ready(self) -> bool:
        """Readiness: with strict readiness every model that should serve does; otherwise the
        server is ready once start-up loading is over."""
        if not self.settings.strict_readiness:
            return not self._loading
        return not self.problems()

    # -- lookup -----------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded version asked for (the highest by default); 404/400/503 otherwise."""
        versions = self._loaded.get(name)
        if not versions:
            if self.known(name):
                raise Unavailable(self._why_not_loaded(name))
            known = ", ".join(sorted(self._listing | set(self._loaded))) or "none"
            raise NotFound(f"unknown model '{name}' (models: {known})")
        if version is None or version == "":
            model = versions[max(versions)]
        else:
            found = versions.get(parse_version(version))
            if found is None:
                served = ", ".join(str(v) for v in sorted(versions))
                raise NotFound(f"model '{name}' has no version {version} loaded (loaded: {served})")
            model = found
        if not model.ready:
            raise Unavailable(f"model '{name}' is not ready: {model.not_ready_reason}")
        return model

    def _why_not_loaded(self, name: str) -> str:
        if name in self._loading:
            return f"model '{name}' is loading"
        failures = self._failures.get(name)
        if failures:
            return next(iter(failures.values())).reason
        return f"model '{name}' is not loaded"

    # -- load / unload ----------------------------------------------------------------------
    def startup_models(self) -> list[str]:
        """The models to load at start-up: `--load-model` in explicit mode (`*` = all), else
        every model on disk (or those named by `--models`)."""
        if self.settings.model_control_mode == "explicit":
            wanted = self.settings.load_model or []
            if "*" not in wanted:
                return list(dict.fromkeys(wanted))
        return self.settings.models or self.on_disk()

    async def load_all(self) -> None:
        """Load the start-up models; failures are logged and listed, the others serve."""
        names = self.startup_models()
        self._loading.update(names)
        for name in names:
            try:
                await self.reconcile(name, force=True)
            except ServeError as exc:
                log.error("model %s not loaded: %s", name, exc.message)

    async def load(self, name: str) -> list[LoadedModel]:
        """(Re)load a model's versions from disk (the load API): built, warmed, then swapped in."""
        self._unloaded.discard(name)
        loaded = await self.reconcile(name, force=True)
        return loaded

    async def reconcile(self, name: str, *, force: bool = False, poll: bool = False) -> list:
        """Make what serves of `name` match the disk and the version policy.

        Versions whose files and config are unchanged keep serving (unless `force`); new or
        changed ones are built and warmed off the loop, then swapped in together; the versions
        they replace drain. `poll`: only versions whose model file did not change since the last
        poll are loaded (a file still being copied waits), and a failure is not retried until
        its files change. Raises NotFound / BadRequest / Unavailable when nothing of the model
        can serve.
        """
        async with self._locks.setdefault(name, asyncio.Lock()):
            try:
                return await self._reconcile(name, force, poll)
            finally:
                self._loading.discard(name)

    async def _reconcile(self, name: str, force: bool, poll: bool) -> list[LoadedModel]:
        folder = self.root / name
        current = self._loaded.get(name, {})
        if not self.has_on_disk(name):
            if current:
                await self._unload(name)
            raise NotFound(f"no model '{name}' in the repository")
        config_stamp = stamp(folder / CONFIG_FILE)
        available = version_dirs(folder)
        stamps = {v: stamp(folder / str(v) / MODEL_FILE) for v in available}
        if poll:
            stable = [v for v in available if self._seen.get((name, v)) == stamps[v]]
            for v in available:
                self._seen[(name, v)] = stamps[v]
            available = stable
        failures = self._failures.setdefault(name, {})
        try:
            doc = read_config_doc(folder / CONFIG_FILE)
            wanted = self._policy(doc).select(available)
        except (ConfigError, ValueError) as exc:
            return self._refuse(name, current, BadRequest(f"model '{name}': {exc}"), config_stamp)
        if not wanted:
            if not version_dirs(folder):
                error = Unavailable(f"model '{name}' has no <version>/{MODEL_FILE}")
                return self._refuse(name, current, error, config_stamp)
            if poll:
                return list(current.values())  # versions still arriving: look again next poll
            error = Unavailable(f"model '{name}': the version policy selects none of {available}")
            return self._refuse(name, current, error, config_stamp)

        keep = {
            v: m
            for v, m in current.items()
            if v in wanted and not force and m.source == (config_stamp, stamps.get(v))
        }
        build = [v for v in wanted if v not in keep]
        if poll:  # a failure is retried only once its files change
            build = [
                v
                for v in build
                if v not in failures or failures[v].source != (config_stamp, stamps[v])
            ]
        if not build and keep.keys() == current.keys():
            return list(current.values())
        if not current:
            self._loading.add(name)
        results = await asyncio.to_thread(
            self._build_versions, name, doc, build, (config_stamp, stamps)
        )
        built = {}
        for version, outcome in results.items():
            if isinstance(outcome, LoadedModel):
                built[version] = outcome
                failures.pop(version, None)
            else:
                failures[version] = _Failure(outcome.message, (config_stamp, stamps[version]))
                log.error("model %s version %d not loaded: %s", name, version, outcome.message)
        new = {**keep, **built}
        if not new:  # nothing of the wanted versions loaded: what served keeps serving
            first = next(iter(results.values()))
            assert isinstance(first, ServeError)
            if not current:
                failures[None] = _Failure(first.message, (config_stamp, None))
            raise first
        failures.pop(None, None)
        if current and not built and poll and set(keep) != set(wanted):
            return list(current.values())  # wanted versions failed: keep serving what was
        await self._swap(name, current, new)
        return list(new.values())

    def _refuse(
        self,
        name: str,
        current: dict[int, LoadedModel],
        error: ServeError,
        config_stamp: Stamp,
    ) -> list[LoadedModel]:
        """Record a model-level failure; what served keeps serving, else raise `error`."""
        failures = self._failures.setdefault(name, {})
        failures[None] = _Failure(error.message, (config_stamp, None))
        if current:
            log.error("%s; version(s) %s keep serving", error.message, sorted(current))
            return list(current.values())
        log.error("%s", error.message)
        raise error

    def _policy(self, doc: dict | None) -> VersionPolicy:
        given = (doc or {}).get("version_policy")
        return self.policy(VersionPolicy.model_validate(given) if given is not None else None)

    def policy(self, own: VersionPolicy | None) -> VersionPolicy:
        """A model's version policy: its config's own, else the server's default."""
        if own is not None:
            return own
        if self.settings.version_policy == "all":
            return VersionPolicy(all={})
        return VersionPolicy(latest={"num_versions": 1})

    async def _swap(
        self, name: str, old: dict[int, LoadedModel], new: dict[int, LoadedModel]
    ) -> None:
        """Serve `new` from now on; drain the versions of `old` it does not keep."""
        for model in new.values():
            if model.batcher._loop is None:
                model.batcher.start()
        self._loaded[name] = new
        for version, model in old.items():
            if new.get(version) is not model:
                await model.close()
        for model in new.values():  # after the old ones let go of the same label sets
            model.metrics.track_pending(partial(getattr, model.batcher, "depth"))
            model.metrics.set_provider(model.runtime.provider, model.runtime.fallback_reason or "")
        log.info("serving %s versions %s", name, sorted(new))

    async def unload(self, name: str) -> None:
        """Stop serving a model (the unload API); requests already accepted finish first."""
        if name not in self._loaded and not self.has_on_disk(name):
            raise NotFound(f"unknown model '{name}'")
        async with self._locks.setdefault(name, asyncio.Lock()):
            self._unloaded.add(name)
            await self._unload(name)

    async def _unload(self, name: str) -> None:
        old = self._loaded.pop(name, {})
        self._failures.pop(name, None)
        for model in old.values():
            await model.close()
        if old:
            log.info("unloaded %s", name)

    async def poll(self) -> None:
        """One repository poll: new and changed models and versions load, removed ones unload.

        A model unloaded through the API stays unloaded; `--models` limits what is polled.
        """
        on_disk = await asyncio.to_thread(self.on_disk)
        allowed = set(self.settings.models or on_disk)
        for name in sorted(set(self._loaded) - set(on_disk)):
            async with self._locks.setdefault(name, asyncio.Lock()):
                await self._unload(name)
        for name in on_disk:
            if name in allowed and name not in self._unloaded:
                try:
                    await self.reconcile(name, poll=True)
                except ServeError:
                    pass  # recorded, logged and listed in the index
        for name in list(self._failures):
            if name not in on_disk:
                del self._failures[name]

    async def poll_forever(self) -> None:
        """Poll every `repository_poll_secs` until cancelled (poll mode)."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.poll()
            except Exception:  # a poll must never stop polling
                log.exception("repository poll failed")

    async def close(self) -> None:
        """Unload everything (at shutdown)."""
        for name in list(self._loaded):
            async with self._locks.setdefault(name, asyncio.Lock()):
                await self._unload(name)

    # -- building (worker threads) ----------------------------------------------------------
    def _build_versions(
        self,
        name: str,
        doc: dict | None,
        versions: list[int],
        stamps: tuple[Stamp, dict[int, Stamp]],
    ) -> dict[int, LoadedModel | ServeError]:
        """Build and warm each version; a failure is returned as the error it answers with.
        `stamps`: the config's and each model file's, as `reconcile` read them."""
        out: dict[int, LoadedModel | ServeError] = {}
        config_stamp, file_stamps = stamps
        for version in versions:
            try:
                model = self._build_version(name, doc, version)
                model.source = (config_stamp, file_stamps.get(version))
                out[version] = model
            except ConfigError as exc:
                out[version] = BadRequest(f"model '{name}' version {version}: {exc}")
            except Exception as exc:  # ONNX Runtime refusing the file, a missing variant...
                reason = str(exc).replace(str(self.root), "<repository>")
                out[version] = Unavailable(f"model '{name}' version {version}: {reason}")
        return out

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

    def _build_version(self, name: str, doc: dict | None, version: int) -> LoadedModel:
        override = self.settings.batching_for(name)
        options = RuntimeOptions.from_settings(self.settings, override)
        if not options.max_batch_size:  # TensorRT's profiles: the config's batch size if known
            known = ((doc or {}).get("batching") or {}).get("max_batch_size")
            size = known if isinstance(known, int) else self.settings.default_max_batch_size
            options = dataclasses.replace(options, max_batch_size=size)
        # the config's own instance_count, if any, is read after completion (below)
        instances = override.instance_count or int((doc or {}).get("instance_count") or 1)
        partial_config = doc or {}
        path = self.root / name / str(version) / MODEL_FILE
        if override.variant is not None:
            path = self._model_file(_history(partial_config, name), version, override.variant)
        runtime = ModelRuntime(path, options, instances)
        config = complete_config(
            name,
            partial_config,
            graph_tensors("input", runtime.inputs.values()),
            graph_tensors("output", runtime.outputs.values()),
            self.settings.default_max_batch_size,
        )
        if config.task == "anomaly":  # each version's own calibration
            entry = next((v for v in config.versions if v.version == version), None)
            own = entry.metrics.get("threshold") if entry else None
            if own is not None:
                config = config.model_copy(update={"threshold": own})
        batching = self._batching(config, override)
        warm = warm_up_inputs(
            config, runtime.warm_up_sizes(batching.max_batch_size), runtime.warm_up_lengths()
        )
        try:
            runtime.warm_up(warm)
        except Exception as exc:  # a foreign model may refuse neutral inputs: it still serves
            log.warning("%s version %d: warm-up skipped (%s)", name, version, exc)
        metrics = self.metrics.for_model(name, str(version))
        stats = ModelStats()
        executor = ThreadPoolExecutor(instances, thread_name_prefix=f"ort-{name}-{version}")

        def on_batch(requests: int, rows: int, input_ns: int, infer_ns: int, out_ns: int) -> None:
            metrics.batch(rows, infer_ns / 1e9)
            stats.batch(requests, rows, input_ns, infer_ns, out_ns)

        # on a GPU, CUDA state is per thread: the loop would set up its own on first use
        inline_us = 0.0 if runtime.on_gpu else self.settings.inline_compute_us
        one_cpu = not runtime.on_gpu and batching.max_batch_size > 0 and available_cores() == 1
        one_cpu_ms = self.settings.one_cpu_inline_ms if one_cpu else 0.0
        if one_cpu_ms:
            log.info("%s version %d: one CPU: batches expected to take under %g ms run on the "
                     "event loop", name, version, one_cpu_ms)  # fmt: skip
        batcher = Batcher(
            run=runtime.run,
            executor=executor,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_ms=batching.max_queue_delay_ms,
            max_queue_size=batching.max_queue_size,
            timeout_ms=batching.timeout_ms,
            instances=instances,
            on_batch=on_batch,
            inline_ns=int(inline_us * 1000),
            one_cpu_ns=int(one_cpu_ms * 1e6),
        )
        return LoadedModel(
            name, version, config, batching, instances, runtime, batcher, metrics, executor,
            path.name, stats, resolve_limits(config, override, self.settings),
        )  # fmt: skip

    def _batching(self, config: ModelConfig, override: BatchingOverride) -> Batching:
        """The config's batching knobs with the server's overrides; a model without a batch
        axis keeps max_batch_size 0 (an override asking for more is refused)."""
        update = override.model_dump(
            exclude_none=True,
            include={"max_batch_size", "max_queue_delay_ms", "max_queue_size", "timeout_ms"},
        )
        if not config.batchable:
            asked = update.pop("max_batch_size", 0)
            if asked and config.name in self.settings.model_overrides:
                raise ConfigError(
                    f"max_batch_size: the override asks for {asked}, but model '{config.name}' "
                    "has no batch axis (max_batch_size 0)"
                )
        batching = config.batching.model_copy(update=update)
        if not self.settings.batching and config.batchable:
            batching = batching.model_copy(update={"max_batch_size": 1, "max_queue_delay_ms": 0})
        return batching


def _history(doc: dict, name: str) -> ModelConfig:
    """Just the version history of a config document (to find a version's variant files)."""
    versions = [Version.model_validate(v) for v in doc.get("versions") or []]
    return ModelConfig.model_construct(name=name, versions=versions)
