"""What every rule script does around its stage function: logging, errors, provenance, and the
guarantees about its outputs.

A script is three lines: import the stage function and call `run(snakemake, stage_fn)`.
The stage function gets plain values (input and output paths, its config slice, a logger) so
it can be called and tested without Snakemake.

Around the stage function, `run` makes sure that
- an output appears under its final name only when it is complete: the stage writes into a
  hidden staging path (`.partial.<name>` beside it), renamed into place after the stage and its
  checks passed. A failed check, Ctrl-C or a kill never leaves a complete-looking artifact; the
  reports of a failed output are kept in logs/<rule>.failed/ for inspection.
- no artifact made from a previous version of this job's outputs outlives it: when the job starts,
  every artifact under results/ whose provenance names one of these outputs as an input (and what
  was made from those, transitively) is removed, with a log line. Snakemake alone would keep a
  downstream result of the old config when this job fails and report "Nothing to be done" on
  the next run (snakemake/snakemake#3808).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from . import provenance
from .errors import TunelineError

RESULTS = Path("results")
STAGING_PREFIX = ".partial."
# Artifacts outside results/ that Tuneline wrote (the export rule's export_dir copies): listed here, and
# each carries EXPORT_MARKER, so that they go stale with what they were made from like any other.
EXTERNAL = RESULTS / ".external-artifacts"
EXPORT_MARKER = ".tuneline-export"


def register_external(folder: Path) -> None:
    """Remember an artifact written outside results/ (an export_dir copy)."""
    known = set(EXTERNAL.read_text().split("\n")) if EXTERNAL.is_file() else set()
    EXTERNAL.parent.mkdir(parents=True, exist_ok=True)
    EXTERNAL.write_text("\n".join(sorted((known | {str(Path(folder).resolve())}) - {""})) + "\n")


def external_records() -> list[Path]:
    folders = EXTERNAL.read_text().split("\n") if EXTERNAL.is_file() else []
    return [Path(f) / provenance.FILENAME for f in folders
            if f and (Path(f) / EXPORT_MARKER).is_file() and (Path(f) / provenance.FILENAME).is_file()]


def setup_logging(log_file: str | None, name: str, mode: str = "w") -> logging.Logger:
    """Log to the rule's `log:` file and to stderr (where Snakemake shows it)."""
    logger = logging.getLogger(f"tuneline.{name}")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode=mode, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def staging_path(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(STAGING_PREFIX + final.name)


def remove(path: Path) -> None:
    """Remove a file or folder; one already gone (a parallel job removed it) is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except FileNotFoundError:
        pass


def publish(staged: Path, final: Path) -> None:
    """Move a finished output into place (a rename: never half there)."""
    if not staged.exists():
        return  # the stage wrote nothing under this name; Snakemake reports the missing output
    if final.exists():
        remove(final)  # Snakemake removed it before the job; a leftover empty folder is replaced
    os.replace(staged, final)


def _norm(path) -> str:
    return os.path.normpath(str(path))


def downstream_artifacts(outputs, root: Path = RESULTS) -> list[Path]:
    """Artifacts under `root` (and the export_dir copies Tuneline wrote) made, directly or transitively,
    from any of `outputs`, by their provenance."""
    records = {}
    if root.is_dir():
        found = list(root.rglob(provenance.FILENAME)) + list(root.rglob(provenance.SIDECAR_GLOB))
        for rec in found + (external_records() if root == RESULTS else []):
            artifact = provenance.artifact_of(rec)
            if STAGING_PREFIX in str(artifact):
                continue
            inputs = provenance.read_inputs(rec)
            if inputs is not None:
                records[artifact] = inputs
    stale, frontier = [], [_norm(o) for o in outputs]
    while frontier:
        made_from = frontier.pop()
        for artifact, inputs in records.items():
            if artifact in stale:
                continue
            if any(p == made_from or p.startswith(made_from + os.sep) for p in map(_norm, inputs)):
                stale.append(artifact)
                frontier.append(_norm(artifact))
    return stale


def invalidate_downstream(outputs, log) -> None:
    for artifact in downstream_artifacts(outputs):
        if artifact.exists():
            log.info("removing %s: it was made from %s, which this job replaces", artifact,
                     " / ".join(str(o) for o in outputs))
            remove(artifact)
        provenance.remove_record(artifact)


def keep_failed_reports(rule: str, staged: list[Path], log_file: str | None, log) -> None:
    """A failed check's report JSONs, copied where the user can read them (the output itself is removed)."""
    reports = [f for s in staged for f in ([s] if s.is_file() else s.rglob("*.json") if s.is_dir() else [])
               if f.suffix == ".json" and "report" in f.name]
    if not reports:
        return
    keep = Path(log_file).with_suffix(".failed") if log_file else Path("logs") / f"{rule}.failed"
    remove(keep)
    keep.mkdir(parents=True)
    for f in reports:
        shutil.copy(f, keep / f.name.removeprefix(STAGING_PREFIX))
    log.error("the failed output was removed; its reports are kept in %s/", keep)


def run(smk, stage_fn, **extra_kwargs) -> None:
    """Run `stage_fn(inputs, outputs, params, log, threads, **extra_kwargs)` for the Snakemake job `smk`."""
    rule = smk.rule
    log_file = smk.log[0] if len(smk.log) else None
    log = setup_logging(log_file, rule)
    inputs = dict(smk.input.items())
    finals = {name: Path(path) for name, path in smk.output.items()}
    # the rule's config slice plus any other named params (e.g. prepare_data's registry entries)
    params = {**smk.params.cfg, **{k: v for k, v in smk.params.items() if k != "cfg"}}
    staged = {name: staging_path(path) for name, path in finals.items()}
    run_stage(rule, stage_fn, inputs, finals, staged, params, log, log_file, smk.threads, **extra_kwargs)


def run_stage(rule, stage_fn, inputs, finals: dict, staged: dict, params, log, log_file=None, threads=1,
              **extra_kwargs) -> None:
    """`run` without Snakemake's job object: stage into `staged`, check, publish into `finals`."""
    invalidate_downstream(list(finals.values()), log)
    for path in staged.values():
        remove(path)  # left by a job that was killed
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        extra = stage_fn(inputs=inputs, outputs={k: str(v) for k, v in staged.items()}, params=params, log=log,
                         threads=threads, **extra_kwargs) or {}
        for name, path in staged.items():
            provenance.write(path, rule, params, inputs, extra, artifact=finals[name])
    except BaseException as err:
        if isinstance(err, TunelineError):
            log.error("%s", err)
            keep_failed_reports(rule, list(staged.values()), log_file, log)
        elif isinstance(err, KeyboardInterrupt):
            log.error("interrupted: nothing of this job's output is kept")
        else:  # a bug or a library's error: its traceback belongs in the rule's log too
            log.exception("%s failed", rule)
        for path in staged.values():
            remove(path)
        if isinstance(err, TunelineError):
            sys.exit(1)
        raise
    for name, path in staged.items():
        publish(path, finals[name])
    log.info("done: %s", ", ".join(str(p) for p in finals.values()))
