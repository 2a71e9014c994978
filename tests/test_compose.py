"""docker-compose.yml and the Dockerfiles: there is no Docker engine here, so check what can be
checked without one: the services and their settings, that every file they reference exists, and
that the commands they run are real (onnxserve subcommands and flags, Locust and its locustfile).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml

from service.cli import parser as onnxserve_parser
from service.config import Settings
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
unit = pytest.mark.unit


@dataclass
class Stage:
    """One `FROM ... AS name` stage of a Dockerfile, its instructions as (keyword, argument)."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of every COPY from the build context (not --from a stage)."""
        found = []
        for keyword, arg in self.instructions:
            words = shlex.split(arg)
            if keyword != "COPY" or any(w.startswith("--from") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            found.append((paths[:-1], paths[-1]))
        return found


def dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile (line continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = arg.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(name, words[0]))
        elif stages:
            stages[-1].instructions.append((keyword, arg.strip()))
    return stages


def build_of(service: str) -> tuple[Path, Path, str | None]:
    """(context, Dockerfile, target) of a service's build section."""
    build = SERVICES[service]["build"]
    context = (ROOT / build["context"]).resolve()
    return context, context / build["dockerfile"], build.get("target")


def stage_of(service: str) -> Stage:
    _, path, target = build_of(service)
    stages = dockerfile(path)
    return next(s for s in stages if s.name == target) if target else stages[-1]


DOCKERFILES = sorted({build_of(s)[1] for s in SERVICES if "build" in SERVICES[s]})


def commands(stage: Stage) -> list[list[str]]:
    """The shell commands a stage runs (RUN split on &&) and its CMD/ENTRYPOINT, as words."""
    found = []
    for keyword, arg in stage.instructions:
        if keyword == "RUN":
            found += [shlex.split(part) for part in arg.split("&&")]
        elif keyword in ("CMD", "ENTRYPOINT") and arg.startswith("["):
            found.append(json.loads(arg))
    return found


def onnxserve_commands(stage: Stage) -> list[list[str]]:
    return [c for c in commands(stage) if c and c[0] == "onnxserve"]


# -- services ---------------------------------------------------------------------------------
@unit
def test_services_and_profiles():
    assert set(SERVICES) == {"server", "server-gpu", "locust-master", "locust-worker", "prometheus"}
    profiles = {name: s.get("profiles", []) for name, s in SERVICES.items()}
    assert profiles == {
        "server": [], "prometheus": [], "server-gpu": ["gpu"],
        "locust-master": ["loadtest"], "locust-worker": ["loadtest"],
    }  # fmt: skip


@unit
def test_ports():
    ports = {name: s.get("ports", []) for name, s in SERVICES.items()}
    assert ports["server"] == ["8000:8000", "8001:8001"]  # REST, gRPC
    assert ports["server-gpu"] == ["8002:8000", "8003:8001"]
    assert ports["locust-master"] == ["8089:8089"]
    assert ports["prometheus"] == ["9090:9090"]
    assert ports["locust-worker"] == []  # scaled with --scale: no fixed host port


@unit
@pytest.mark.parametrize("service", ["server", "server-gpu"])
def test_servers_listen_on_every_interface_and_report_ready(service):
    env = SERVICES[service]["environment"]
    assert env["ONNXSERVE_HOST"] == "0.0.0.0"
    container_port = SERVICES[service]["ports"][0].split(":")[-1]
    assert env["ONNXSERVE_PORT"] == container_port
    check = SERVICES[service]["healthcheck"]
    probe = " ".join(check["test"])
    assert check["test"][0] == "CMD"
    assert f"http://127.0.0.1:{container_port}/v2/health/ready" in probe
    assert {"interval", "timeout", "retries", "start_period"} <= set(check)
    # Every ONNXSERVE_* variable is a real setting, and the values parse.
    names = {k.removeprefix("ONNXSERVE_").lower() for k in env if k.startswith("ONNXSERVE_")}
    assert names <= set(Settings.model_fields), names - set(Settings.model_fields)


@unit
def test_gpu_server_reserves_an_nvidia_gpu_and_puts_cuda_first(monkeypatch):
    gpu = SERVICES["server-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for key, value in gpu["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.providers[0] == "CUDAExecutionProvider" and settings.require_gpu
    assert str(settings.repository) == "/srv/model_repository" and settings.port == 8000


@unit
def test_locust_services_share_one_image_and_find_the_master():
    master, worker = SERVICES["locust-master"], SERVICES["locust-worker"]
    assert master["image"] == worker["image"] and build_of("locust-master")[2] == "loadtest"
    assert "--master" in master["command"] and "--worker" in worker["command"]
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"
    host = master["command"][master["command"].index("--host") + 1]
    assert host == "http://server:8000"
    assert master["depends_on"]["server"]["condition"] == "service_healthy"
    env = master["environment"]
    assert env["LOADTEST_REPOSITORY"] == "/srv/model_repository"
    repo_copy = [c for k, c in stage_of("locust-master").instructions if k == "COPY" and
                 c.endswith(" /srv/model_repository")]  # fmt: skip
    assert repo_copy, "the loadtest image needs the repository's samples"


# -- files the compose file and the Dockerfiles reference --------------------------------------
@unit
def test_build_contexts_dockerfiles_and_targets_exist():
    for name, service in SERVICES.items():
        if "build" not in service:
            assert "image" in service, f"{name} has neither build nor image"
            continue
        context, path, target = build_of(name)
        assert context.is_dir() and path.is_file(), (name, context, path)
        if target:
            assert target in {s.name for s in dockerfile(path)}, (name, target)


@unit
def test_mounted_files_exist():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def ignored(path: str, ignore_file: Path) -> bool:
    """Whether a .dockerignore excludes `path` (last matching pattern wins; `!` re-includes)."""
    verdict = False
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            verdict = not negate
    return verdict


@unit
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_not_ignored(path):
    context = ROOT
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.is_file(), "a Dockerfile-specific ignore file keeps .venv out of the context"
    for stage in dockerfile(path):
        for sources, _ in stage.copies():
            for source in sources:
                assert (context / source).exists(), f"{path.name}: COPY {source} is missing"
                assert not ignored(source, ignore), f"{path.name}: {source} is dockerignored"


# -- commands are real --------------------------------------------------------------------------
@unit
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_onnxserve_commands_and_flags_exist(path):
    seen = set()
    for stage in dockerfile(path):
        for command in onnxserve_commands(stage):
            args = onnxserve_parser().parse_args(command[1:])  # SystemExit on a bad flag
            seen.add(args.command)
    assert {"build", "serve"} <= seen


@unit
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_build_the_repository_where_the_server_reads_it(path):
    stages = {s.name: s for s in dockerfile(path)}
    builder, runtime = stages["builder"], stages["runtime"]
    build = onnxserve_parser().parse_args(onnxserve_commands(builder)[0][1:])
    copied = [shlex.split(arg) for k, arg in runtime.instructions if k == "COPY"]
    built = str(build.repository)
    assert any(f"--from={builder.name}" in c and built in c for c in copied)
    env = " ".join(arg for k, arg in runtime.instructions if k == "ENV")
    assert "ONNXSERVE_REPOSITORY=/srv/model_repository" in env
    assert "ONNXSERVE_HOST=0.0.0.0" in env
    assert any(c[-1] == "/srv/model_repository" for c in copied)


@unit
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_torch_is_pinned_from_the_cpu_index_and_extras_exist(path):
    pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["train"] if "torch" in d)
    builder = next(s for s in dockerfile(path) if s.name == "builder")
    torch = [c for c in commands(builder) if "torch" in " ".join(c)]
    assert torch and pin in torch[0]
    assert torch[0][torch[0].index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for stage in dockerfile(path):
        for command in commands(stage):
            for word in command:
                for found in re.findall(r"\[([\w,]+)\]", word):
                    assert set(found.split(",")) <= extras, (stage.name, word)


@unit
def test_runtime_images_install_one_onnxruntime_flavour():
    for path, flavour, other in ((DOCKERFILES[0], "cpu", "gpu"), (DOCKERFILES[1], "gpu", "cpu")):
        runtime = next(s for s in dockerfile(path) if s.name == "runtime")
        installs = " ".join(" ".join(c) for c in commands(runtime) if "install" in c)
        assert f"[{flavour}]" in installs and f"[{other}]" not in installs, path.name
    gpu = next(s for s in dockerfile(DOCKERFILES[1]) if s.name == "runtime")
    env = " ".join(arg for k, arg in gpu.instructions if k == "ENV")
    assert 'ONNXSERVE_PROVIDERS=\'["CUDAExecutionProvider"' in env
    # The NVIDIA Container Toolkit injects the driver only into containers that ask for it.
    assert "NVIDIA_VISIBLE_DEVICES=all" in env and "compute" in env


def container_to_host(stage: Stage, container_path: str) -> Path | None:
    """The file in this checkout that a stage COPYs to `container_path`."""
    for sources, destination in stage.copies():
        if len(sources) == 1 and container_path.startswith(destination.rstrip("/") + "/"):
            return ROOT / sources[0] / container_path[len(destination.rstrip("/")) + 1 :]
    return None


@pytest.mark.integration
def test_locust_commands_use_the_real_locustfile_and_real_flags():
    stage = stage_of("locust-master")
    entrypoint = next(json.loads(a) for k, a in stage.instructions if k == "ENTRYPOINT")
    assert entrypoint == ["locust"]
    for name in ("locust-master", "locust-worker"):
        command = SERVICES[name]["command"]
        locustfile = command[command.index("-f") + 1]
        host_file = container_to_host(stage, locustfile)
        assert host_file == ROOT / "loadtests" / "locustfile.py", (name, locustfile)
    # Locust runs in a subprocess (it monkey-patches at import). Its own flags are in --help;
    # the locustfile's options, fed the compose file's environment defaults, must parse.
    locust = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py")]
    help_text = subprocess.run(
        [*locust, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    ).stdout
    for name in ("locust-master", "locust-worker"):
        for flag in (w for w in SERVICES[name]["command"] if w.startswith("--")):
            assert re.search(rf"(^|\s){re.escape(flag)}[\s,=]", help_text), flag
    options = []
    for key, value in SERVICES["locust-master"]["environment"].items():
        default = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
        flag = "--" + key.removeprefix("LOADTEST_").lower().replace("_", "-")
        options += [flag, default[1] if default else str(value)]
    listed = subprocess.run(
        [*locust, *options, "--list"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert "MixedUser" in listed.stdout, listed.stderr[-2000:]
    assert "error" not in listed.stderr, listed.stderr[-2000:]
    source = (ROOT / "loadtests" / "locustfile.py").read_text()
    for key in SERVICES["locust-master"]["environment"]:
        assert f'"{key}"' in source, f"the locustfile does not read {key}"


@unit
def test_prometheus_scrapes_the_servers_metrics():
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "onnxserve")
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {"server:8000", "server-gpu:8000"}
    for target in targets:
        host, port = target.split(":")
        assert SERVICES[host]["environment"]["ONNXSERVE_PORT"] == port
    mount = SERVICES["prometheus"]["volumes"][0].split(":")
    command = " ".join(SERVICES["prometheus"]["command"])
    assert f"--config.file={mount[1]}" in command
