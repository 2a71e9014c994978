"""schemathesis over the server's own `/openapi.json`: no operation answers a 5xx.

Two real servers on the real repository: one with default settings (no keys: inference and read
open, model control and jobs refused), and one with `--api-keys-file` (a key holding every scope,
sent as a Bearer header; jobs enabled under a jobs root and the load/unload API in explicit mode,
so those routes are exercised past the key check). Every operation in the schema gets positive
cases (and negative ones where a body can break the schema); only schemathesis's "not a server
error" check is asserted. Derandomized, and bounded to well under a minute for both servers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup

from service.security import SCOPES
from tests.conftest import run_server

pytestmark = pytest.mark.e2e

KEY = "schemathesis-key-with-every-scope"


@dataclass
class Target:
    """A running server and the headers every request to it carries."""

    url: str
    headers: dict[str, str]


@pytest.fixture(scope="module", params=["no-keys", "keys"])
def target(request, repository, tmp_path_factory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp(f"schemathesis-{request.param}")
    args: tuple[str, ...] = ()
    headers: dict[str, str] = {}
    if request.param == "keys":
        keys = tmp / "keys.json"
        digest = hashlib.sha256(KEY.encode()).hexdigest()
        keys.write_text(json.dumps({"keys": [{"name": "all", "sha256": digest, "scopes": SCOPES}]}))
        jobs = tmp / "jobs"
        jobs.mkdir()
        args = ("--api-keys-file", str(keys), "--jobs-root", str(jobs))
        args += ("--model-control-mode", "explicit", "--load-model", "*")
        headers = {"Authorization": f"Bearer {KEY}"}
    with run_server(repository, tmp, *args) as server:
        yield Target(server.url, headers)
        log = server.output()
        assert "Traceback" not in log, log[-4000:]


SETTINGS = settings(
    max_examples=15,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
#: Generated names only reach "unknown model": half the cases name a real model and version.
MODELS = ("cnn", "lstm", "autoencoder")
VERSIONS = ("1", "2")


def cases(operation: schemathesis.APIOperation, mode: GenerationMode) -> st.SearchStrategy:
    """The operation's cases: schemathesis's own, and as many naming a real model (except for
    unload, which would leave the rest of the run a legitimate 503)."""
    generated = operation.as_strategy(mode)
    if "{model}" not in operation.path or operation.path.endswith("/unload"):
        return generated

    def real(model: str, version: str) -> st.SearchStrategy:
        fixed = {"model": model}
        if "{version}" in operation.path:
            fixed["version"] = version
        return operation.as_strategy(mode, path_parameters=fixed)

    named = st.tuples(st.sampled_from(MODELS), st.sampled_from(VERSIONS)).flatmap(
        lambda mv: real(*mv)
    )
    return st.one_of(named, generated)


def server_errors(target: Target) -> tuple[int, list[str]]:
    """Run every operation's positive cases, and negative ones where it takes a body, query or
    headers; the number sent and, for each case that got a 5xx, a curl command reproducing it."""
    api = schemathesis.openapi.from_url(f"{target.url}/openapi.json", headers=dict(target.headers))
    sent, found = 0, []
    for result in api.get_all_operations():
        operation = result.ok()  # an invalid schema fails here, naming the operation
        modes = [GenerationMode.POSITIVE]
        if len(operation.body) or len(operation.query) or len(operation.headers):
            modes.append(GenerationMode.NEGATIVE)  # a path alone cannot break the schema
        for mode in modes:

            @SETTINGS
            @given(case=cases(operation, mode))
            def run(case: schemathesis.Case) -> None:
                nonlocal sent
                sent += 1
                try:
                    case.call_and_validate(
                        headers=target.headers, checks=[not_a_server_error], timeout=30
                    )
                except FailureGroup:  # what the check found; collected, the run goes on
                    found.append(case.as_curl_command(headers=target.headers))

            try:
                run()
            except Unsatisfiable:  # nothing in this operation can be made invalid
                assert mode is GenerationMode.NEGATIVE, operation.label
    return sent, found


def test_no_operation_answers_a_server_error(target: Target) -> None:
    sent, found = server_errors(target)
    assert sent > 0
    assert not found, f"{len(found)} of {sent} cases got a 5xx:\n" + "\n".join(found[:20])
