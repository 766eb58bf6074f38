"""Rule `export_gptq`: see workflow/rules/export.smk; the logic is tuneline/export_gptq.py."""
from tuneline.rule import run
from tuneline.export_gptq import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
