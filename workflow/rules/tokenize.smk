rule tokenize:
    """Template + cutoff_len -> input_ids and labels masked on the prompt."""
    input:
        data="results/data",
        model="results/base_model",
    output:
        tokenized=directory("results/tokenized"),
    log:
        "logs/tokenize.log",
    params:
        cfg=params_for("tokenize"),
    script:
        "../../scripts/tokenize.py"
