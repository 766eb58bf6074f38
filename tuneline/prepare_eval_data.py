"""Rule `prepare_eval_data`: the `eval_dataset` names as an eval split (validation.jsonl).

Used by `predict` instead of the `val_size` split when eval_dataset is set; read exactly like
prepare_data reads `dataset`, so the same registry, formats and placeholders apply.
"""

from __future__ import annotations

from .records import collect_for, write_splits


def main(inputs, outputs, params, log, threads=1):
    examples, stats = collect_for(params, log)
    return write_splits(outputs["data"], [], examples, stats, log)
