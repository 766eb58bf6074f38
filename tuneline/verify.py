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
    agree = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b)]).mean()
    return {"max_abs_logit_diff": max_diff, "top1_agreement": round(float(agree), 4)}


def greedy_answers(model, template, tokenizer, prompts=CHECK_PROMPTS, max_new_tokens: int = 24) -> list[str]:
    import torch

    from .modeling import pad_id

    answers = []
    with torch.no_grad():
        for ids in prompt_ids(template, prompts):
            x = torch.tensor([ids], device=model.device)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=template.stop_token_ids(),
                                 pad_token_id=pad_id(tokenizer))
            answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return answers


def behaviour(model, template, tokenizer) -> dict:
    """What the comparisons need from the reference model, computed once."""
    return {"logits": prompt_logits(model, template), "answers": greedy_answers(model, template, tokenizer)}


def compare_behaviour(reference: dict, model, template, tokenizer) -> dict:
    """Logit figures and greedy-answer agreement of `model` against `reference` (from `behaviour`)."""
    answers = greedy_answers(model, template, tokenizer)
    same = sum(a == b for a, b in zip(answers, reference["answers"]))
    return {**compare(reference["logits"], prompt_logits(model, template)),
            "same_greedy_answers": f"{same}/{len(answers)}", "answers": answers}
