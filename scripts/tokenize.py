"""Rule `tokenize`: see workflow/rules/tokenize.smk; the logic is tuneline/tokenize.py."""
from tuneline.rule import run
from tuneline.tokenize import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
