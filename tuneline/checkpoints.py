"""Checkpoints of the train rule, keyed by what they belong to, and resume after a kill.

They go to .tuneline/checkpoints/<key>, outside the output that Snakemake owns; the key is a hash
of the train config slice and the tokenized data, and the folder is removed after a successful run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .provenance import sha256_path

CHECKPOINT_ROOT = Path(".tuneline") / "checkpoints"


def train_key(params: dict, tokenized: str) -> dict:
    """What a checkpoint belongs to: the train config slice and the tokenized data's digest."""
    return {"params": params, "tokenized": sha256_path(tokenized)}


def checkpoint_dir(key: dict) -> Path:
    digest = hashlib.sha256((json.dumps(key["params"], sort_keys=True) + key["tokenized"]).encode()).hexdigest()
    return CHECKPOINT_ROOT / f"train-{digest[:16]}"


def resumable_checkpoint(ckpt: Path, key: dict, log) -> str | None:
    """The newest complete checkpoint of an interrupted run of exactly this config and data, if any.
    The folder name is a hash of both; train_key.json inside is checked too, never trusted blindly.
    The Trainer writes trainer_state.json last: a checkpoint without it was cut off mid-save."""
    if not ckpt.is_dir():
        return None
    stored = ckpt / "train_key.json"
    if not stored.is_file() or json.loads(stored.read_text()) != key:
        log.warning("%s holds checkpoints of another config or data: removing them, starting fresh", ckpt)
        shutil.rmtree(ckpt, ignore_errors=True)
        return None
    by_step = sorted(ckpt.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for candidate in by_step:
        try:
            json.loads((candidate / "trainer_state.json").read_text())
            return str(candidate)
        except (OSError, ValueError):
            log.warning("%s was cut off while being saved: skipping it", candidate)
    return None
