"""stage grpo: online RL with TRL's GRPOTrainer and reward functions (no reward model needed).

For each prompt, num_generations completions are sampled (temperature; max_completion_length
tokens), scored by the reward_funcs (default overlap; exact_match and overlap against the record's reference
response, `solution`; format: a reward_format regex), and the policy is moved towards the
completions that score above their group's mean. Records, encoding and evaluation: see online.py.
"""

from __future__ import annotations

from .online import EVALUATION, MODEL, PACKING, RECORD, build, encode, online_arguments, real_tokens, reward_functions

__all__ = ["EVALUATION", "MODEL", "PACKING", "RECORD", "encode", "real_tokens", "training_arguments", "trainer"]

adapters_to_drop = ("ref",)  # a frozen reference copy of the adapter, if TRL made one (beta > 0)


def training_arguments(params: dict):
    from trl import GRPOConfig

    return GRPOConfig, online_arguments(params)


def trainer(run):
    from trl import GRPOTrainer

    funcs = reward_functions(run.params, default="overlap")
    run.log.info("GRPO: %d completions per prompt, up to %d tokens each; rewards: %s", run.params["num_generations"],
                 run.params["max_completion_length"], ", ".join(f.__name__ for f in funcs))
    return build(run, GRPOTrainer, funcs)
