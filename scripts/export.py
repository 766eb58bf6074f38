"""Rule `export`: see workflow/rules/export.smk; the logic is tuneline/export.py."""
from tuneline.rule import run
from tuneline.export import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
