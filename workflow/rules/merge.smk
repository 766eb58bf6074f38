rule merge:
    """Adapter merged into the full-precision base, verified against the unmerged model."""
    input:
        adapter="results/adapter",
        model="results/base_model",
    output:
        model=report(directory("results/merged_model"), patterns=["merge_{name}.json"],
                     caption="../../report/merge.rst", category="Merge check"),
    log:
        "logs/merge.log",
    benchmark:
        "results/benchmarks/merge.tsv"
    resources:
        **resources_for("merge"),
    threads: threads_for("merge")
    params:
        cfg=params_for("merge"),
    script:
        "../../scripts/merge.py"
