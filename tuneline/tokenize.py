"""Rule `tokenize`: render each example with the template, cut to cutoff_len, mask the prompt.

Follows LLaMA-Factory's supervised encoding: per-turn (source, target) pairs, a length budget
shared between them (`infer_seqlen`), labels -100 on the prompt unless train_on_prompt, and with
mask_history only the last turn learned (it gets the budget first). Truncated and dropped
examples are counted in the log and stats.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TunelineError
from .jsonl import read_jsonl
from .templates import Template, get_template

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


def encode_supervised(template: Template, example: dict, cutoff_len: int, train_on_prompt: bool,
                      mask_history: bool) -> tuple[list[int], list[int], bool]:
    """-> (input_ids, labels, truncated)."""
    pairs = template.encode_turns(example["messages"], example.get("system", ""), example.get("tools", ""))
    full_len = sum(len(s) + len(t) for s, t in pairs)
    eos = template.tokenizer.eos_token_id
    if mask_history:
        pairs = pairs[::-1]
    input_ids, labels, total = [], [], 0
    for turn, (source, target) in enumerate(pairs):
        if total >= cutoff_len:
            break
        s_len, t_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        source, target = source[:s_len], target[:t_len]
        total += s_len + t_len
        if train_on_prompt:
            source_labels = source
        elif template.efficient_eos and turn != 0:
            source_labels = [eos] + [IGNORE_INDEX] * (s_len - 1)
        else:
            source_labels = [IGNORE_INDEX] * s_len
        target_labels = [IGNORE_INDEX] * t_len if (mask_history and turn != 0) else target
        if mask_history:
            input_ids, labels = source + target + input_ids, source_labels + target_labels + labels
        else:
            input_ids, labels = input_ids + source + target, labels + source_labels + target_labels
    if template.efficient_eos:
        input_ids, labels = input_ids + [eos], labels + [eos]
    return input_ids, labels, full_len > cutoff_len


def tokenize_split(template, examples, params, log, split) -> tuple[dict, dict]:
    columns = {"input_ids": [], "attention_mask": [], "labels": []}
    truncated = dropped = 0
    for ex in examples:
        ids, labels, cut = encode_supervised(template, ex, params["cutoff_len"], params["train_on_prompt"],
                                             params["mask_history"])
        truncated += cut
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1  # nothing left to learn after truncation
            continue
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(labels)
    lengths = [len(x) for x in columns["input_ids"]]
    stats = {"examples": len(lengths), "truncated": truncated, "dropped_no_labels": dropped,
             "tokens": sum(lengths), "max_len": max(lengths, default=0),
             "label_tokens": sum(sum(1 for v in lab if v != IGNORE_INDEX) for lab in columns["labels"])}
    if truncated:
        log.warning("%s: %d of %d examples were longer than cutoff_len=%d and were truncated",
                    split, truncated, len(examples), params["cutoff_len"])
    if dropped:
        log.warning("%s: dropped %d examples with no response tokens left after truncation", split, dropped)
    log.info("%s: %d examples, %d tokens (longest %d)", split, stats["examples"], stats["tokens"], stats["max_len"])
    return columns, stats


def main(inputs, outputs, params, log, threads=1):
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    template = get_template(params["template"], tokenizer, params["default_system"], log)
    log.info("template: %s", template.name)
    out = Path(outputs["tokenized"])
    out.mkdir(parents=True, exist_ok=True)
    all_stats = {}
    for split in ("train", "validation"):
        examples = read_jsonl(Path(inputs["data"]) / f"{split}.jsonl")
        columns, all_stats[split] = tokenize_split(template, examples, params, log, split)
        if split == "train" and not columns["input_ids"]:
            raise TunelineError("no training examples left after tokenization (all were dropped); "
                                "raise cutoff_len or check the data.")
        if columns["input_ids"]:  # no folder for an empty split (val_size: 0)
            datasets.Dataset.from_dict(columns).save_to_disk(str(out / split))
    (out / "template.json").write_text(json.dumps(template.describe(), indent=2, ensure_ascii=False) + "\n")
    (out / "stats.json").write_text(json.dumps(all_stats, indent=2) + "\n")
    return {"stats": all_stats, "template": template.name}
