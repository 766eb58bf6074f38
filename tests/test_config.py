"""The schema is the one definition of every key: checks, slices and docs all come from it."""

import re

import pytest
import yaml

from conftest import REPO
from tuneline import config as c
from tuneline.errors import TunelineError


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(TunelineError, match=r"unknown config key 'lora_rnak' \(did you mean lora_rank\?\)"):
        c.check_unknown_keys({"lora_rnak": 8, "dataset": "identity"})
    with pytest.raises(TunelineError, match=r"unknown config key 'zzz'\."):
        c.check_unknown_keys({"zzz": 1})


def test_values_are_checked_with_the_key_named():
    with pytest.raises(TunelineError, match=r"config key 'quantization_bit' = 3: .*Allowed: 4, 8, null"):
        c.check_values({"quantization_bit": 3})
    with pytest.raises(TunelineError, match=r"config key 'learning_rate'"):
        c.check_values({"learning_rate": 0})
    c.check_values(c.defaults())


def test_command_line_strings_are_read_as_yaml_for_typed_keys():
    cfg = {"train_on_prompt": "true", "quantization_bit": "null", "lora_rank": "16", "identity_name": "true"}
    c.coerce_cli_values(cfg)
    assert cfg == {"train_on_prompt": True, "quantization_bit": None, "lora_rank": 16, "identity_name": "true"}


def test_rule_params_are_exactly_the_keys_that_name_the_rule():
    params = c.rule_params({"lora_rank": 16}, "train")
    assert params["lora_rank"] == 16 and params["seed"] == 42
    assert "cutoff_len" not in params and "dataset" not in params
    assert set(c.rule_params({}, "tokenize")) == {"template", "cutoff_len", "train_on_prompt", "mask_history",
                                                  "default_system", "stage"}


def test_every_key_is_fully_described_and_read_by_real_rules():
    rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        rules |= set(re.findall(r"^\s*rule (\w+):", smk.read_text(), re.M))
    for key, spec in c.keys().items():
        assert {"type", "default", "description", "rules"} <= set(spec), key
        assert set(spec["rules"]) <= rules, key
        # read by rules, or setting their resources / how they are launched (never params), or by the
        # Snakefile itself (output_dir: the run's folder)
        others = spec.get("resources_of", []) + spec.get("launch_of", [])
        assert bool(spec["rules"]) + bool(others) + bool(spec.get("workflow")) == 1, key
        assert set(others) <= rules | {"*"}, key
        if spec.get("resources_of"):
            assert spec["resource"] in {"gpu", "gpu_model", "mem_mb", "runtime", "cpus_per_task",
                                        "slurm_partition", "slurm_account"}, key


def test_every_rule_has_its_script_and_library_module():
    scripted = []
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for rule, body in re.findall(r"^\s*rule (\w+):(.*?)(?=^\s*rule |\Z)", smk.read_text(), re.M | re.S):
            if "script:" in body:
                assert f'"../../scripts/{rule}.py"' in body
                assert (REPO / "scripts" / f"{rule}.py").is_file() and (REPO / "tuneline" / f"{rule}.py").is_file()
                scripted.append(rule)
    assert {"base_model", "prepare_data", "tokenize", "train", "merge", "predict", "mmlu"} <= set(scripted)


def test_shipped_config_is_valid():
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    c.check_unknown_keys(cfg)
    c.check_values(cfg)


@pytest.mark.parametrize("doc", ["docs/config.md", "README.md"])
def test_docs_key_table_is_generated_from_the_schema(doc):
    assert c.docs_block() in (REPO / doc).read_text(), f"{doc} is stale: run `tuneline keys --write`"


def test_optim_names_are_the_locked_transformers_ones_and_checked_before_any_job():
    from transformers.training_args import OptimizerNames

    from tuneline.config import check_values, keys

    assert keys()["optim"]["enum"] == [o.value for o in OptimizerNames]
    with pytest.raises(TunelineError, match="config key 'optim' = 'bogus'.*adamw_torch"):
        check_values({"optim": "bogus"})


def test_yaml_numbers_as_llamafactory_users_write_them():
    from tuneline.config import check_values, coerce_cli_values

    config = yaml.safe_load("learning_rate: 5e-5\nweight_decay: 1e-2\nmax_grad_norm: 1.0\n")
    assert config["learning_rate"] == "5e-5"  # PyYAML (YAML 1.1) reads it as a string
    coerce_cli_values(config)
    assert config == {"learning_rate": 5e-5, "weight_decay": 0.01, "max_grad_norm": 1.0}
    check_values(config)


def test_a_missing_deepspeed_file_is_an_error(tmp_path):
    from tuneline.config import check_files

    with pytest.raises(TunelineError, match="'deepspeed' = 'ds.json': no such file"):
        check_files({"deepspeed": "ds.json"})
    (tmp_path / "ds.json").write_text("{}")
    check_files({"deepspeed": str(tmp_path / "ds.json")})


# LLaMA-Factory's examples/train_lora/qwen3_lora_sft.yaml, as its keys and values (model, template and
# dataset_dir are swapped for local ones by the tests, as a user would; output_dir is tested on its own)
LF_SFT = {"trust_remote_code": True, "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8,
          "lora_target": "all", "dataset": "identity", "cutoff_len": 2048, "max_samples": 1000,
          "preprocessing_num_workers": 16, "dataloader_num_workers": 4, "logging_steps": 10, "save_steps": 500,
          "plot_loss": True, "overwrite_output_dir": True, "save_only_model": False, "report_to": "none",
          "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 1.0e-4,
          "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True,
          "ddp_timeout": 180000000, "resume_from_checkpoint": None}


def test_llamafactory_keys_are_accepted_aliased_or_refused_with_what_to_use():
    cfg = dict(LF_SFT, quantization_method="bnb", neat_packing=True, disable_gradient_checkpointing=False)
    notes = c.adopt_foreign_keys(cfg)
    c.check_unknown_keys(cfg)
    c.check_values(cfg)
    assert "do_train" not in cfg and "plot_loss" not in cfg and cfg["packing"] is True
    assert c.rule_params(cfg, "train")["dataloader_num_workers"] == 4  # a Tuneline key: used
    assert cfg["gradient_checkpointing"] is True  # disable_gradient_checkpointing: false, negated
    assert any("`plot_loss` is accepted and not used: the loss curve is always drawn" in n for n in notes)
    assert any("`neat_packing` is read as `packing`" in n for n in notes)
    run = {"output_dir": "saves/x"}  # a Tuneline key: the run's folder (tests/test_llamafactory.py)
    assert c.adopt_foreign_keys(run) == [] and c.check_unknown_keys(run) is None
    with pytest.raises(TunelineError, match=r"`quantization_method` = 'hqq' is not supported by Tuneline yet: only bnb"):
        c.adopt_foreign_keys({"quantization_method": "hqq"})
    typo = {"lora_rnak": 8}
    assert c.adopt_foreign_keys(typo) == [] and typo == {"lora_rnak": 8}  # a typo stays a typo
    with pytest.raises(TunelineError, match="unknown config key 'lora_rnak'"):
        c.check_unknown_keys(typo)


def test_foreign_names_point_to_the_tuneline_key():
    cfg = {"target_modules": ["q_proj", "v_proj"], "max_seq_length": 512, "evaluation_strategy": "steps"}
    c.adopt_foreign_keys(cfg)
    assert cfg == {"lora_target": "q_proj,v_proj", "cutoff_len": 512, "eval_strategy": "steps"}
    with pytest.raises(TunelineError, match=r"`train_file` is not a Tuneline key: register the file in"):
        c.adopt_foreign_keys({"train_file": "data.json"})


def test_every_alias_names_a_tuneline_key_and_no_foreign_key_shadows_one():
    schema = c.load_schema()
    for section in ("llamafactory", "foreign_keys"):
        for key, rule in schema[section].items():
            assert key not in c.keys(), key
            assert ("alias" in rule) + ("accept" in rule or "refuse" in rule) == 1 or "accept_values" in rule, key
            if "alias" in rule:
                assert rule["alias"] in c.keys(), (key, rule)
