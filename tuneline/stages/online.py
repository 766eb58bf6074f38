"""What the online RL stages (grpo, rloo) share: prompts encoded once by tokenize, reward functions,
and TRL's generation fed with those token ids instead of its own chat template.

Records are conversations; the last assistant message is the reference `solution` (for the
exact_match and overlap rewards), every turn before it the prompt. tokenize writes `prompt` (the
rendered prompt text, what reward functions and TRL's logs see), `prompt_ids` and `solution`.
"""

from __future__ import annotations

import re

from ..encoding import encode_rows

RECORD = "conversation"
EVALUATION = ("generation", "mmlu")
PACKING = False  # completions are generated online
MODEL = "causal_lm"


def encode(template, examples, params, log, split) -> tuple[dict, dict]:
    tokenizer = template.tokenizer

    def one(ex):
        ids = template.encode_prompt(ex["messages"][:-1], ex.get("system", ""), ex.get("tools", ""))
        cut = len(ids) > params["cutoff_len"]
        ids = ids[-params["cutoff_len"]:]  # keep the end of a long prompt: the question being asked
        return {"prompt": tokenizer.decode(ids, skip_special_tokens=False), "prompt_ids": ids,
                "solution": ex["messages"][-1]["content"]}, cut

    columns, truncated, dropped = encode_rows(examples, one, lambda row: row["prompt_ids"],
                                              ["prompt", "prompt_ids", "solution"], params, log, split, "prompts")
    lengths = [len(p) for p in columns["prompt_ids"]]
    stats = {"examples": len(lengths), "truncated": truncated, "dropped_no_labels": dropped,
             "tokens": sum(lengths), "max_len": max(lengths, default=0)}
    log.info("%s: %d prompts, %d tokens (longest %d)", split, stats["examples"], stats["tokens"], stats["max_len"])
    return columns, stats


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def reward_functions(params: dict, default: str | None = None) -> list:
    """The reward_funcs named in the config (else `default`), as TRL reward functions (completions +
    dataset columns -> one float each)."""
    from ..errors import TunelineError

    pattern = re.compile(params["reward_format"])

    def exact_match(completions, solution, **_):
        """1.0 when the completion is the reference solution (whitespace and case aside)."""
        return [float(_normalise(c) == _normalise(s)) for c, s in zip(completions, solution)]

    def overlap(completions, solution, **_):
        """Word-level F1 between completion and solution: a dense reward for free-text answers."""
        out = []
        for c, s in zip(completions, solution):
            a, b = _normalise(c).split(), _normalise(s).split()
            common = sum(min(a.count(w), b.count(w)) for w in set(a))
            out.append(0.0 if not common else 2 * common / (len(a) + len(b)))
        return out

    def format(completions, **_):  # noqa: A001 (the reward's name in the config)
        """1.0 when the completion matches reward_format (re.search)."""
        return [float(bool(pattern.search(c))) for c in completions]

    known = {f.__name__: f for f in (exact_match, overlap, format)}
    names = [n.strip() for n in (params["reward_funcs"] or default or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise TunelineError(f"reward_funcs: {', '.join(unknown) or 'empty'} - the reward functions are "
                            f"{', '.join(known)} (comma-separated).")
    return [known[n] for n in names]


def online_arguments(params: dict) -> dict:
    """GRPOConfig/RLOOConfig keys both share."""
    from ..errors import TunelineError

    batch = params["per_device_train_batch_size"] * params["gradient_accumulation_steps"]
    if batch % params["num_generations"]:
        raise TunelineError(f"num_generations={params['num_generations']} must divide per_device_train_batch_size x "
                            f"gradient_accumulation_steps = {batch}: each batch holds whole groups of completions "
                            "of one prompt.")
    return dict(num_generations=params["num_generations"], max_completion_length=params["max_completion_length"],
                gradient_checkpointing=params["gradient_checkpointing"], remove_unused_columns=False)


def pretokenized(trainer_class):
    """The TRL trainer fed the prompt ids tokenize wrote (rendered with the pipeline's template)."""

    class Pretokenized(trainer_class):
        def remember(self, *splits):
            for ds in splits:
                if ds is not None and len(ds):
                    self.prompt_ids.update(zip(ds["prompt"], ds["prompt_ids"]))

        def _tokenize_prompts(self, prompts: list):
            return [self.prompt_ids[p] for p in prompts], None, {}

        def evaluate(self, eval_dataset=None, *args, **kwargs):  # the final validation, after training
            self.remember(eval_dataset)
            return super().evaluate(eval_dataset, *args, **kwargs)

    return Pretokenized


def build(run, trainer_class, reward_funcs, **extra):
    from . import require_columns

    require_columns(run.train_ds, {"prompt", "prompt_ids", "solution"}, "train", run.params["stage"])
    trainer = pretokenized(trainer_class)(model=run.model, reward_funcs=reward_funcs, args=run.args,
                                          train_dataset=run.train_ds, eval_dataset=run.eval_ds,
                                          processing_class=run.tokenizer, optimizers=run.optimizers, **extra)
    trainer.prompt_ids = {}
    trainer.remember(run.train_ds, run.eval_ds)
    return trainer


def real_tokens(dataset) -> int:
    """Prompt tokens read (completions are generated, and counted by TRL as num_tokens)."""
    return sum(len(p) for p in dataset["prompt_ids"])
