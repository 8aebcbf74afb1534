"""Model version numbers as clients and repositories write them: decimal digits naming a number
above 0 and at most Triton's int64 maximum. Checking the length first also keeps a long digit
string (a client's, or a directory's name) from Python's int() limit of 4300 digits, which
raises ValueError: a client would have got INTERNAL, a repository would stop the server.
May import: server.errors."""

from __future__ import annotations

from server.errors import InvalidInput

__all__ = ["MAX_VERSION", "parse_version", "version_number"]

MAX_VERSION = 2**63 - 1  # Triton's versions are int64


def version_number(text: str) -> int | None:
    """The version `text` names, or None: not ASCII digits, 0, or above MAX_VERSION."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    v = int(text)
    return v if 0 < v <= MAX_VERSION else None


def parse_version(text: str) -> int:
    """A client's version string: its number, or InvalidInput."""
    v = version_number(text)
    if v is None:
        # Triton's wording, which clients match on.
        raise InvalidInput(
            f"failed to get model version from specified version string '{text[:64]}': "
            "version should be an integral value > 0"
        )
    return v
