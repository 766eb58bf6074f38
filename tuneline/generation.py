"""Generation keys shared by the predict rule and `tuneline chat` (each passes its own values)."""

from __future__ import annotations

GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty")
FLOAT_KEYS = ("temperature", "top_p", "repetition_penalty")


def generation_kwargs(params: dict) -> dict:
    kwargs = {k: params[k] for k in GENERATION_KEYS if k in params}
    for key in FLOAT_KEYS:  # YAML's `temperature: 1` is an int, which transformers refuses ("strictly positive float")
        if kwargs.get(key) is not None:
            kwargs[key] = float(kwargs[key])
    if not kwargs.get("do_sample"):
        for key in ("temperature", "top_p", "top_k"):
            kwargs.pop(key, None)  # greedy: sampling knobs would only raise warnings
    return kwargs
