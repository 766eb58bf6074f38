"""stage pt: continued pre-training on raw text (LLaMA-Factory's `columns: {prompt: text}` datasets).

Each text is (bos where the tokenizer adds one +) text + eos with every token learned; a text
longer than cutoff_len becomes several windows, nothing is cut. Trained like sft; evaluated by
MMLU only (there are no responses to score).
"""

from __future__ import annotations

from ..encoding import sequence_columns
from . import sft

RECORD = "text"
EVALUATION = ("mmlu",)
PACKING = True
MODEL = "causal_lm"  # the model class trained, merged and evaluated ("reward": a value head, stage rm)
training_arguments, trainer, real_tokens = sft.training_arguments, sft.trainer, sft.real_tokens


def encode_text(tokenizer, text: str, cutoff_len: int) -> list[list[int]]:
    """(bos +) text + eos as windows of at most cutoff_len tokens; bos where the tokenizer adds one
    (llama-style), as LLaMA-Factory does."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [ids[i:i + cutoff_len] for i in range(0, len(ids), cutoff_len)]


def encode(template, examples, params, log, split) -> tuple[dict, dict]:
    rows, split_texts = [], 0
    for ex in examples:
        windows = encode_text(template.tokenizer, ex["text"], params["cutoff_len"])
        split_texts += len(windows) > 1
        rows += [(ids, list(ids)) for ids in windows]
    columns = sequence_columns(rows)
    lengths = [len(x) for x in columns["input_ids"]]
    stats = {"texts": len(examples), "examples": len(lengths), "split_into_windows": split_texts,
             "tokens": sum(lengths), "max_len": max(lengths, default=0), "label_tokens": sum(lengths)}
    if split_texts:
        log.info("%s: %d of %d texts were longer than cutoff_len=%d and were split into windows (%d in all); "
                 "no token is dropped", split, split_texts, len(examples), params["cutoff_len"], len(lengths))
    log.info("%s: %d texts, %d windows, %d tokens", split, len(examples), len(lengths), stats["tokens"])
    return columns, stats
