rule train:
    """HF Trainer + PEFT: a LoRA adapter (QLoRA by default), its loss history and curve."""
    input:
        tokenized="results/tokenized",
        model="results/base_model",
    output:
        adapter=report(directory("results/adapter"), patterns=["{name}.png"], caption="../../report/loss.rst",
                       category="Training"),
    log:
        "logs/train.log",
    params:
        cfg=params_for("train"),
    threads: os.cpu_count() or 1  # capped by --cores
    script:
        "../../scripts/train.py"
