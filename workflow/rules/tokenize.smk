rule tokenize:
    """Template + cutoff_len -> input_ids and labels masked on the prompt."""
    cache: SHARED  # between experiments, with --cache (common.smk)
    input:
        data="results/data",
        eval_data=eval_split,  # the validation split: eval_dataset's when set, else val_size's
        model="results/base_model",
    output:
        tokenized=directory("results/tokenized"),
    log:
        "logs/tokenize.log",
    resources:
        **resources_for("tokenize"),
    threads: threads_for("tokenize")
    params:
        cfg=params_for("tokenize"),
    script:
        "../../scripts/tokenize.py"


benchmark_unless_shared(rules.tokenize)
