"""Rule `base_model`: see workflow/rules/base_model.smk; the logic is tuneline/base_model.py."""
from tuneline.rule import run
from tuneline.base_model import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
