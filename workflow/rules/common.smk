# One-time work: check and complete the config, and give each rule its slice of it.
# Only light imports here: a no-op dry-run must stay fast.
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from tuneline.config import check_unknown_keys, coerce_cli_values, rule_params, SCHEMA_PATH
from tuneline.errors import TunelineError
from tuneline import registry

try:
    check_unknown_keys(config)
    coerce_cli_values(config)
except TunelineError as err:
    raise WorkflowError(str(err)) from None

validate(config, str(SCHEMA_PATH), set_default=True)


def params_for(rule_name):
    """The config keys `rule_name` reads (config/schema.yaml `rules:`), as its params."""
    return rule_params(config, rule_name)


def dataset_files(wildcards):
    """Data files of the selected datasets: editing one reruns prepare_data onward."""
    try:
        return registry.data_files(config["dataset_dir"], config["dataset"])
    except TunelineError as err:
        raise WorkflowError(str(err)) from None


def base_model_source(wildcards):
    """A local model folder or .gguf file is an input (edits rerun base_model); hub IDs are not."""
    return registry.local_model_inputs(config["model_name_or_path"])
