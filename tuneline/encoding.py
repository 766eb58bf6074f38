"""Shared token-level helpers for the stages' encoders (LLaMA-Factory's length budget and masks)."""

from __future__ import annotations

import contextlib
import os

IGNORE_INDEX = -100
MIN_CHUNK = 64  # examples per worker below which a worker process costs more than it saves

# the tokenize job's worker processes (its threads: data_job_cpus, or LLaMA-Factory's preprocessing_num_workers)
_WORKERS = 1
_JOB: tuple = ()  # (encode_one, examples) of the running encode_rows, inherited by the forked workers


@contextlib.contextmanager
def workers(n: int):
    """encode_rows inside this block encodes in up to `n` forked processes (same rows, same order)."""
    global _WORKERS
    before, _WORKERS = _WORKERS, max(1, int(n or 1))
    try:
        yield
    finally:
        _WORKERS = before


def _encode_chunk(bounds: tuple[int, int]) -> list:
    encode_one, examples = _JOB
    return [encode_one(ex) for ex in examples[bounds[0]:bounds[1]]]


def _encode_all(examples, encode_one, log, split) -> list:
    """[(row, cut)] for every example, in order; in _WORKERS forked processes when the split is big enough.
    Fork, because the stages' encoders are closures over the template (not picklable)."""
    global _JOB
    import multiprocessing

    n = min(_WORKERS, len(examples) // MIN_CHUNK)
    if n < 2:
        return [encode_one(ex) for ex in examples]
    step = -(-len(examples) // n)
    _JOB = (encode_one, examples)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the Rust tokenizer's threads do not survive a fork
    try:
        with multiprocessing.get_context("fork").Pool(n) as pool:
            chunks = pool.map(_encode_chunk, [(a, a + step) for a in range(0, len(examples), step)])
    finally:
        _JOB = ()
    log.info("%s: %d examples encoded in %d processes", split, len(examples), n)
    return [done for chunk in chunks for done in chunk]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of a length budget between prompt and response."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def sequence_columns(rows: list[tuple[list[int], list[int]]]) -> dict:
    """input_ids / attention_mask / labels columns from (input_ids, labels) rows."""
    return {"input_ids": [ids for ids, _ in rows], "attention_mask": [[1] * len(ids) for ids, _ in rows],
            "labels": [labels for _, labels in rows]}


def encode_rows(examples, encode_one, has_labels, columns: list[str], params, log, split, what="examples"):
    """Run a stage's per-example encoder over a split, counting what was cut and what was dropped (no
    label left after truncation), with a log line for each. -> (columns, truncated, dropped)."""
    out = {key: [] for key in columns}
    truncated = dropped = 0
    for row, cut in _encode_all(examples, encode_one, log, split):
        truncated += cut
        if not has_labels(row):
            dropped += 1
            continue
        for key in columns:
            out[key].append(row[key])
    if truncated:
        log.warning("%s: %d of %d %s were longer than cutoff_len=%d and were truncated",
                    split, truncated, len(examples), what, params["cutoff_len"])
    if dropped:
        log.warning("%s: dropped %d %s with an empty response left after truncation", split, dropped, what)
    return out, truncated, dropped
