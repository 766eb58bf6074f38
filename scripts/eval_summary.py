"""Rule `eval_summary`: see workflow/rules/evaluate.smk; the logic is tuneline/eval_summary.py."""
from tuneline.rule import run
from tuneline.eval_summary import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
