"""Rule `prepare_eval_data`: see workflow/rules/prepare_data.smk; the logic is tuneline/prepare_eval_data.py."""
from tuneline.rule import run
from tuneline.prepare_eval_data import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
