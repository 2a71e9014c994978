"""The infer routes' paths, recognized in one place (the lanes route by them, the guard gives
them the `infer` scope)."""

from __future__ import annotations

import re

INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
PREDICT = re.compile(r"^/v1/models/(?P<model>[^/:]+)(?:/versions/(?P<version>[^/:]+))?:predict$")


def infer_route(path: str) -> tuple[str, str, str | None] | None:
    """("v2" or "v1", model, version or None) for an infer route's path; None otherwise."""
    match, kind = INFER.match(path), "v2"
    if match is None:
        match, kind = PREDICT.match(path), "v1"
        if match is None:
            return None
    return kind, match["model"], match["version"]
