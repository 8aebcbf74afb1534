"""Scans a model repository on disk: <repo>/<model>/[config] + <repo>/<model>/<version>/model.onnx.

Pure file-system reading; a broken model becomes a ScannedModel with a reason, never an
exception, so one bad model cannot stop the server or the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from server.model_config import ConfigError, read_model_config
from server.types import ModelSpec

__all__ = ["ScannedModel", "scan_model", "scan_repository"]


@dataclass(frozen=True, slots=True)
class ScannedModel:
    name: str
    spec: ModelSpec | None
    reason: str = ""  # why the model as a whole cannot load ("" = fine)
    versions: dict[int, Path] = field(default_factory=dict)  # selected version -> model file
    version_errors: dict[int, str] = field(default_factory=dict)


def scan_repository(root: Path) -> list[ScannedModel]:
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    return [
        scan_model(root, d.name)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_"))
    ]


def scan_model(root: Path, name: str, spec: ModelSpec | None = None) -> ScannedModel:
    model_dir = root / name
    if not model_dir.is_dir():
        return ScannedModel(name, None, f"model '{name}' is not in the repository")
    if spec is None:
        try:
            spec = read_model_config(model_dir)
        except ConfigError as exc:
            return ScannedModel(name, None, str(exc))
    available = [
        int(d.name)
        for d in model_dir.iterdir()
        if d.is_dir() and d.name.isascii() and d.name.isdigit() and not d.name.startswith("0")
    ]
    selected = spec.version_policy.select(available)
    if not selected:
        return ScannedModel(
            name,
            spec,
            f"model '{name}' has no version directory selected by its version policy "
            f"(found: {sorted(available) or 'none'})",
        )
    versions: dict[int, Path] = {}
    errors: dict[int, str] = {}
    for v in selected:
        path = model_dir / str(v) / spec.default_model_filename
        if path.is_file():
            versions[v] = path
        else:
            errors[v] = f"version {v} has no {spec.default_model_filename}"
    return ScannedModel(name, spec, "", versions, errors)
