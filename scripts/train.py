"""Rule `train`: see workflow/rules/train.smk; the logic is tuneline/train.py."""
from tuneline.config import launch_settings
from tuneline.rule import run
from tuneline.train import main

# how torchrun meets its peers (master address, port, node rank) arrives as resources, so that
# changing it reruns nothing
resources = dict(snakemake.resources.items())  # noqa: F821 (snakemake is injected by Snakemake)
run(snakemake, main, launch={k: resources[k] for k in launch_settings({}, "train") if k in resources})  # noqa: F821
