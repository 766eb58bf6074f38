"""stage dpo: direct preference optimisation with TRL's DPOTrainer on `ranking: true` datasets.

Records are a conversation whose last message is the chosen response, plus `rejected`. Encoding
renders the prompt and both responses with the pipeline's template and cuts them with
LLaMA-Factory's pairwise budget, into TRL 1.x's columns prompt_ids/chosen_ids/rejected_ids.
The reference model is the base. Evaluated like sft (generation and MMLU).
"""

from __future__ import annotations

from ..encoding import encode_rows, infer_seqlen

RECORD = "pair"
EVALUATION = ("generation", "mmlu")
PACKING = False  # TRL pads each batch of pairs
MODEL = "causal_lm"  # the model class trained, merged and evaluated ("reward": a value head, stage rm)


def encode_pairwise(template, example: dict, cutoff_len: int) -> tuple[dict, bool]:
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


def encode(template, examples, params, log, split) -> tuple[dict, dict]:
    columns, truncated, dropped = encode_rows(
        examples, lambda ex: encode_pairwise(template, ex, params["cutoff_len"]),
        lambda row: row["chosen_ids"] and row["rejected_ids"], ["prompt_ids", "chosen_ids", "rejected_ids"],
        params, log, split, "preference pairs")
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(*columns.values())]
    stats = {"examples": len(lengths), "truncated": truncated, "dropped_no_labels": dropped,
             "tokens": sum(lengths), "max_len": max(lengths, default=0)}
    log.info("%s: %d preference pairs, %d tokens", split, stats["examples"], stats["tokens"])
    return columns, stats


# pref_loss values that are trainers of their own in TRL (reference-free): LLaMA-Factory's orpo and simpo
REFERENCE_FREE = ("orpo", "simpo")


def training_arguments(params: dict):
    """TRL's DPOConfig with the pref_* keys; for orpo TRL's ORPOConfig (beta = pref_beta, ORPO's lambda, as
    LLaMA-Factory uses it) and for simpo its CPOConfig with loss_type simpo (simpo_gamma; pref_ftx is the
    NLL weight cpo_alpha). tokenize already cut every pair to cutoff_len."""
    loss = params["pref_loss"]
    if loss == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig, dict(beta=params["pref_beta"],
                                gradient_checkpointing=params["gradient_checkpointing"])
    if loss == "simpo":
        from trl.experimental.cpo import CPOConfig

        return CPOConfig, dict(loss_type="simpo", beta=params["pref_beta"], simpo_gamma=params["simpo_gamma"],
                               cpo_alpha=params["pref_ftx"],
                               gradient_checkpointing=params["gradient_checkpointing"])
    from trl import DPOConfig

    losses = [loss] + (["sft"] if params["pref_ftx"] else [])
    return DPOConfig, dict(beta=params["pref_beta"], loss_type=losses, max_length=None,
                           loss_weights=[1.0, params["pref_ftx"]] if params["pref_ftx"] else None,
                           # TRL's own default is True: ours (off, ~25% faster on CPU) holds for every stage
                           gradient_checkpointing=params["gradient_checkpointing"])


def trainer(run):
    """TRL's DPOTrainer on the pairs tokenize wrote (rendered with the pipeline's template). The
    reference model is the base: for LoRA the adapter switched off (TRL adds a frozen copy of the
    fresh adapter, removed before saving: see `adapters_to_drop`), for freeze/full a second, frozen
    copy of the base weights."""
    from trl import DPOTrainer

    from . import frozen_reference, require_columns

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            require_columns(dataset, {"prompt_ids", "chosen_ids", "rejected_ids"}, dataset_name, "dpo")
            return dataset

    params, log = run.params, run.log
    if params["pref_loss"] in REFERENCE_FREE:
        return reference_free_trainer(run)
    ref_model = frozen_reference(run)
    log.info("DPO: loss %s, beta %s%s; reference: %s", params["pref_loss"], params["pref_beta"],
             f", + {params['pref_ftx']} x SFT loss" if params["pref_ftx"] else "",
             "the base model (through a frozen copy of the untrained adapter)" if ref_model is None
             else "a frozen copy of the base model")
    return PretokenizedDPOTrainer(model=run.model, ref_model=ref_model, args=run.args, train_dataset=run.train_ds,
                                  eval_dataset=run.eval_ds, processing_class=run.tokenizer,
                                  optimizers=run.optimizers)


def reference_free_trainer(run):
    """ORPO (TRL's ORPOTrainer) or SimPO (TRL's CPOTrainer, loss_type simpo) on the same pairs: no
    reference model. Their own tokenization is replaced by the rows tokenize wrote."""
    from ..encoding import IGNORE_INDEX

    if run.params["pref_loss"] == "orpo":
        from trl.experimental.orpo import ORPOTrainer as Base
    else:
        from trl.experimental.cpo import CPOTrainer as Base

    class Pretokenized(Base):
        def tokenize_row(self, feature, model=None):
            prompt = feature["prompt_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for name in ("chosen", "rejected"):
                ids = feature[f"{name}_ids"]
                row.update({f"{name}_input_ids": prompt + ids, f"{name}_attention_mask": [1] * (len(prompt) + len(ids)),
                            f"{name}_labels": [IGNORE_INDEX] * len(prompt) + ids})
            return row

    params = run.params
    if params["pref_loss"] == "orpo" and params["pref_ftx"]:
        run.log.warning("pref_ftx=%s is not used with pref_loss orpo: ORPO's loss holds its own SFT term",
                        params["pref_ftx"])
    run.log.info("%s: beta %s%s; no reference model", params["pref_loss"].upper(), params["pref_beta"],
                 f", gamma {params['simpo_gamma']}, + {params['pref_ftx']} x SFT loss" if params["pref_loss"] == "simpo"
                 else "")
    return Pretokenized(model=run.model, args=run.args, train_dataset=run.train_ds, eval_dataset=run.eval_ds,
                        processing_class=run.tokenizer, optimizers=run.optimizers)


adapters_to_drop = ("ref",)  # DPOTrainer's frozen reference copy of the adapter


def real_tokens(dataset) -> int:
    return sum(len(row["prompt_ids"]) * 2 + len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in dataset)
