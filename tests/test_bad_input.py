"""Bad input: a clear error naming the culprit, and no output that Snakemake takes as complete."""

import json

import pytest

from conftest import make_workdir, planned_jobs, snakemake


def fails(work, target, *args, expect):
    proc = snakemake(work, target, *args)
    assert proc.returncode != 0, proc.output[-3000:]
    for text in expect:
        assert text in proc.output, f"{text!r} not in:\n{proc.output[-4000:]}"
    assert not (work / target).exists(), f"{target} was left behind"
    return proc


def add_dataset(work, name, entry, filename, content):
    (work / "data" / filename).write_text(content)
    registry = json.loads((work / "data" / "dataset_info.json").read_text())
    registry[name] = {"file_name": filename, **entry}
    (work / "data" / "dataset_info.json").write_text(json.dumps(registry))


@pytest.mark.parametrize("override, expect", [
    ("lora_rnak=8", ["unknown config key 'lora_rnak'", "did you mean lora_rank?"]),
    ("quantization_bit=3", ["config key 'quantization_bit'", "Allowed: 4, 8, null"]),
    ("finetuning_type=lorra", ["config key 'finetuning_type'", "'lorra'"]),
    ("template=chatmlx", ["config key 'template'", "chatml"]),
    ("dataset=identiti", ["unknown dataset 'identiti'", "registers identity", "Did you mean identity?"]),
    ("eval_dataset=identity", ["set either val_size or eval_dataset, not both"]),
    ("task=mmlu", ["config key 'task'", "does not match"]),
])
def test_config_errors_stop_before_any_job(tmp_path, tiny_model, override, expect):
    work = make_workdir(tmp_path, tiny_model)
    fails(work, "results/merged_model", "--config", override, expect=expect)
    assert not (work / "results").exists()


def test_missing_data_file(tmp_path, tiny_model):
    work = make_workdir(tmp_path, tiny_model)
    (work / "data" / "identity.json").unlink()
    fails(work, "results/data", expect=["dataset 'identity'", "identity.json does not exist"])


def test_malformed_jsonl_names_file_and_line(tmp_path, tiny_model):
    work = make_workdir(tmp_path, tiny_model)
    good = json.dumps({"instruction": "q", "input": "", "output": "a"})
    add_dataset(work, "broken", {}, "broken.jsonl", f"{good}\n{good}\n{{\"instruction\": \"q\",\n")
    fails(work, "results/data", "--config", "dataset=broken",
          expect=["broken.jsonl, line 3", "malformed JSON"])
    assert planned_jobs(work, "results/data", "--config", "dataset=broken") == {"prepare_data"}


def test_missing_mapped_column(tmp_path, tiny_model):
    work = make_workdir(tmp_path, tiny_model)
    add_dataset(work, "qa", {"columns": {"prompt": "question", "response": "output"}}, "qa.json",
                json.dumps([{"instruction": "q", "output": "a"}]))
    fails(work, "results/data", "--config", "dataset=qa",
          expect=["dataset 'qa'", "column 'question' (columns.prompt) is missing"])


def test_empty_after_filtering(tmp_path, tiny_model):
    work = make_workdir(tmp_path, tiny_model)
    odd = [{"conversations": [{"from": "human", "value": "hi"}]}]  # no response: invalid
    add_dataset(work, "odd", {"formatting": "sharegpt"}, "odd.json", json.dumps(odd))
    fails(work, "results/data", "--config", "dataset=odd", expect=["no valid examples left in dataset(s) odd"])


def test_missing_model_path(tmp_path, tiny_model):
    work = make_workdir(tmp_path, tiny_model)
    fails(work, "results/base_model", "--config", "model_name_or_path=./models/does-not-exist",
          expect=["model path './models/does-not-exist'", "does not exist"])


def test_lora_target_matching_nothing_lists_modules(tmp_path, tiny_model):
    work = make_workdir(tmp_path, tiny_model)
    fails(work, "results/adapter", "--config", "lora_target=q_proj,qkv",
          expect=["lora_target 'q_proj,qkv'", "qkv matches no linear module",
                  "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"])
    # the upstream artifacts are complete and kept; only train is planned again
    assert planned_jobs(work, "results/adapter", "--config", "lora_target=q_proj,qkv") == {"train"}
