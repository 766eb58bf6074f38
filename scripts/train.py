"""Rule `train`: see workflow/rules/train.smk; the logic is tuneline/train.py."""
from tuneline.rule import run
from tuneline.train import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
