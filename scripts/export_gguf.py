"""Rule `export_gguf`: see workflow/rules/export.smk; the logic is tuneline/export_gguf.py."""
from tuneline.rule import run
from tuneline.export_gguf import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
