"""deploy/: every Kustomize overlay renders, its core objects pass Kubernetes' own schemas, its
custom resources (KServe, KEDA, Prometheus operator) their CRDs' required fields and types, and
what the manifests tell the server (command, flags, ONNXSERVE_* settings, ports, probe paths,
mounts, shutdown timing) is what the server accepts and serves. No cluster here: see
docs/deploy.md for what was and was not run.

Rendering is done in Python by `render` below, a strict subset of Kustomize (the fields these
kustomizations use; anything else is refused), so that the tests need only pip packages. Where
`kubectl` is on PATH (this project's machines and CI have it) a test checks that the subset
renders exactly what `kubectl kustomize` renders.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from kubernetes_validate.utils import schema_contents

from service.api import ROUTERS
from service.cli import parser as onnxserve_parser
from service.config import Settings
from service.metrics import Metrics
from tests.conftest import ROOT, run_server
from tests.test_compose import SERVICES, dockerfile

DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
#: What a user applies (the others are pieces that these include).
ENTRY_POINTS = [DEPLOY / "kserve", *sorted((DEPLOY / "overlays").iterdir())]
NAMESPACE = "onnxserve"
#: Kubernetes versions whose schemas the core objects must pass: a floor and the newest known.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
pytestmark = pytest.mark.unit


def rel(path: Path) -> str:
    return str(path.relative_to(DEPLOY)) if path.is_relative_to(DEPLOY) else str(path)


# -- a strict Kustomize subset ------------------------------------------------------------------
SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}


def render(folder: Path) -> list[dict]:
    """What `kubectl kustomize folder` renders, for the subset of Kustomize deploy/ uses:
    resources (files and folders), RFC 6902 patches on a kind/name target, images (newName,
    newTag) and namespace. Anything else raises, so that this cannot drift from Kustomize."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise NotImplementedError(f"{rel(folder)}: kustomization fields {sorted(unknown)}")
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        if set(patch) != {"path", "target"} or set(patch["target"]) - {"kind", "name"}:
            raise NotImplementedError(f"{rel(folder)}: patch form {patch}")
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise NotImplementedError(f"{rel(folder)}: only RFC 6902 patches (a list of ops)")
        targets = [d for d in docs if all(key_of(d)[k] == v for k, v in patch["target"].items())]
        assert targets, f"{rel(folder)}: patch {patch['path']} matches nothing"
        for doc in targets:
            json_patch(doc, ops)
    for doc in docs:
        if "namespace" in spec:
            doc["metadata"]["namespace"] = spec["namespace"]
        for image in spec.get("images", []):
            set_image(doc, image)
    ids = [tuple(key_of(d).values()) for d in docs]
    assert len(ids) == len(set(ids)), f"{rel(folder)}: duplicate objects {ids}"
    return docs


def key_of(doc: dict) -> dict[str, str]:
    meta = doc["metadata"]
    return {"kind": doc["kind"], "name": meta["name"], "namespace": meta.get("namespace", "")}


def json_patch(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add / replace / remove, in place."""
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]
        ]
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        kind, value = op["op"], copy.deepcopy(op.get("value"))
        if kind not in ("add", "replace", "remove"):
            raise NotImplementedError(f"patch op {kind}")
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, value)
            elif kind == "replace":
                node[index] = value
            else:
                del node[index]
        elif kind == "add":
            node[last] = value
        else:
            if last not in node:
                raise KeyError(f"{op['path']}: nothing to {kind}")
            if kind == "replace":
                node[last] = value
            else:
                del node[last]


def set_image(node: Any, image: dict) -> None:
    """Kustomize's images transformer: every container's image named `name` gets the new
    name and/or tag."""
    if set(image) - {"name", "newName", "newTag"}:
        raise NotImplementedError(f"image fields {sorted(image)}")
    if isinstance(node, list):
        for item in node:
            set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    new_tag = image.get("newTag", tag)
                    container["image"] = image.get("newName", name) + (
                        f":{new_tag}" if new_tag else ""
                    )
        else:
            set_image(value, image)


def split_image(image: str) -> tuple[str, str]:
    """(name, tag) of an image reference without a digest."""
    assert "@" not in image, "digests are not in the subset"
    slash, colon = image.rfind("/"), image.rfind(":")
    return (image[:colon], image[colon + 1 :]) if colon > slash else (image, "")


RENDERED = {folder: render(folder) for folder in KUSTOMIZATIONS}


def objects(*kinds: str) -> Iterator[tuple[Path, dict]]:
    """(entry point, object) for every object of these kinds that a user can apply."""
    for folder in ENTRY_POINTS:
        for doc in RENDERED[folder]:
            if doc["kind"] in kinds:
                yield folder, doc


def find(folder: Path, kind: str, name: str | None = None) -> dict:
    found = [
        d for d in RENDERED[folder] if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(found) == 1, (rel(folder), kind, name, len(found))
    return found[0]


# -- rendering ---------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=rel)
def test_every_kustomization_renders_labelled_objects(folder):
    docs = RENDERED[folder]
    assert docs, rel(folder)
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "onnxserve", key_of(doc)
    if folder in ENTRY_POINTS:
        assert {d["metadata"].get("namespace") for d in docs} == {NAMESPACE}


def test_entry_points_are_the_documented_ones():
    names = {rel(p) for p in ENTRY_POINTS}
    assert names == {
        "kserve", "overlays/cpu", "overlays/gpu", "overlays/object-storage",
        "overlays/autoscaling-hpa", "overlays/autoscaling-keda",
    }  # fmt: skip
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for name in names:
        assert f"deploy/{name}" in doc, f"docs/deploy.md does not mention deploy/{name}"


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not on PATH in CI: the Kustomize subset went unchecked")
        pytest.skip("kubectl is not on PATH: the Kustomize subset is not compared with it")
    return found


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=rel)
def test_the_subset_renders_what_kubectl_kustomize_renders(folder):
    out = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]

    def by_id(docs: list[dict]) -> list[dict]:
        return sorted(docs, key=lambda d: json.dumps(key_of(d)))

    assert by_id(RENDERED[folder]) == by_id(theirs)


def test_the_subset_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(NotImplementedError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\npatches: [{path: p.yaml, target: {kind: Deployment, name: x}}]\n"
    )
    (tmp_path / "p.yaml").write_text("spec: {replicas: 1}\n")
    with pytest.raises(NotImplementedError, match="RFC 6902"):
        render(tmp_path)


# -- schemas -----------------------------------------------------------------------------------
CORE_KINDS = (
    "ConfigMap", "Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
)  # fmt: skip


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_pass_kubernetes_schemas_strictly(version):
    checked = set()
    for folder, doc in objects(*CORE_KINDS):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{rel(folder)} {doc['kind']}: {exc}")
        checked.add(doc["kind"])
    kinds = {d["kind"] for docs in RENDERED.values() for d in docs}
    assert kinds - checked == set(CRD_SCHEMAS), "a kind is neither core nor a known CRD"


# The custom resources' required fields (as in each project's published CRD) and the types of
# the fields deploy/ writes; unknown fields are refused, as the API server's strict field
# validation does. Pod-level parts reuse Kubernetes' own definitions.
def _k8s(name: str) -> dict:
    return {"$ref": f"/api/_definitions.json#/$defs/io.k8s.api.{name}"}


def _obj(required: list[str], **properties: Any) -> dict:
    return {
        "type": "object", "required": required, "properties": properties,
        "additionalProperties": False,
    }  # fmt: skip


_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_STRINGS = {"type": "object", "additionalProperties": _STR}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_META = {"$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
_SELECTOR = {
    "$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
}
_QUANTITY = {"type": ["string", "integer"]}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    # Under Kubernetes' base URI, so that "/api/_definitions.json" refers to its definitions.
    return {"$id": f"https://kubernetes.io/api/crd/{kind.lower()}"} | _obj(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion={"const": api_version}, kind={"const": kind}, metadata=_META, spec=spec,
    )  # fmt: skip


_ENDPOINT = {"path": _STR, "port": _STR, "interval": _DURATION, "scrapeTimeout": _DURATION}
CRD_SCHEMAS = {
    "ServingRuntime": _resource(
        "serving.kserve.io/v1alpha1", "ServingRuntime",
        _obj(
            ["containers"],
            supportedModelFormats={"type": "array", "items": _obj(
                ["name"], name=_STR, version=_STR, autoSelect=_BOOL,
                priority={"type": "integer", "minimum": 1},
            )},
            protocolVersions={"type": "array", "items": {"enum": ["v1", "v2", "grpc-v2"]}},
            multiModel=_BOOL,
            annotations=_STRINGS,
            containers={"type": "array", "minItems": 1, "items": _k8s("core.v1.Container")},
            volumes={"type": "array", "items": _k8s("core.v1.Volume")},
        ),
    ),
    "InferenceService": _resource(
        "serving.kserve.io/v1beta1", "InferenceService",
        _obj(["predictor"], predictor=_obj(
            [],
            minReplicas=_INT, maxReplicas=_INT,
            model=_obj(
                ["modelFormat"],
                modelFormat=_obj(["name"], name=_STR, version=_STR),
                protocolVersion={"enum": ["v1", "v2", "grpc-v2"]},
                runtime=_STR, storageUri=_STR,
            ),
            autoScaling=_obj(["metrics"], metrics={"type": "array", "items": _obj(
                ["type"],
                type={"enum": ["Resource", "External", "PodMetric"]},
                external=_obj(
                    ["metric", "target"],
                    metric=_obj(
                        ["query"], backend={"enum": ["prometheus", "graphite"]},
                        serverAddress=_STR, query=_STR, namespace=_STR,
                    ),
                    target=_obj(
                        ["type"], type={"enum": ["Utilization", "Value", "AverageValue"]},
                        value=_QUANTITY, averageValue=_QUANTITY,
                    ),
                ),
            )}),
        )),
    ),
    "ScaledObject": _resource(
        "keda.sh/v1alpha1", "ScaledObject",
        _obj(
            ["scaleTargetRef", "triggers"],
            scaleTargetRef=_obj(["name"], apiVersion=_STR, kind=_STR, name=_STR),
            minReplicaCount={"type": "integer", "minimum": 0},
            maxReplicaCount={"type": "integer", "minimum": 0},
            pollingInterval=_INT, cooldownPeriod=_INT,
            advanced=_obj([], horizontalPodAutoscalerConfig=_obj(
                [], behavior=_k8s("autoscaling.v2.HorizontalPodAutoscalerBehavior"),
            )),
            triggers={"type": "array", "minItems": 1, "items": _obj(
                ["type", "metadata"], type=_STR, name=_STR,
                metricType={"enum": ["AverageValue", "Value", "Utilization"]},
                metadata=_STRINGS,
            )},
        ),
    ),
    "ServiceMonitor": _resource(
        "monitoring.coreos.com/v1", "ServiceMonitor",
        _obj(
            ["selector", "endpoints"], selector=_SELECTOR,
            endpoints={"type": "array", "items": _obj([], **_ENDPOINT)},
        ),
    ),
    "PodMonitor": _resource(
        "monitoring.coreos.com/v1", "PodMonitor",
        _obj(
            ["selector"], selector=_SELECTOR,
            podMetricsEndpoints={"type": "array", "items": _obj([], **_ENDPOINT)},
        ),
    ),
}  # fmt: skip


def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    version = f"v{kubernetes_validate.latest_version()}-local-strict"
    definitions = schema_contents(f"kubernetes-json-schema/{version}/_definitions.json", version)
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    return jsonschema.Draft202012Validator(CRD_SCHEMAS[kind], registry=registry)


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_custom_resources_match_their_crds(kind):
    found = list(objects(kind))
    assert found, f"no {kind} in deploy/"
    validator = crd_validator(kind)
    for folder, doc in found:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, (rel(folder), errors)


def test_crd_checks_catch_typos():
    doc = copy.deepcopy(find(DEPLOY / "kserve", "InferenceService"))
    doc["spec"]["predictor"]["model"]["protocolVersoin"] = "v2"
    assert not crd_validator("InferenceService").is_valid(doc)
    doc = copy.deepcopy(find(DEPLOY / "overlays" / "autoscaling-keda", "ScaledObject"))
    doc["spec"]["triggers"][0]["metadata"]["threshold"] = 1  # KEDA wants strings
    assert not crd_validator("ScaledObject").is_valid(doc)
    doc = copy.deepcopy(find(DEPLOY / "kserve", "ServingRuntime"))
    doc["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/v2/health/live"
    assert not crd_validator("ServingRuntime").is_valid(doc)


# -- what the manifests tell the server -----------------------------------------------------------
def pod_specs() -> Iterator[tuple[Path, dict, dict]]:
    """(entry point, owning object, pod spec) for every pod that runs onnxserve."""
    for folder, doc in objects("Deployment"):
        yield folder, doc, doc["spec"]["template"]["spec"]
    for folder, doc in objects("ServingRuntime"):
        yield folder, doc, doc["spec"]


def server_containers() -> Iterator[tuple[Path, dict, dict]]:
    for folder, owner, pod in pod_specs():
        servers = [c for c in pod["containers"] if c.get("command") == ["onnxserve"]]
        assert len(servers) == 1, (rel(folder), owner["kind"])
        yield folder, pod, servers[0]


def environment(folder: Path, container: dict) -> dict[str, str]:
    """The container's environment: its ConfigMaps (envFrom) then its own env entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(find(folder, "ConfigMap", ref)["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry["value"]
    return env


def server_settings(folder: Path, container: dict, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings `onnxserve serve` would run with: its flags over its ONNXSERVE_* env."""
    for name in [n for n in os.environ if n.startswith("ONNXSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in environment(folder, container).items():
        monkeypatch.setenv(name, value)
    args = onnxserve_parser().parse_args(container["args"])
    flags = {"repository": args.repository, "host": args.host, "port": args.port}
    return Settings(**{k: v for k, v in flags.items() if v is not None})


def test_commands_are_onnxserve_serve_with_flags_it_accepts():
    seen = 0
    for folder, _, container in server_containers():
        args = container["args"]
        parsed = onnxserve_parser().parse_args(args)  # SystemExit on an unknown flag
        assert parsed.command == "serve", rel(folder)
        used = {a.split("=")[0] for a in args if a.startswith("--")}
        assert used <= {"--repository", "--host", "--port"}, "server_settings maps only these"
        seen += 1
    assert seen == len(ENTRY_POINTS)  # one server per entry point


def test_environment_names_are_real_settings(monkeypatch):
    for folder, _, container in server_containers():
        env = environment(folder, container)
        names = {n.removeprefix("ONNXSERVE_").lower() for n in env if n.startswith("ONNXSERVE_")}
        assert names <= set(Settings.model_fields), (
            rel(folder),
            names - set(Settings.model_fields),
        )
        server_settings(folder, container, monkeypatch)  # values parse (pydantic raises)


ROUTES = {(m, r.path) for router in ROUTERS for r in router.routes for m in r.methods}


def test_ports_and_probe_paths_are_the_servers(monkeypatch):
    assert ("GET", "/v2/health/ready") in ROUTES and ("GET", "/v2/health/live") in ROUTES
    for folder, _, container in server_containers():
        settings = server_settings(folder, container, monkeypatch)
        assert settings.host == "0.0.0.0", rel(folder)
        ports = {p.get("name", p["containerPort"]): p["containerPort"] for p in container["ports"]}
        want = [settings.port] + ([settings.grpc_port] if "grpc" in ports else [])
        assert list(ports.values()) == want, rel(folder)
        probes = {
            k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        assert probes["readinessProbe"]["path"] == "/v2/health/ready"
        assert probes["livenessProbe"]["path"] == "/v2/health/live"
        for probe in probes.values():
            assert ("GET", probe["path"]) in ROUTES
            assert ports.get(probe["port"], probe["port"]) == settings.port, rel(folder)


def test_the_service_reaches_the_container_port():
    for folder, doc in objects("Service"):
        deployment = find(folder, "Deployment")
        pod = deployment["spec"]["template"]
        assert doc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
        targets = [p["targetPort"] for p in doc["spec"]["ports"]]
        assert targets == ["http", "grpc"] and set(targets) <= names


def test_the_image_is_the_dockerfiles_and_compose_files(monkeypatch):
    """Images named as compose builds them; the Dockerfiles' port and user are the pods'."""
    compose_images = {SERVICES[s]["image"] for s in ("server", "server-gpu")}
    for folder, pod, container in server_containers():
        assert container["image"] in compose_images, (rel(folder), container["image"])
        flavour = container["image"].split(":")[1]
        path = ROOT / "docker" / ("Dockerfile" if flavour == "cpu" else "Dockerfile.gpu")
        runtime = next(s for s in dockerfile(path) if s.name == "runtime")
        exposed = [int(p) for k, a in runtime.instructions if k == "EXPOSE" for p in a.split()]
        if "ports" in container and folder != DEPLOY / "kserve":  # KServe's port is 8080
            assert [p["containerPort"] for p in container["ports"]] == exposed
        useradd = " ".join(a for k, a in runtime.instructions if k == "RUN" and "useradd" in a)
        uid = int(re.search(r"--uid (\d+)", useradd)[1])
        user = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert user["runAsUser"] == uid and user["runAsNonRoot"] is True, rel(folder)
    gpu = find(DEPLOY / "overlays" / "gpu", "Deployment")["spec"]["template"]["spec"]
    assert gpu["containers"][0]["image"] == SERVICES["server-gpu"]["image"]


def test_containers_are_locked_down_and_have_a_writable_tmp():
    for folder, _, pod in pod_specs():
        for container in pod.get("initContainers", []) + pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (rel(folder), container["name"])
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], (rel(folder), container["name"])
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits)


def test_model_repository_is_mounted_where_the_server_reads_it(monkeypatch):
    for folder, pod, container in server_containers():
        repository = str(server_settings(folder, container, monkeypatch).repository)
        assert repository == "/mnt/models", rel(folder)  # KServe's path, used everywhere
        if folder == DEPLOY / "kserve":
            continue  # KServe mounts the storageUri there itself
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == repository)
        assert mount.get("readOnly") is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            find(folder, "PersistentVolumeClaim", claim)  # the overlay creates it
        else:  # filled by an init container before the server starts
            assert "emptyDir" in volume, rel(folder)
            (init,) = pod["initContainers"]
            assert {"name": mount["name"], "mountPath": repository} in init["volumeMounts"]
            assert repository in " ".join(init["args"])


def test_threads_fit_the_cpu_limit(monkeypatch):
    for folder, _, container in server_containers():
        threads = server_settings(folder, container, monkeypatch).intra_op_threads
        limit = float(container["resources"]["limits"]["cpu"])
        assert 1 <= threads <= limit, (rel(folder), threads, limit)


def test_shutdown_grace_covers_prestop_and_the_drain(monkeypatch):
    """Grace >= preStop sleep + the longest a request may queue + time to compute (5 s)."""
    for folder, doc in objects("Deployment"):
        pod = doc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        settings = server_settings(folder, container, monkeypatch)
        queue_s = settings.default_batching.timeout_ms / 1000
        assert queue_s is not None and queue_s <= 10, "the drain must be bounded"
        assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + queue_s + 5, rel(folder)


def test_start_up_is_protected_and_disruptions_keep_a_pod():
    for folder, doc in objects("Deployment"):
        container = doc["spec"]["template"]["spec"]["containers"][0]
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, rel(folder)
        pdb = find(folder, "PodDisruptionBudget")
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        replicas = [
            d["spec"].get("minReplicas", d["spec"].get("minReplicaCount"))
            for d in RENDERED[folder]
            if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
        ] or [doc["spec"]["replicas"]]
        assert replicas[0] > pdb["spec"]["maxUnavailable"], rel(folder)


def test_gpu_overlay_asks_for_a_gpu_and_puts_cuda_first(monkeypatch):
    folder = DEPLOY / "overlays" / "gpu"
    pod = find(folder, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    settings = server_settings(folder, container, monkeypatch)
    assert settings.providers[0] == "CUDAExecutionProvider" and settings.require_gpu
    cpu = find(DEPLOY / "overlays" / "cpu", "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]


@pytest.mark.e2e
def test_the_pods_environment_starts_a_server_that_answers_its_probes(repository, tmp_path):
    """The CPU pod's ConfigMap environment, on a real server (loopback, a free port and the
    built repository in place of the pod's 0.0.0.0:8000 and /mnt/models)."""
    folder = DEPLOY / "overlays" / "cpu"
    container = find(folder, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = environment(folder, container)
    with run_server(repository, tmp_path, *container["args"][1:], env=env) as server:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            r = httpx.get(server.url + container[probe]["httpGet"]["path"], timeout=10)
            assert r.status_code == 200, (probe, r.text)
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    series = re.findall(r'^onnxserve_saturation\{model="(\w+)"', metrics, re.MULTILINE)
    assert sorted(series) == ["autoencoder", "cnn", "lstm"], metrics[-2000:]


# -- autoscaling on saturation -------------------------------------------------------------------
GAUGE = Metrics().saturation._name  # the metric the server exports


def test_the_gauge_is_exported_under_the_name_the_autoscalers_read():
    assert GAUGE == "onnxserve_saturation"
    folder = DEPLOY / "overlays" / "autoscaling-hpa"
    hpa = find(folder, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == GAUGE
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert hpa["spec"]["scaleTargetRef"]["name"] == find(folder, "Deployment")["metadata"]["name"]
    assert "replicas" not in find(folder, "Deployment")["spec"], "the HPA owns replicas"
    values = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(GAUGE + "{") and rule["name"]["as"] == GAUGE
    assert re.fullmatch(rule["name"]["matches"], GAUGE)
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for placeholder in ("<<.GroupBy>>", "<<.Series>>", "<<.LabelMatchers>>"):
        assert placeholder in rule["metricsQuery"]


def test_keda_holds_the_same_target_on_the_same_series():
    folder = DEPLOY / "overlays" / "autoscaling-keda"
    scaled = find(folder, "ScaledObject")
    assert (
        scaled["spec"]["scaleTargetRef"]["name"] == find(folder, "Deployment")["metadata"]["name"]
    )
    assert "replicas" not in find(folder, "Deployment")["spec"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["threshold"] == "1"
    query = trigger["metadata"]["query"]
    service = find(folder, "Service")["metadata"]
    assert f'{GAUGE}{{namespace="{service["namespace"]}",service="{service["name"]}"}}' in query
    assert query.startswith("sum(max by (pod) (")
    hpa = find(DEPLOY / "overlays" / "autoscaling-hpa", "HorizontalPodAutoscaler")["spec"]
    keda = scaled["spec"]
    assert (keda["minReplicaCount"], keda["maxReplicaCount"]) == (
        hpa["minReplicas"], hpa["maxReplicas"],
    )  # fmt: skip
    assert keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]


def test_prometheus_scrapes_the_metrics_route():
    assert ("GET", "/metrics") in ROUTES
    for folder, monitor in objects("ServiceMonitor"):
        service = find(folder, "Service")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= (
            service["metadata"]["labels"].items()
        )
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


# -- KServe ------------------------------------------------------------------------------------
def test_kserve_runtime_serves_onnx_over_v2_from_mnt_models():
    folder = DEPLOY / "kserve"
    runtime = find(folder, "ServingRuntime")["spec"]
    assert {"name": "onnx"}.items() <= runtime["supportedModelFormats"][0].items()
    assert runtime["protocolVersions"] == ["v2"]
    (container,) = runtime["containers"]
    assert container["name"] == "kserve-container"
    args = onnxserve_parser().parse_args(container["args"])
    assert str(args.repository) == "/mnt/models" and args.port == 8080  # KServe's conventions
    assert runtime["annotations"]["prometheus.kserve.io/port"] == str(args.port)
    assert ("GET", runtime["annotations"]["prometheus.kserve.io/path"]) in ROUTES


def test_inference_service_uses_the_runtime_and_scales_on_saturation():
    folder = DEPLOY / "kserve"
    isvc = find(folder, "InferenceService")
    name = isvc["metadata"]["name"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == find(folder, "ServingRuntime")["metadata"]["name"]
    assert model["modelFormat"]["name"] == "onnx" and model["protocolVersion"] == "v2"
    claim = find(DEPLOY / "models-pvc", "PersistentVolumeClaim")["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{claim}/"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    (metric,) = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
    external = metric["external"]
    assert external["target"] == {"type": "Value", "value": "1"}  # KEDA's threshold
    pods = f'{GAUGE}{{namespace="{NAMESPACE}",pod=~"{name}-predictor-.*"}}'
    assert external["metric"]["query"] == f"sum(max by (pod) ({pods}))"
    monitor = find(folder, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": name
    }
