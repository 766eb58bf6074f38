"""Rule `export_bnb`: see workflow/rules/export.smk; the logic is tuneline/export_bnb.py."""
from tuneline.rule import run
from tuneline.export_bnb import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
