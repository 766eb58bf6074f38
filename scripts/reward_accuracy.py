"""Rule `reward_accuracy`: see workflow/rules/evaluate.smk; the logic is tuneline/reward_accuracy.py."""
from tuneline.rule import run
from tuneline.reward_accuracy import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
