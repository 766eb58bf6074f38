rule base_model:
    """The model named by model_name_or_path as a safetensors Hugging Face folder."""
    input:
        source=base_model_source,
    output:
        model=directory("results/base_model"),
    log:
        "logs/base_model.log",
    params:
        cfg=params_for("base_model"),
    script:
        "../../scripts/base_model.py"
