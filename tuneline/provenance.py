"""provenance.json: what made an artifact (config slice, input hashes, package versions)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

PACKAGES = (
    "tuneline", "torch", "transformers", "peft", "bitsandbytes", "accelerate",
    "datasets", "tokenizers", "safetensors", "gguf", "snakemake",
)
FILENAME = "provenance.json"  # inside a folder artifact
SIDECAR_GLOB = ".*.provenance.json"  # beside a file artifact: .<name>.provenance.json


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Hash of a file, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel == FILENAME:  # the provenance of an input is not part of its content
            continue
        h.update(rel.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sidecar(artifact: str | Path) -> Path:
    """Where a file artifact's provenance lives: beside it, as .<name>.provenance.json."""
    artifact = Path(artifact)
    return artifact.with_name(f".{artifact.name}.provenance.json")


def artifact_of(record: Path) -> Path:
    if record.name == FILENAME:
        return record.parent
    return record.with_name(record.name.removeprefix(".").removesuffix(".provenance.json"))


def read_inputs(record: Path) -> list[str] | None:
    """The input paths a provenance record names (None for an unreadable record)."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        return [entry["path"] for entries in data.get("inputs", {}).values() for entry in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remove_record(artifact: Path) -> None:
    record = sidecar(artifact)
    if record.is_file():
        record.unlink()


def write(out: str | Path, rule: str, params: dict, inputs: dict, extra: dict | None = None,
          artifact: str | Path | None = None):
    """The record of `out` (a folder, or a file: its record goes beside it, named after `artifact`,
    the final name of a staged output). `inputs` maps names to a path or a list of paths."""

    def paths(value):
        return [value] if isinstance(value, (str, Path)) else list(value)

    out = Path(out)
    if not out.exists():
        return None
    artifact = Path(artifact or out)
    record = {
        "rule": rule,
        "artifact": str(artifact),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": params,
        "inputs": {name: [{"path": str(p), "sha256": sha256_path(p)} for p in paths(v)] for name, v in inputs.items()},
        "packages": package_versions(),
    }
    if extra:
        record.update(extra)
    target = out / FILENAME if out.is_dir() else sidecar(artifact)
    target.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return record
