"""Model version strings from URLs and request bodies: one parser, bounded before int()."""

from __future__ import annotations

from service.errors import BadRequest

MAX_DIGITS = 18  # fits int64, as Triton's versions do


def parse_version(text: str) -> int:
    """A positive version number; BadRequest for anything else (including absurdly long digit
    strings, refused before Python's int() is asked to parse them)."""
    shown = text if len(text) <= 24 else text[:21] + "..."
    if not (0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()):
        raise BadRequest(f"model version must be a positive integer, got {shown!r}")
    version = int(text)
    if version < 1:
        raise BadRequest(f"model version must be a positive integer, got {shown!r}")
    return version
