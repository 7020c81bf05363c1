"""Names that become file or directory names (dataset names, run names, experiment names, arms).

Every such name is checked here, once, before anything is written: a name may not escape the
directory it is joined to, hide itself, or carry characters a shell or a file system mangles.
"""

from __future__ import annotations

import unicodedata

from quality_gate.errors import ConfigError

MAX_NAME_LENGTH = 200


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as one path component, or None when it can."""
    if not isinstance(name, str) or name == "":
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is a relative directory reference"
    if "/" in name or "\\" in name:
        return "it contains a path separator (/ or \\); use a plain name such as 'openhermes'"
    if name.startswith("."):
        return "it starts with '.' (hidden files and the pipeline's own temporary files do)"
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")]
    if bad:
        return f"it contains control or invisible characters {[hex(ord(c)) for c in bad[:4]]}"
    if name != name.strip():
        return "it starts or ends with whitespace"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    return None


def check_name(name: str, key: str) -> str:
    """``name`` when it is safe as a single path component; else :class:`ConfigError` naming ``key``."""
    problem = name_problem(name)
    if problem is not None:
        raise ConfigError(f"{key}={name!r} cannot be used as a file or directory name: {problem}")
    return name
