"""Rule `mmlu`: see workflow/rules/evaluate.smk; the logic is tuneline/mmlu.py."""
from tuneline.rule import run
from tuneline.mmlu import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
