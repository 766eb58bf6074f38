rule prepare_data:
    """Registry datasets -> one normalised messages format, deduplicated and split."""
    cache: SHARED  # between experiments, with --cache (common.smk)
    input:
        files=DATASET_FILES,
    output:
        data=directory("results/data"),
    log:
        "logs/prepare_data.log",
    resources:
        **resources_for("prepare_data"),
    threads: threads_for("prepare_data")
    params:
        cfg=params_for("prepare_data"),
        # The registry entries of the selected datasets, not the whole registry file (editing
        # another dataset's entry reruns nothing); their data files are the inputs.
        entries=DATASET_ENTRIES,
    script:
        "../../scripts/prepare_data.py"


benchmark_unless_shared(rules.prepare_data)


rule prepare_eval_data:
    """The eval_dataset names, read like `dataset`, as the eval split for predict."""
    cache: SHARED  # between experiments, with --cache (common.smk)
    input:
        files=EVAL_FILES,
    output:
        data=directory("results/eval_data"),
    log:
        "logs/prepare_eval_data.log",
    resources:
        **resources_for("prepare_eval_data"),
    threads: threads_for("prepare_eval_data")
    params:
        cfg=params_for("prepare_eval_data"),
        entries=EVAL_ENTRIES,
    script:
        "../../scripts/prepare_eval_data.py"


benchmark_unless_shared(rules.prepare_eval_data)
