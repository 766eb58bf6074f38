"""Tuneline: LLM fine-tuning as a Snakemake pipeline.

Kept import-light: the Snakefile imports tuneline.config and tuneline.registry, and a no-op
dry-run must stay fast. Heavy libraries are imported inside the stage functions.
"""

__version__ = "0.1.0"
