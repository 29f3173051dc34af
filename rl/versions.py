"""Adapter version names: the one place they are spelled, parsed and compared.

A version is a numbered adapter folder in the registry, `v0000`, `v0001`, ...
(four digits or more). `v0000` is the base: the zero adapter that stands for the
base model (agentloop.rl.zero_adapter). The engines and clients know a version by
its served name, `<alias>@<version>` (`agentloop@v0003`); the alias alone means
"the live version". Every module that names, parses or numbers versions uses
these functions, so the rule lives here only.

Invariant: pure functions over strings; no I/O, no imports beyond the stdlib.
"""

from __future__ import annotations

import re

BASE_VERSION = "v0000"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


def is_version(name: str) -> bool:
    """Whether `name` is a version name (`v0003`), not a served name or anything else."""
    return isinstance(name, str) and _VERSION_RE.match(name) is not None


def version_name(number: int) -> str:
    """`3` -> `v0003`."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"a version number is a non-negative integer, not {number!r}")
    return f"v{number:04d}"


def version_number(version: str) -> int:
    """`v0003` -> 3; ValueError for anything that is not a version name."""
    m = _VERSION_RE.match(version) if isinstance(version, str) else None
    if m is None:
        raise ValueError(f"not a version name: {version!r}")
    return int(m.group(1))


def parse_version(value: str | int) -> str:
    """What a person or a client may write for a version -- `3`, `v0003` or the served
    name `agentloop@v0003` -- as the version name; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return version_name(value)
    if not isinstance(value, str):
        raise ValueError(f"not a version: {value!r}")
    tail = value.rsplit("@", 1)[-1]
    if not is_version(tail):
        raise ValueError(f"not a version: {value!r}")
    return tail


def next_version(taken: list[int] | set[int]) -> str:
    """The version after the highest number taken (`v0000` when none is)."""
    return version_name(max(taken) + 1 if taken else 0)


def served_name(alias: str, version: str) -> str:
    """The name the engines serve a version under: `agentloop@v0003`."""
    return f"{alias}@{version}"


def version_of(name: str) -> str:
    """The version a served name (or a bare version name) stands for: `agentloop@v0003` -> `v0003`."""
    return name.rsplit("@", 1)[-1]


def is_base(version: str) -> bool:
    return version == BASE_VERSION


def alias_of(name: str) -> str:
    """The alias part of a served name: `agentloop@v0003` -> `agentloop`."""
    return name.rsplit("@", 1)[0]
