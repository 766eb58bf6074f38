"""Checks that a written model behaves like the model it came from (merge and every export).

Each check renders a few fixed prompts with the training template and compares next-token
logits (max |difference|, top-1 agreement) and short greedy answers. The figures go into the
rule's report so that a user can see what a conversion or quantization cost.
"""

from __future__ import annotations

CHECK_PROMPTS = ["Who are you?", "What is the capital of France?", "Write one sentence about the sea."]


def prompt_ids(template, prompts=CHECK_PROMPTS) -> list[list[int]]:
    return [template.encode_prompt([{"role": "user", "content": text}]) for text in prompts]


def prompt_logits(model, template, prompts=CHECK_PROMPTS) -> list:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompt_ids(template, prompts):
            out.append(model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu())
    return out


def compare(a: list, b: list) -> dict:
    import torch

    max_diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    # a reward model's "logits" are one score per prompt: its top-1 agreement is trivially 1
    agree = torch.cat([torch.atleast_1d(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b)]).mean()
    return {"max_abs_logit_diff": max_diff, "top1_agreement": round(float(agree), 4)}


def greedy_ids(model, template, tokenizer, prompts=CHECK_PROMPTS, max_new_tokens: int = 24) -> list[list[int]]:
    """Greedy continuations as token ids (compared as ids: a random model's text may be broken UTF-8)."""
    import torch

    from .modeling import pad_id

    stops = template.stop_token_ids()
    out_ids = []
    with torch.no_grad():
        for ids in prompt_ids(template, prompts):
            x = torch.tensor([ids], device=model.device)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id(tokenizer))
            new = out[0, len(ids):].tolist()
            out_ids.append(new[: next((i for i, t in enumerate(new) if t in stops), len(new))])
    return out_ids


def behaviour(model, template, tokenizer) -> dict:
    """What the comparisons need from the reference model, computed once."""
    ids = greedy_ids(model, template, tokenizer)
    return {"logits": prompt_logits(model, template), "answer_ids": ids,
            "answers": [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]}


def same_answers(ids: list[list[int]], reference: dict) -> str:
    return f"{sum(a == b for a, b in zip(ids, reference['answer_ids']))}/{len(ids)}"


def compare_to(reference: dict, mine: dict) -> dict:
    """Logit figures and greedy-answer agreement of one `behaviour` result against another."""
    return {**compare(reference["logits"], mine["logits"]),
            "same_greedy_answers": same_answers(mine["answer_ids"], reference), "answers": mine["answers"]}


def compare_behaviour(reference: dict, model, template, tokenizer) -> dict:
    """`compare_to` for a model whose behaviour is not computed yet."""
    return compare_to(reference, behaviour(model, template, tokenizer))
