# Tuneline: LLM fine-tuning as a Snakemake pipeline. This file is the table of contents.
import os

from snakemake.utils import min_version

min_version("9.0")


# The defaults shipped with the workflow; `--configfile` and `--config` override them.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"


if RUN_DIR:  # output_dir: every artifact, log and Snakemake's own state of this run in its own folder

    workdir: RUN_DIR


include: "workflow/rules/base_model.smk"
include: "workflow/rules/prepare_data.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        "results/merged_model",
        "results/eval/summary.md",
