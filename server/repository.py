"""Scans a model repository on disk: <repo>/<model>/[config] + <repo>/<model>/<version>/model.onnx.

Pure file-system reading; a broken model becomes a ScannedModel with a reason, never an
exception, so one bad model cannot stop the server or the others. Each selected version also
gets a fingerprint of its directory's files (name, size, mtime): poll mode reloads a version
whose files changed, and tries a version that failed to load again only once they change. The
config file gets one too: poll mode waits for a config being written as for a version's files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from server.model_config import CONFIG_FILES, ConfigError, read_model_config
from server.types import Fingerprint, ModelSpec
from server.versions import version_number

__all__ = [
    "ScannedModel",
    "fingerprint",
    "listed_models",
    "model_names",
    "scan_model",
    "scan_repository",
]

_MAX_FILES = 10_000  # a fingerprint is bounded whatever the directory holds


@dataclass(frozen=True, slots=True)
class ScannedModel:
    name: str
    spec: ModelSpec | None
    reason: str = ""  # why the model as a whole cannot load ("" = fine)
    versions: dict[int, Path] = field(default_factory=dict)  # selected version -> model file
    version_errors: dict[int, str] = field(default_factory=dict)
    files: dict[int, Fingerprint] = field(default_factory=dict)  # of each selected version
    config_files: Fingerprint = ()  # config.pbtxt and config.json, those there are
    # Versions a `specific` version policy names that have no directory: not an error (the
    # others load, as in Triton), but said in the log (ModelManager).
    missing: tuple[int, ...] = ()


def fingerprint(version_dir: Path) -> Fingerprint:
    """The files under `version_dir` (symlinks followed, as the loader does)."""
    found: list[tuple[str, int, int]] = []
    seen = {os.path.realpath(version_dir)}  # a link back up would walk in circles
    for top, dirs, names in os.walk(version_dir, followlinks=True):
        # Hidden names are left out: a copy tool's temporary files (rsync's ".model.onnx.XyZ")
        # come and go; the file renamed over the model is what changes it.
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(top, d))
            if real not in seen:
                seen.add(real)
                kept.append(d)
        dirs[:] = kept
        for n in sorted(n for n in names if not n.startswith(".")):
            path = os.path.join(top, n)
            try:
                st = os.stat(path)
            except OSError:  # removed meanwhile, or a dangling link: the next scan sees it
                continue
            found.append((os.path.relpath(path, version_dir), st.st_size, st.st_mtime_ns))
            if len(found) >= _MAX_FILES:
                return tuple(sorted(found))
    return tuple(sorted(found))


def scan_repository(root: Path) -> list[ScannedModel]:
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    return [scan_model(root, name) for name in model_names(root)]


def listed_models(text: str) -> list[str]:
    """The model names of a comma-separated list (--load-model), blanks left out; ["*"] names
    every model."""
    return [n.strip() for n in text.split(",") if n.strip()]


def model_names(root: Path) -> list[str]:
    """The models of a repository as it is now: its directories, hidden ones aside."""
    return sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))
    )


def scan_model(root: Path, name: str, spec: ModelSpec | None = None) -> ScannedModel:
    model_dir = root / name
    if not model_dir.is_dir():
        return ScannedModel(name, None, f"model '{name}' is not in the repository")
    config_files = _config_fingerprint(model_dir)  # (before it is read: a write since is seen)
    if spec is None:
        try:
            spec = read_model_config(model_dir)
        except ConfigError as exc:
            return ScannedModel(name, None, str(exc), config_files=config_files)
    # A version is a directory named by its number: "01" is not (Triton skips it too), and
    # neither is one past int64 (Triton's versions are int64).
    available = [
        v
        for d in model_dir.iterdir()
        if d.is_dir() and not d.name.startswith("0") and (v := version_number(d.name)) is not None
    ]
    selected = spec.version_policy.select(available)
    missing = tuple(spec.version_policy.missing(available))
    if not selected:
        return ScannedModel(
            name,
            spec,
            f"model '{name}' has no version directory selected by its version policy "
            f"(found: {sorted(available) or 'none'})",
            config_files=config_files,
            missing=missing,
        )
    versions: dict[int, Path] = {}
    errors: dict[int, str] = {}
    files: dict[int, Fingerprint] = {}
    for v in selected:
        path = model_dir / str(v) / spec.default_model_filename
        if path.is_file():
            versions[v] = path
            files[v] = fingerprint(path.parent)
        else:
            errors[v] = f"version {v} has no {spec.default_model_filename}"
    return ScannedModel(name, spec, "", versions, errors, files, config_files, missing)


def _config_fingerprint(model_dir: Path) -> Fingerprint:
    found = []
    for n in CONFIG_FILES:
        try:
            st = os.stat(model_dir / n)
        except OSError:  # none (the config is optional), or removed meanwhile
            continue
        found.append((n, st.st_size, st.st_mtime_ns))
    return tuple(found)
