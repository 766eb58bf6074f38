rule prepare_data:
    """Registry datasets -> one normalised messages format, deduplicated and split."""
    input:
        files=dataset_files,
    output:
        data=directory("results/data"),
    log:
        "logs/prepare_data.log",
    params:
        cfg=params_for("prepare_data"),
        # The registry entries of the selected datasets, not the whole registry file: editing
        # another dataset's entry reruns nothing.
        entries=lambda wildcards: registry.selected_entries(config["dataset_dir"], config["dataset"]),
    script:
        "../../scripts/prepare_data.py"
