"""Rule `reward_accuracy` (stage rm): how often a reward model scores the chosen response above the
rejected one, on the eval split's ranked pairs (tokenize's validation split, rendered with the
training template).

results/eval/{base,tuned}/reward_accuracy.json: accuracy, mean margin r_chosen - r_rejected and the
mean scores. The base is the base model with a new value head initialised from `seed` (what training
started from: about chance); the tuned one is the merged reward model. Informational: it records,
it does not gate.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TunelineError
from .modeling import load_causal_lm, pad_id, set_threads


def scores(model, sequences: list[list[int]], pad: int, batch_size: int) -> list[float]:
    """The value head's score of each sequence (right padding; the model reads the last real token)."""
    import torch
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(sequences), batch_size), desc="reward", unit="batch"):
        batch = sequences[start: start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
        with torch.no_grad():
            out += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return out


def pairwise(model, dataset, pad: int, batch_size: int) -> dict:
    chosen = scores(model, dataset["chosen_ids"], pad, batch_size)
    rejected = scores(model, dataset["rejected_ids"], pad, batch_size)
    n = len(chosen)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"pairs": n, "accuracy": round(100 * sum(m > 0 for m in margins) / n, 2),
            "mean_margin": round(sum(margins) / n, 4), "mean_chosen": round(sum(chosen) / n, 4),
            "mean_rejected": round(sum(rejected) / n, 4)}


def main(inputs, outputs, params, log, threads=1):
    import datasets
    import torch
    from transformers import AutoTokenizer, set_seed

    set_threads(threads)
    split = Path(inputs["tokenized"]) / "validation"
    if not split.is_dir():
        raise TunelineError("reward_accuracy needs an eval split of ranked pairs: set val_size (e.g. 0.1) or "
                            "eval_dataset to a `ranking: true` dataset.")
    dataset = datasets.load_from_disk(str(split))
    if not {"chosen_ids", "rejected_ids"} <= set(dataset.column_names) or not len(dataset):
        raise TunelineError(f"{split} holds no ranked pairs (stage rm's chosen_ids/rejected_ids): rerun tokenize "
                            "with stage rm and a non-empty eval split.")
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    set_seed(params["seed"])  # the base model's new value head: the same one training starts from
    model = load_causal_lm(inputs["model"], torch.float32, reward=True).eval()
    model.config.pad_token_id = pad_id(tokenizer)
    result = pairwise(model, dataset, pad_id(tokenizer), params["per_device_eval_batch_size"])
    Path(outputs["scores"]).write_text(json.dumps(result, indent=2) + "\n")
    log.info("%d pairs: chosen scored above rejected in %.1f%%, mean margin %.3f", result["pairs"],
             result["accuracy"], result["mean_margin"])
