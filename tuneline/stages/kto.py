"""stage kto: Kahneman-Tversky optimisation with TRL's KTOTrainer on unpaired, labelled data.

Records are a conversation whose last message is the response, plus `label` (LLaMA-Factory's
`kto_tag` column: true for a desirable response, false for an undesirable one; kto_en_demo).
Encoding renders the prompt (every turn before the last response) and the response with the
pipeline's template, cut with LLaMA-Factory's budget, into TRL 1.x's columns prompt_ids /
completion_ids / label. pref_beta is KTO's beta; kto_chosen_weight and kto_rejected_weight weigh
the desirable and undesirable losses. The reference model is the base. Evaluated like sft.
"""

from __future__ import annotations

from ..encoding import encode_rows, infer_seqlen

RECORD = "tagged"
EVALUATION = ("generation", "mmlu")
PACKING = False  # TRL pads each batch
MODEL = "causal_lm"  # the model class trained, merged and evaluated ("reward": a value head, stage rm)
adapters_to_drop = ("ref",)  # KTOTrainer's frozen reference copy of the adapter


def encode_unpaired(template, example: dict, cutoff_len: int) -> tuple[dict, bool]:
    pairs = template.encode_turns(example["messages"], example.get("system", ""), example.get("tools", ""))
    prompt = [t for s, r in pairs[:-1] for t in s + r] + pairs[-1][0]
    completion = pairs[-1][1] + ([template.tokenizer.eos_token_id] if template.efficient_eos else [])
    s_len, t_len = infer_seqlen(len(prompt), len(completion), cutoff_len)
    cut = s_len < len(prompt) or t_len < len(completion)
    return {"prompt_ids": prompt[:s_len], "completion_ids": completion[:t_len], "label": bool(example["label"])}, cut


def encode(template, examples, params, log, split) -> tuple[dict, dict]:
    columns, truncated, dropped = encode_rows(
        examples, lambda ex: encode_unpaired(template, ex, params["cutoff_len"]), lambda row: row["completion_ids"],
        ["prompt_ids", "completion_ids", "label"], params, log, split)
    lengths = [len(p) + len(c) for p, c in zip(columns["prompt_ids"], columns["completion_ids"])]
    stats = {"examples": len(lengths), "desirable": sum(columns["label"]),
             "undesirable": len(lengths) - sum(columns["label"]), "truncated": truncated,
             "dropped_no_labels": dropped, "tokens": sum(lengths), "max_len": max(lengths, default=0)}
    log.info("%s: %d examples (%d desirable, %d undesirable), %d tokens", split, stats["examples"],
             stats["desirable"], stats["undesirable"], stats["tokens"])
    return columns, stats


def training_arguments(params: dict):
    """TRL's KTOConfig. tokenize already cut every example to cutoff_len: no max_length. The KL term
    pairs each prompt with the previous example's completion within a batch, so batches are sequential."""
    from trl import KTOConfig

    return KTOConfig, dict(beta=params["pref_beta"], desirable_weight=params["kto_chosen_weight"],
                           undesirable_weight=params["kto_rejected_weight"], max_length=None,
                           train_sampling_strategy="sequential",
                           gradient_checkpointing=params["gradient_checkpointing"])


def trainer(run):
    """TRL's KTOTrainer on the columns tokenize wrote. Reference: the base model (for LoRA the
    adapter switched off, through TRL's frozen copy of the fresh adapter; for freeze/full a frozen
    second copy of the base)."""
    from trl import KTOTrainer

    from . import frozen_reference, require_columns

    class PretokenizedKTOTrainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            require_columns(dataset, {"prompt_ids", "completion_ids", "label"}, dataset_name, "kto")
            if self.calculate_KL:  # TRL's estimate: completions rotated by one within each batch
                def rotate(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch

                dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

    params, log = run.params, run.log
    ref_model = frozen_reference(run)
    log.info("KTO: beta %s, desirable weight %s, undesirable weight %s; reference: %s", params["pref_beta"],
             params["kto_chosen_weight"], params["kto_rejected_weight"],
             "the base model (through a frozen copy of the untrained adapter)" if ref_model is None
             else "a frozen copy of the base model")
    return PretokenizedKTOTrainer(model=run.model, ref_model=ref_model, args=run.args, train_dataset=run.train_ds,
                                  eval_dataset=run.eval_ds, processing_class=run.tokenizer,
                                  optimizers=run.optimizers)


def real_tokens(dataset) -> int:
    return sum(len(p) + len(c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"]))
