rule prepare_data:
    """Registry datasets -> one normalised messages format, deduplicated and split."""
    input:
        files=DATASET_FILES,
    output:
        data=directory("results/data"),
    log:
        "logs/prepare_data.log",
    params:
        cfg=params_for("prepare_data"),
        # The registry entries of the selected datasets, not the whole registry file (editing
        # another dataset's entry reruns nothing); their data files are the inputs.
        entries=DATASET_ENTRIES,
    script:
        "../../scripts/prepare_data.py"


rule prepare_eval_data:
    """The eval_dataset names, read like `dataset`, as the eval split for predict."""
    input:
        files=EVAL_FILES,
    output:
        data=directory("results/eval_data"),
    log:
        "logs/prepare_eval_data.log",
    params:
        cfg=params_for("prepare_eval_data"),
        entries=EVAL_ENTRIES,
    script:
        "../../scripts/prepare_eval_data.py"
