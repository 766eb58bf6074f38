"""Rule `predict`: answers to the eval split, rendered with the training template, generated in batches.

One JSON line per sample, as LLaMA-Factory writes them: {"prompt", "predict", "label"}. The
prompt is the templated text (special tokens included), the label the reference response.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TunelineError
from .generation import generation_kwargs
from .jsonl import read_jsonl, write_jsonl
from .modeling import load_for_inference, pad_id, set_threads
from .templates import from_description

def generate(model, tokenizer, template, examples: list[dict], params: dict, log) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    pad = pad_id(tokenizer)
    rows = []
    batch_size = params["per_device_eval_batch_size"]
    kwargs = generation_kwargs(params)
    for start in tqdm(range(0, len(examples), batch_size), desc="predict", unit="batch"):
        batch = examples[start: start + batch_size]
        prompts = [template.encode_prompt(ex["messages"][:-1], ex.get("system", ""), ex.get("tools", "")) for ex in batch]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=template.stop_token_ids(),
                                 pad_token_id=pad, **kwargs)
        for ex, prompt, seq in zip(batch, prompts, out[:, width:]):
            rows.append({
                "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                "predict": tokenizer.decode(seq, skip_special_tokens=True).strip(),
                "label": ex["messages"][-1]["content"],
            })
    return rows


def main(inputs, outputs, params, log, threads=1):
    from transformers import AutoTokenizer, set_seed

    set_threads(threads)
    set_seed(params["seed"])
    examples = read_jsonl(Path(inputs["data"]) / "validation.jsonl")
    if examples and "messages" not in examples[0]:
        raise TunelineError(f"{inputs['data']}/validation.jsonl holds raw text (stage pt): there are no responses "
                            "to generate and score. Evaluate a pt model with MMLU (rule mmlu) or the validation "
                            "loss (val_size, eval_strategy).")
    out = Path(outputs["predictions"])
    if not examples:
        log.warning("the eval split is empty (val_size is 0): no predictions to make")
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    template = from_description(json.loads((Path(inputs["tokenized"]) / "template.json").read_text()), tokenizer)
    model = load_for_inference(inputs["model"])
    rows = generate(model, tokenizer, template, examples, params, log) if examples else []
    write_jsonl(out, rows)
    log.info("wrote %d predictions to %s (%s)", len(rows), out, generation_kwargs(params))
