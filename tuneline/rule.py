"""What every rule script does around its stage function: logging, errors, provenance.

A script is three lines: import the stage function and call `run(snakemake, stage_fn)`.
The stage function gets plain values (input and output paths, its config slice, a logger) so
it can be called and tested without Snakemake.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from . import provenance
from .errors import TunelineError


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


def run(smk, stage_fn, **extra_kwargs) -> None:
    """Run `stage_fn(inputs, outputs, params, log, threads, **extra_kwargs)` for the Snakemake job `smk`."""
    rule = smk.rule
    log = setup_logging(smk.log[0] if len(smk.log) else None, rule)
    inputs = dict(smk.input.items())
    outputs = dict(smk.output.items())
    # the rule's config slice plus any other named params (e.g. prepare_data's registry entries)
    params = {**smk.params.cfg, **{k: v for k, v in smk.params.items() if k != "cfg"}}
    try:
        extra = stage_fn(inputs=inputs, outputs=outputs, params=params, log=log, threads=smk.threads,
                         **extra_kwargs) or {}
    except TunelineError as err:
        log.error("%s", err)
        sys.exit(1)
    except Exception:  # a bug or a library's error: its traceback belongs in the rule's log too
        log.exception("%s failed", rule)
        raise
    for out in outputs.values():
        if Path(out).is_dir():
            provenance.write(out, rule, params, inputs, extra)
    log.info("done: %s", ", ".join(outputs.values()))
