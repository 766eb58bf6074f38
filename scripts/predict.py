"""Rule `predict`: see workflow/rules/evaluate.smk; the logic is tuneline/predict.py."""
from tuneline.rule import run
from tuneline.predict import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
