"""Rule `merge`: see workflow/rules/merge.smk; the logic is tuneline/merge.py."""
from tuneline.rule import run
from tuneline.merge import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
