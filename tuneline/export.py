"""Rule `export`: the export_format result copied to export_dir (LLaMA-Factory's output folder key).

export_dir is a user's folder, and Snakemake empties a rule's output folder before the job runs.
So the folder is checked when the workflow is read, before any job: `~` is expanded, the project's
own folders (and any folder holding them) are refused, and an existing folder must be empty or
carry MARKER, the file this rule writes into every export: a folder Tuneline did not write is
never deleted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import TunelineError
from .rule import EXPORT_MARKER as MARKER
from .rule import STAGING_PREFIX, register_external


def check_target(export_dir: str, roots: list[str | Path], owned: list[str | Path]) -> str:
    """The export_dir path to use (`~` expanded), or an error that says why it cannot be written.
    `roots` (the project, the working directory) may hold an export folder; `owned` folders
    (data, results, code) may neither be nor hold one."""
    target = Path(os.path.expanduser(export_dir))
    resolved = target.resolve()
    for folder, inside_too in [(f, False) for f in roots] + [(f, True) for f in owned]:
        folder = Path(folder).resolve()
        if folder.is_relative_to(resolved) or (inside_too and resolved.is_relative_to(folder)):
            raise TunelineError(f"export_dir={export_dir!r} is, holds or lies inside the project's own folder {folder}: "
                                "Tuneline replaces export_dir on every export. Choose a folder of its own, e.g. "
                                "export_dir=~/models/my-model.")
    if resolved.exists() and not resolved.is_dir():
        raise TunelineError(f"export_dir={export_dir!r} is a file, not a folder.")
    if resolved.is_dir() and any(resolved.iterdir()) and not (resolved / MARKER).is_file():
        raise TunelineError(f"export_dir={export_dir!r} holds files that Tuneline did not write (no {MARKER} "
                            "in it), and an export replaces the whole folder. Choose a new or empty folder.")
    return str(target)


def main(inputs, outputs, params, log, threads=1):
    source, target = Path(inputs["chosen"]), Path(outputs["export"])
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    (target / MARKER).write_text(f"written by Tuneline's export rule from {source}; the next export replaces "
                                 "this folder.\n")
    register_external(target.with_name(target.name.removeprefix(STAGING_PREFIX)))  # its final name
    log.info("copied %s (export_format %s) to %s", source, params["export_format"], target)
    return {"copied_from": str(source)}
