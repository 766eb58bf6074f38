"""Rule `prepare_data`: registry datasets -> train.jsonl / validation.jsonl (tuneline/records.py
reads and converts them; this rule splits and writes)."""

from __future__ import annotations

from .errors import TunelineError
from .records import collect_for, write_splits


def split(examples: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not val_size:
        return examples, []
    n_val = int(val_size) if val_size >= 1 else max(1, round(len(examples) * val_size))
    if n_val >= len(examples):
        raise TunelineError(
            f"val_size={val_size} asks for {n_val} validation examples but only {len(examples)} remain; lower it."
        )
    import datasets

    parts = datasets.Dataset.from_list(examples).train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"].to_list(), parts["test"].to_list()


def main(inputs, outputs, params, log, threads=1):
    examples, stats = collect_for(params, log)
    train, val = split(examples, params["val_size"], params["seed"])
    return write_splits(outputs["data"], train, val, stats, log)

