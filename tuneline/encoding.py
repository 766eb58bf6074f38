"""Shared token-level helpers for the stages' encoders (LLaMA-Factory's length budget and masks)."""

from __future__ import annotations

IGNORE_INDEX = -100


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
    for ex in examples:
        row, cut = encode_one(ex)
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
