"""Rule `tokenize`: render each example with the template, cut to cutoff_len, mask the prompt.

Follows LLaMA-Factory's supervised encoding: per-turn (source, target) pairs, a length budget
shared between them (`infer_seqlen`), labels -100 on the prompt unless train_on_prompt, and with
mask_history only the last turn learned (it gets the budget first). Truncated and dropped
examples are counted in the log and stats.json.

By `stage`: sft writes input_ids/attention_mask/labels; pt the same for raw text (text + eos,
every token learned; a text longer than cutoff_len becomes several windows, nothing is cut);
dpo writes TRL's preference columns prompt_ids/chosen_ids/rejected_ids, the prompt and both
responses rendered with the template and cut like LLaMA-Factory's pairwise encoding.
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


def encode_text(tokenizer, text: str, cutoff_len: int) -> list[list[int]]:
    """Pre-training: (bos +) text + eos as windows of at most cutoff_len tokens; bos where the
    tokenizer adds one (llama-style), as LLaMA-Factory does."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [ids[i:i + cutoff_len] for i in range(0, len(ids), cutoff_len)]


def encode_pairwise(template: Template, example: dict, cutoff_len: int) -> tuple[dict, bool]:
    """-> ({prompt_ids, chosen_ids, rejected_ids}, truncated): the prompt is every turn before the
    last response; one length budget for the prompt and the longer response (infer_seqlen)."""
    system, tools = example.get("system", ""), example.get("tools", "")
    rejected = example["messages"][:-1] + [{"role": "assistant", "content": example["rejected"]}]
    completions = []
    for messages in (example["messages"], rejected):
        pairs = template.encode_turns(messages, system, tools)
        prompt = [t for s, r in pairs[:-1] for t in s + r] + pairs[-1][0]
        completions.append(pairs[-1][1] + ([template.tokenizer.eos_token_id] if template.efficient_eos else []))
    chosen, rejected = completions
    s_len, t_len = infer_seqlen(len(prompt), max(len(chosen), len(rejected)), cutoff_len)
    cut = s_len < len(prompt) or t_len < max(len(chosen), len(rejected))
    return {"prompt_ids": prompt[:s_len], "chosen_ids": chosen[:t_len], "rejected_ids": rejected[:t_len]}, cut


def tokenize_pairs(template, examples, params, log, split) -> tuple[dict, dict]:
    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    truncated = dropped = 0
    for ex in examples:
        row, cut = encode_pairwise(template, ex, params["cutoff_len"])
        truncated += cut
        if not row["chosen_ids"] or not row["rejected_ids"]:
            dropped += 1
            continue
        for key, ids in row.items():
            columns[key].append(ids)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(*columns.values())]
    stats = {"examples": len(lengths), "truncated": truncated, "dropped_no_labels": dropped,
             "tokens": sum(lengths), "max_len": max(lengths, default=0)}
    if truncated:
        log.warning("%s: %d of %d preference pairs were longer than cutoff_len=%d and were truncated",
                    split, truncated, len(examples), params["cutoff_len"])
    if dropped:
        log.warning("%s: dropped %d pairs with an empty response left after truncation", split, dropped)
    log.info("%s: %d preference pairs, %d tokens", split, stats["examples"], stats["tokens"])
    return columns, stats


def tokenize_texts(tokenizer, examples, params, log, split) -> tuple[dict, dict]:
    columns = {"input_ids": [], "attention_mask": [], "labels": []}
    split_texts = 0
    for ex in examples:
        windows = encode_text(tokenizer, ex["text"], params["cutoff_len"])
        split_texts += len(windows) > 1
        for ids in windows:
            columns["input_ids"].append(ids)
            columns["attention_mask"].append([1] * len(ids))
            columns["labels"].append(list(ids))
    lengths = [len(x) for x in columns["input_ids"]]
    stats = {"texts": len(examples), "examples": len(lengths), "split_into_windows": split_texts,
             "tokens": sum(lengths), "max_len": max(lengths, default=0), "label_tokens": sum(lengths)}
    if split_texts:
        log.info("%s: %d of %d texts were longer than cutoff_len=%d and were split into windows (%d in all); "
                 "no token is dropped", split, split_texts, len(examples), params["cutoff_len"], len(lengths))
    log.info("%s: %d texts, %d windows, %d tokens", split, len(examples), len(lengths), stats["tokens"])
    return columns, stats


def tokenize_split(template, examples, params, log, split) -> tuple[dict, dict]:
    if params["stage"] == "pt":
        return tokenize_texts(template.tokenizer, examples, params, log, split)
    if params["stage"] == "dpo":
        return tokenize_pairs(template, examples, params, log, split)
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
        source = inputs["data"] if split == "train" else inputs.get("eval_data", inputs["data"])
        examples = read_jsonl(Path(source) / f"{split}.jsonl")
        columns, all_stats[split] = tokenize_split(template, examples, params, log, split)
        if split == "train" and not any(columns.values()):
            raise TunelineError("no training examples left after tokenization (all were dropped); "
                                "raise cutoff_len or check the data.")
        if any(columns.values()):  # no folder for an empty split (val_size: 0)
            datasets.Dataset.from_dict(columns).save_to_disk(str(out / split))
    (out / "template.json").write_text(json.dumps(template.describe(), indent=2, ensure_ascii=False) + "\n")
    (out / "stats.json").write_text(json.dumps(all_stats, indent=2) + "\n")
    for split, stats in all_stats.items():  # gate: most of a split lost to truncation is a config error
        dropped = stats.get("dropped_no_labels", 0)
        if dropped * 2 > dropped + stats["examples"]:
            raise TunelineError(f"{split}: {dropped} of {dropped + stats['examples']} examples had no response "
                                f"token left after truncation to cutoff_len={params['cutoff_len']} (stats.json): "
                                "raise cutoff_len.")
    return {"stats": all_stats, "template": template.name}
