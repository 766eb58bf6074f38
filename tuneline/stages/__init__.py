"""One module per `stage` value: what a stage keeps of a record, how it encodes it, how it trains
and how it is evaluated. The rules call these through `get(stage)`; nothing else branches on
`stage`. Adding a stage is a module here, its name in STAGES and in config/schema.yaml, and tests.

A stage module defines:
    RECORD       what prepare_data keeps of a record: "conversation" ({messages, system, tools}),
                 "text" ({text}), "pair" (a conversation plus `rejected`) or "tagged" (a
                 conversation plus a boolean `label`, LLaMA-Factory's kto_tag)
    EVALUATION   the evaluation targets that apply: "generation" (predict + BLEU/ROUGE), "mmlu",
                 "pairwise" (a reward model's accuracy on ranked pairs)
    PACKING      whether packed batches apply (`packing` is ignored, with a log line, otherwise)
    MODEL        the model class trained, merged and evaluated: "causal_lm", or "reward" (a scalar
                 value head, AutoModelForSequenceClassification with one label)
    encode(template, examples, params, log, split) -> (columns, stats)      rule tokenize
    training_arguments(params) -> (TrainingArguments class, extra kwargs)  rule train
    trainer(run) -> a transformers Trainer                                 rule train
    real_tokens(dataset) -> tokens the model reads in one epoch            train_report.json

Imported by the Snakefile (EVALUATION): stage modules import heavy libraries inside functions only.
"""

from __future__ import annotations

import importlib

STAGES = ("sft", "pt", "dpo", "kto", "rm", "grpo", "rloo")


def get(stage: str):
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; Tuneline's stages are {', '.join(STAGES)}")
    return importlib.import_module(f"{__name__}.{stage}")


class TrainRun:
    """What a stage's `trainer()` gets from the train rule."""

    def __init__(self, model, args, params, tokenizer, train_ds, eval_ds, optimizers, base, log, packed=False):
        self.model, self.args, self.params, self.tokenizer = model, args, params, tokenizer
        self.train_ds, self.eval_ds, self.optimizers, self.base, self.log = train_ds, eval_ds, optimizers, base, log
        self.packed = packed  # packed batches (packing, for a stage and attention that take them)


def frozen_reference(run):
    """The reference model of a preference stage: None for LoRA (TRL then uses the base through a frozen
    copy of the untrained adapter), else a frozen second copy of the base weights."""
    if run.params["finetuning_type"] == "lora":
        return None
    from ..modeling import load_causal_lm

    ref_model = load_causal_lm(run.base, run.model.dtype, None).eval()
    ref_model.requires_grad_(False)
    return ref_model


def require_columns(dataset, columns: set[str], split: str, stage: str) -> None:
    """A TRL trainer fed tokenize's columns: the split must have been tokenized for this stage."""
    from ..errors import TunelineError

    missing = columns - set(dataset.column_names)
    if missing:
        raise TunelineError(f"the {split} split has no {', '.join(sorted(missing))}: it was not tokenized for stage "
                            f"{stage}. Rerun tokenize (snakemake -R tokenize).")
