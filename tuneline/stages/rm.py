"""stage rm: a reward model (a scalar value head on the decoder) trained with TRL's RewardTrainer on
`ranking: true` datasets (dpo_en_demo), as LLaMA-Factory's stage rm.

Records are a conversation whose last message is the chosen response, plus `rejected` (as dpo).
Encoding renders both full conversations with the pipeline's template and cuts them with the
pairwise budget, into TRL 1.x's columns chosen_ids / rejected_ids. The model is
AutoModelForSequenceClassification with one label: its head `score` is trained in full (PEFT's
SEQ_CLS task saves it beside the LoRA weights), kept by merge and by the `merged` export. The loss is
-log sigmoid(r_chosen - r_rejected). Evaluation: pairwise accuracy on the eval split (rule
reward_accuracy), base (a new value head) vs tuned.
"""

from __future__ import annotations

from ..encoding import encode_rows
from .dpo import encode_pairwise

RECORD = "pair"
EVALUATION = ("pairwise",)
PACKING = False  # TRL pads each batch of pairs
MODEL = "reward"


def encode_ranked(template, example: dict, cutoff_len: int) -> tuple[dict, bool]:
    pair, cut = encode_pairwise(template, example, cutoff_len)
    return {"chosen_ids": pair["prompt_ids"] + pair["chosen_ids"],
            "rejected_ids": pair["prompt_ids"] + pair["rejected_ids"],
            "responses": bool(pair["chosen_ids"] and pair["rejected_ids"])}, cut


def encode(template, examples, params, log, split) -> tuple[dict, dict]:
    columns, truncated, dropped = encode_rows(
        examples, lambda ex: encode_ranked(template, ex, params["cutoff_len"]),
        lambda row: row["responses"], ["chosen_ids", "rejected_ids"],
        params, log, split, "preference pairs")
    lengths = [len(c) + len(r) for c, r in zip(columns["chosen_ids"], columns["rejected_ids"])]
    stats = {"examples": len(lengths), "truncated": truncated, "dropped_no_labels": dropped,
             "tokens": sum(lengths), "max_len": max(lengths, default=0)}
    log.info("%s: %d ranked pairs, %d tokens", split, stats["examples"], stats["tokens"])
    return columns, stats


def training_arguments(params: dict):
    """TRL's RewardConfig; tokenize already cut every pair to cutoff_len."""
    from trl import RewardConfig

    return RewardConfig, dict(max_length=None, gradient_checkpointing=params["gradient_checkpointing"])


def trainer(run):
    """TRL's RewardTrainer on the pairs tokenize wrote. The value head reads the last token that is
    not padding: the model's pad id is the tokenizer's."""
    from trl import RewardTrainer

    from ..modeling import pad_id
    from . import require_columns

    class PretokenizedRewardTrainer(RewardTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            require_columns(dataset, {"chosen_ids", "rejected_ids"}, dataset_name, "rm")
            return dataset

    run.model.config.pad_token_id = pad_id(run.tokenizer)
    run.log.info("reward model: value head `score` (%s) trained in full; loss -log sigmoid(r_chosen - r_rejected)",
                 "beside the LoRA weights" if run.params["finetuning_type"] == "lora" else run.params["finetuning_type"])
    return PretokenizedRewardTrainer(model=run.model, args=run.args, train_dataset=run.train_ds,
                                     eval_dataset=run.eval_ds, processing_class=run.tokenizer,
                                     optimizers=run.optimizers)


def real_tokens(dataset) -> int:
    return sum(len(c) + len(r) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"]))
