rule train:
    """HF Trainer + PEFT: a LoRA adapter (QLoRA by default), its loss history and curve."""
    input:
        tokenized="results/tokenized",
        model="results/base_model",
        # stage rloo: the reward model (a stage rm folder) is an input like any other
        **({"reward_model": config["reward_model"]} if config["reward_model"] else {}),
    output:
        adapter=report(directory("results/adapter"), patterns=["{name}.png"], caption="../../report/loss.rst",
                       category="Training"),
    log:
        "logs/train.log",
    benchmark:
        "results/benchmarks/train.tsv"
    resources:
        **resources_for("train"),
    threads: threads_for("train")
    params:
        cfg=params_for("train"),
    script:
        "../../scripts/train.py"
