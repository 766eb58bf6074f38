"""stage sft: supervised fine-tuning on conversations, the prompt masked.

Encoding follows LLaMA-Factory's supervised encoding: per-turn (source, target) pairs, a length
budget shared between them (`infer_seqlen`), labels -100 on the prompt unless train_on_prompt, and
with mask_history only the last turn learned (it gets the budget first). Trained with the HF
Trainer (packed batches by default); evaluated by generation (BLEU/ROUGE) and MMLU.
"""

from __future__ import annotations

from ..encoding import IGNORE_INDEX, encode_rows, infer_seqlen

RECORD = "conversation"
EVALUATION = ("generation", "mmlu")
PACKING = True
MODEL = "causal_lm"  # the model class trained, merged and evaluated ("reward": a value head, stage rm)


def encode_supervised(template, example: dict, cutoff_len: int, train_on_prompt: bool,
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


def encode(template, examples, params, log, split) -> tuple[dict, dict]:
    def one(ex):
        ids, labels, cut = encode_supervised(template, ex, params["cutoff_len"], params["train_on_prompt"],
                                             params["mask_history"])
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, cut

    columns, truncated, dropped = encode_rows(
        examples, one, lambda row: any(label != IGNORE_INDEX for label in row["labels"]),
        ["input_ids", "attention_mask", "labels"], params, log, split)
    lengths = [len(x) for x in columns["input_ids"]]
    stats = {"examples": len(lengths), "truncated": truncated, "dropped_no_labels": dropped,
             "tokens": sum(lengths), "max_len": max(lengths, default=0),
             "label_tokens": sum(sum(1 for v in lab if v != IGNORE_INDEX) for lab in columns["labels"])}
    log.info("%s: %d examples, %d tokens (longest %d)", split, stats["examples"], stats["tokens"], stats["max_len"])
    return columns, stats


def training_arguments(params: dict):
    from transformers import TrainingArguments

    return TrainingArguments, {}


def trainer(run):
    from ..batching import causal_lm_trainer

    return causal_lm_trainer(run)


def real_tokens(dataset) -> int:
    return sum(map(len, dataset["input_ids"]))
