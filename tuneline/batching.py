"""Batches for causal-LM training (stages sft and pt): packed or padded, logits only where a label is."""

from __future__ import annotations

from .modeling import base_of


class LabelledLogitsOnly:
    """Wraps a collator so that the output layer and the loss run only at positions that predict a
    label: transformers' `logits_to_keep` (a tensor of positions) and `shift_labels` (their targets).
    In SFT the prompt tokens predict nothing, and on a small model the vocabulary-sized output layer
    and its softmax are a large part of each step (SmolLM2: 49152 x 576). The loss is the same sum
    over the same targets, divided by the same count (`labels` stays in the batch for the Trainer)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        shifted = batch["labels"][:, 1:]  # position t predicts token t + 1
        keep = (shifted != -100).any(0).nonzero().squeeze(1)
        if len(keep):
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = shifted[:, keep].contiguous()
        return batch


def make_collator(tokenizer, packing: bool, model=None):
    """Packing: the batch as one row, position ids restarting per example, the example boundaries
    for modeling.packed_sdpa, and the first label of each example masked, so no example predicts
    from another. Otherwise: padded to the longest example of the batch. Either way logits only
    where a label is, when the model's forward takes `logits_to_keep`."""
    import inspect

    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100,
                                              return_flash_attn_kwargs=True)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    if model is not None and "logits_to_keep" in inspect.signature(base_of(model).forward).parameters:
        return LabelledLogitsOnly(collator)
    return collator


def causal_lm_trainer(run):
    """The HF Trainer on input_ids/labels rows, with `make_collator`'s batches."""
    from transformers import Trainer

    return Trainer(model=run.model, args=run.args, train_dataset=run.train_ds,
                   data_collator=make_collator(run.tokenizer, run.packed, run.model),
                   eval_dataset=run.eval_ds, optimizers=run.optimizers)
