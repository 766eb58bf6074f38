"""Rule `import_adapter`: see workflow/rules/evaluate.smk; the logic is tuneline/import_adapter.py."""
from tuneline.rule import run
from tuneline.import_adapter import main

run(snakemake, main)  # noqa: F821 (snakemake is injected by Snakemake)
