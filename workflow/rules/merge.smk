rule merge:
    """Adapter merged into the full-precision base, verified against the unmerged model."""
    input:
        adapter="results/adapter",
        model="results/base_model",
    output:
        model=directory("results/merged_model"),
    log:
        "logs/merge.log",
    params:
        cfg=params_for("merge"),
    script:
        "../../scripts/merge.py"
