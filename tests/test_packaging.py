"""Every extra carries what its commands import: `pip install .[cpu,score]` must be enough for
`onnxserve score --url` (it once lacked httpx, which only the test extra had).

Statically, in a second or two: each shipped module tree is mapped to the extras its command
installs beside the core dependencies (`TREES`); the third-party top-level imports of each file
(module level and lazy, but not those guarded by `except ImportError` or `TYPE_CHECKING`) must
come from the distributions those requirements install, followed through their own requirements
in this environment's metadata.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata as md
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.cli import DELEGATED
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

#: Each shipped module tree (the most specific path wins) and the extras that the command using
#: it installs beside the core dependencies.
TREES: dict[str, tuple[str, ...]] = {
    "service": ("cpu",),  # onnxserve serve
    "service/scoring": ("cpu", "score"),  # onnxserve score [--url]
    "service/scoring/ray_engine.py": ("cpu", "score", "ray"),  # onnxserve score --engine ray
    "loadtests": ("cpu", "loadtest"),  # onnxserve loadtest (serves locally without --url)
    "loadtests/bench": ("cpu", "loadtest", "score"),  # the benchmarks, run from a checkout
    "loadtests/bench_scoring.py": ("cpu", "loadtest", "score"),
    "export": ("cpu", "train"),  # onnxserve build, onnxserve export
    "models": ("train",),
}
#: Every `onnxserve` subcommand and the module that runs it.
COMMANDS = {
    "serve": "service/cli.py",
    "build": "export/build.py",
    "export": "export/cli.py",
    "score": "service/scoring/cli.py",
    "loadtest": "loadtests/cli.py",
}
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def first_party(project: dict) -> set[str]:
    """Top-level packages the project ships (`service*` -> `service`)."""
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    return {p.rstrip("*").rstrip(".") for p in patterns} | {"tests"}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside `try: ... except ImportError` or `if TYPE_CHECKING:`."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            for handler in parent.handlers:
                names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                if any(isinstance(n, ast.Name) and n.id in _IMPORT_ERRORS for n in names):
                    return True
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        node = parent
    return False


def third_party_imports(path: Path, ours: set[str]) -> set[str]:
    """Top-level names of the third-party modules a file imports, anywhere but guarded."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if _guarded(node, parents):
            continue
        found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in sys.stdlib_module_names and n not in ours}


@cache
def _packages_distributions() -> dict[str, list[str]]:
    return dict(md.packages_distributions())


@cache
def _requires(dist: str) -> tuple[str, ...]:
    try:
        return tuple(md.requires(dist) or ())
    except md.PackageNotFoundError:
        return ()


def installed_by(requirements: list[str]) -> set[str]:
    """Distributions (canonical names) that installing `requirements` brings, following each
    one's own requirements (with their extras and markers) in this environment's metadata."""
    found: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        found.add(key[0])
        for text in _requires(req.name):
            sub = Requirement(text)
            extras = [""] + sorted(req.extras)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                stack.append(Requirement(str(sub).split(";")[0]))
    return found


def tree_of(path: Path) -> tuple[str, ...]:
    """The extras of the most specific tree holding `path` (relative to the root)."""
    rel = path.relative_to(ROOT).as_posix()
    keys = [k for k in TREES if rel == k or rel.startswith(k + "/")]
    if not keys:
        raise KeyError(f"{rel} is in no tree of TREES: map it to the extras its command needs")
    return TREES[max(keys, key=len)]


def uncovered(project: dict) -> list[str]:
    """`file: imports X, which core + extras do not install` for every shipped file."""
    deps = project["project"]["dependencies"]
    extras = project["project"]["optional-dependencies"]
    import_to_dists = _packages_distributions()
    ours = first_party(project)
    problems, provided_by = [], {}
    for package in sorted(ours - {"tests"}):
        for path in sorted((ROOT / package).rglob("*.py")):
            wanted = tree_of(path)
            if wanted not in provided_by:
                provided_by[wanted] = installed_by(deps + [r for e in wanted for r in extras[e]])
            provided = provided_by[wanted]
            for name in sorted(third_party_imports(path, ours)):
                dists = {canonicalize_name(d) for d in import_to_dists.get(name, [])}
                if not dists:
                    problems.append(f"{path.relative_to(ROOT)}: imports {name}, not installed")
                elif not dists & provided:
                    need = ", ".join(sorted(dists))
                    problems.append(
                        f"{path.relative_to(ROOT)}: imports {name} ({need}), which the core "
                        f"dependencies + [{','.join(wanted)}] do not install"
                    )
    return problems


def test_every_extra_installs_what_its_commands_import():
    assert uncovered(pyproject()) == []


def test_the_check_catches_httpx_missing_from_the_score_extra():
    project = copy.deepcopy(pyproject())
    score = project["project"]["optional-dependencies"]["score"]
    score[:] = [r for r in score if Requirement(r).name != "httpx"]
    problems = uncovered(project)
    assert any(p.startswith("service/scoring/remote.py: imports httpx") for p in problems)


def test_every_subcommand_is_mapped_to_a_tree():
    from service.cli import parser

    names = set(parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert names == set(COMMANDS) and set(DELEGATED) <= names
    for command, module in COMMANDS.items():
        assert (ROOT / module).is_file(), command
        assert tree_of(ROOT / module), command
    delegated = {n: m.replace(".", "/") + ".py" for n, (m, _) in DELEGATED.items()}
    assert all(COMMANDS[n] == path for n, path in delegated.items())


def test_import_collection_skips_guarded_and_first_party_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import os, numpy.linalg\nfrom service.codec import NP_TYPES\nfrom . import sibling\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
        "def f():\n    import httpx\n    try:\n        import ray\n    except ImportError:\n"
        "        pass\n"
    )
    assert third_party_imports(source, {"service"}) == {"numpy", "httpx"}
