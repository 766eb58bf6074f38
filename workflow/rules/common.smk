# One-time work: check and complete the config, and give each rule its slice of it.
# Only light imports here: a no-op dry-run must stay fast.
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from tuneline import registry
from tuneline.config import SCHEMA_PATH, check_unknown_keys, check_values, coerce_cli_values, rule_params
from tuneline.errors import TunelineError

try:
    check_unknown_keys(config)
    coerce_cli_values(config)
    check_values(config)
except TunelineError as err:
    raise WorkflowError(str(err)) from None

validate(config, str(SCHEMA_PATH), set_default=True)

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
    if config["export_quantization_dataset"]:
        CALIBRATION_ENTRIES = registry.selected_entries(config["dataset_dir"], config["export_quantization_dataset"])
        CALIBRATION_FILES = registry.data_files(config["dataset_dir"], CALIBRATION_ENTRIES)
except TunelineError as err:
    raise WorkflowError(str(err)) from None


def params_for(rule_name):
    """The config keys `rule_name` reads (config/schema.yaml `rules:`), as its params."""
    return rule_params(config, rule_name)


def base_model_source(wildcards):
    """A local model folder or .gguf file is an input (edits rerun base_model); hub IDs are not."""
    return registry.local_model_inputs(config["model_name_or_path"])


def eval_split(wildcards):
    """predict's eval split: the eval_dataset names when set, else prepare_data's val_size split."""
    return "results/eval_data" if config["eval_dataset"] else "results/data"
