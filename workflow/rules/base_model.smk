rule base_model:
    """The model named by model_name_or_path as a safetensors Hugging Face folder."""
    cache: SHARED  # between experiments, with --cache (common.smk)
    input:
        source=base_model_source,
    output:
        model=directory("results/base_model"),
    log:
        "logs/base_model.log",
    resources:
        **resources_for("base_model"),
    threads: threads_for("base_model")
    params:
        cfg=params_for("base_model"),
    script:
        "../../scripts/base_model.py"


benchmark_unless_shared(rules.base_model)
