if config["adapter_name_or_path"]:

    rule import_adapter:
        """An adapter trained elsewhere (LLaMA-Factory, PEFT) checked against the base and taken as
        results/adapter, in place of training (LLaMA-Factory's merge_lora and inference YAMLs)."""
        input:
            adapter=config["adapter_name_or_path"],
            model="results/base_model",
        output:
            adapter=directory("results/adapter"),
        log:
            "logs/import_adapter.log",
        benchmark:
            "results/benchmarks/import_adapter.tsv"
        resources:
            **resources_for("import_adapter"),
        threads: threads_for("import_adapter")
        params:
            cfg=params_for("import_adapter"),
        script:
            "../../scripts/import_adapter.py"

else:

    rule train:
        """HF Trainer + PEFT: a LoRA adapter (QLoRA by default), its loss history and curve."""
        input:
            tokenized="results/tokenized",
            model="results/base_model",
            # stage rloo: the reward model (a stage rm folder) is an input like any other
            **({"reward_model": config["reward_model"]} if config["reward_model"] else {}),
            # resume_from_checkpoint given as a path: a Trainer checkpoint folder (LLaMA-Factory's)
            **({"checkpoint": config["resume_from_checkpoint"]}
               if isinstance(config["resume_from_checkpoint"], str) else {}),
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
