"""stage rloo: online RL against a reward model with TRL's RLOOTrainer (REINFORCE leave-one-out),
in place of LLaMA-Factory's stage ppo (TRL removed its PPOTrainer).

The reward model is `reward_model`: a stage rm model folder (e.g. another run's
results/merged_model). Each prompt gets num_generations completions; each is rewarded by the reward
model's score of the rendered conversation, with the mean of the other completions as its baseline.
reward_funcs are added to the reward model's score when set. Records, encoding and evaluation: see
online.py.
"""

from __future__ import annotations

from .online import EVALUATION, MODEL, PACKING, RECORD, build, encode, online_arguments, real_tokens, reward_functions

__all__ = ["EVALUATION", "MODEL", "PACKING", "RECORD", "encode", "real_tokens", "training_arguments", "trainer"]

adapters_to_drop = ("ref",)  # RLOOTrainer's frozen reference copy of the adapter (its KL term), not the result


def training_arguments(params: dict):
    from trl import RLOOConfig

    return RLOOConfig, online_arguments(params)


def trainer(run):
    import torch
    from transformers import AutoTokenizer
    from trl import RLOOTrainer

    from ..errors import TunelineError
    from ..modeling import is_reward_model, load_causal_lm, pad_id

    path = run.params["reward_model"]
    if not path or not is_reward_model(path):
        raise TunelineError(f"stage rloo needs reward_model: a reward model folder written by stage rm (e.g. another "
                            f"run's results/merged_model); {path!r} is {'not set' if not path else 'not one'}.")
    reward = load_causal_lm(path, torch.float32).eval()
    reward_tokenizer = AutoTokenizer.from_pretrained(path)
    reward.config.pad_token_id = pad_id(reward_tokenizer)
    funcs = [reward] + (reward_functions(run.params) if run.params["reward_funcs"] else [])
    run.log.info("RLOO: %d completions per prompt, up to %d tokens each; reward model %s%s",
                 run.params["num_generations"], run.params["max_completion_length"], path,
                 "".join(f" + {f.__name__}" for f in funcs[1:]))
    return build(run, RLOOTrainer, funcs, reward_processing_classes=[reward_tokenizer] + [None] * (len(funcs) - 1))
