"""Rule `score_generation`: see workflow/rules/evaluate.smk; the logic is tuneline/score_generation.py."""
from tuneline.rule import run
from tuneline.score_generation import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
