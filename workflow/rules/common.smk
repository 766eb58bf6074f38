# One-time work: check and complete the config, and give each rule its slice of it.
# Only light imports here: a no-op dry-run must stay fast.
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from tuneline import registry, stages
from tuneline.config import (SCHEMA_PATH, absolute_paths, adopt_foreign_keys, check_files, check_unknown_keys, check_values, coerce_cli_values, launch_settings,
                             rule_params, rule_resources)
from tuneline.errors import TunelineError

try:
    for note in adopt_foreign_keys(config):  # LLaMA-Factory's own keys: aliased, accepted or refused
        logger.info(f"Tuneline: {note}")
    check_unknown_keys(config)
    coerce_cli_values(config)
    check_values(config)
    check_files(config)
except TunelineError as err:
    raise WorkflowError(str(err)) from None

validate(config, str(SCHEMA_PATH), set_default=True)

# output_dir: this run's own folder (Snakemake's `workdir:`, set in the Snakefile). The config's paths
# are made absolute first: they are relative to the folder snakemake was started in.
RUN_DIR = None
if config["output_dir"]:
    if workflow.overwrite_workdir is not None:
        logger.warning(f"Tuneline: output_dir {config['output_dir']} is not used: --directory "
                       f"{workflow.overwrite_workdir} names the run's folder")
    else:
        RUN_DIR = os.path.abspath(os.path.expanduser(config["output_dir"]))
        absolute_paths(config, os.getcwd())
        logger.info(f"Tuneline: this run's folder is {RUN_DIR} (output_dir): artifacts in {RUN_DIR}/results")

# Resolved here, not in input functions: Snakemake ignores an input function's error when the
# output already exists, and a misspelt dataset name must never plan "nothing to be done".
try:
    DATASET_ENTRIES = registry.selected_entries(config["dataset_dir"], config["dataset"])
    DATASET_FILES = registry.data_files(config["dataset_dir"], DATASET_ENTRIES)
    EVAL_ENTRIES, EVAL_FILES = {}, []
    if config["eval_dataset"]:
        if config["val_size"]:
            raise TunelineError("set either val_size or eval_dataset, not both: each defines the eval split.")
        EVAL_ENTRIES = registry.selected_entries(config["dataset_dir"], config["eval_dataset"])
        EVAL_FILES = registry.data_files(config["dataset_dir"], EVAL_ENTRIES)
    CALIBRATION_ENTRIES, CALIBRATION_FILES = {}, []
    if registry.is_data_file(config["export_quantization_dataset"]):  # LLaMA-Factory's: a file, `text` column
        CALIBRATION_FILES = [config["export_quantization_dataset"]]
    elif config["export_quantization_dataset"]:
        CALIBRATION_ENTRIES = registry.selected_entries(config["dataset_dir"], config["export_quantization_dataset"])
        CALIBRATION_FILES = registry.data_files(config["dataset_dir"], CALIBRATION_ENTRIES)
except TunelineError as err:
    raise WorkflowError(str(err)) from None


# Between-experiment sharing: run with `--cache` (and SNAKEMAKE_OUTPUT_CACHE set) and the rules
# marked `cache: SHARED` (base_model, prepare_data, prepare_eval_data, tokenize) take their results
# from the cache when any experiment made them from the same inputs, params and script.
# Snakemake forbids `benchmark:` on a cached rule (a result taken from the cache has no timing),
# so those rules get their benchmark file only when --cache is off: see benchmark_unless_shared.
SHARED = workflow.workflow_settings.cache is not None


def benchmark_unless_shared(rule_proxy):
    """What `benchmark: "results/benchmarks/<rule>.tsv"` declares, set after the rule exists."""
    if not SHARED:
        job_rule = rule_proxy.rule
        job_rule.benchmark_modifier = job_rule.log_modifier  # the path modifier its `log:` went through
        job_rule.benchmark = f"results/benchmarks/{job_rule.name}.tsv"


def params_for(rule_name):
    """The config keys `rule_name` reads (config/schema.yaml `rules:`), as its params."""
    return rule_params(config, rule_name)


def base_model_source(wildcards):
    """A local model folder or .gguf file is an input (edits rerun base_model); hub IDs are not."""
    return registry.local_model_inputs(config["model_name_or_path"])


def eval_split(wildcards):
    """The eval split (validation.jsonl) for tokenize and predict: the eval_dataset names when set,
    else prepare_data's val_size split."""
    return "results/eval_data" if config["eval_dataset"] else "results/data"


def resources_for(rule_name):
    """The job's resources from the cluster keys (config/schema.yaml `resources_of`), plus how
    the rule is launched (`launch_of`); neither triggers reruns."""
    return {**rule_resources(config, rule_name), **launch_settings(config, rule_name)}


def threads_for(rule_name):
    return rule_resources(config, rule_name).get("cpus_per_task", 1)

