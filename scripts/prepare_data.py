"""Rule `prepare_data`: see workflow/rules/prepare_data.smk; the logic is tuneline/prepare_data.py."""
from tuneline.rule import run
from tuneline.prepare_data import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
