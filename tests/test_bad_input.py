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
    fails(work, "results/data", "--config", "dataset=odd", expect=["dataset 'odd'", "1 of 1 records are invalid", "does not end with a response (record 1)"])


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


# ---------------------------------------------------------------- records: nothing silently dropped or changed

import logging  # noqa: E402

from tuneline import records  # noqa: E402
from tuneline.config import rule_params  # noqa: E402
from tuneline.errors import TunelineError  # noqa: E402
from tuneline.registry import selected_entries  # noqa: E402

LOG = logging.getLogger("test")


def collect_file(tmp_path, content, entry=None, filename="d.json", stage="sft"):
    if not isinstance(content, (str, bytes)):
        content = json.dumps(content)
    (tmp_path / filename).write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": filename, **(entry or {})}}))
    keys = rule_params({"dataset_dir": str(tmp_path), "dataset": "d", "stage": stage}, "prepare_data")
    return records.collect(selected_entries(str(tmp_path), "d"), LOG,
                           **{k: keys[k] for k in records.COLLECT_KEYS})


def test_alpaca_records_without_a_usable_instruction_are_counted_not_trained_as_empty_prompts(tmp_path):
    bad = [{"output": "a"}, {"instruction": None, "output": "a"}, {"instruction": ["x"], "output": "a"}] * 10
    with pytest.raises(TunelineError, match=r"'d' .*d\.json\): 30 of 30 records are invalid .*empty prompt "
                                            r"\(instruction and input missing, null or empty\) \(records 1, 2, 4, 5"):
        collect_file(tmp_path, bad)


def test_converted_and_dropped_records_are_counted_with_record_numbers(tmp_path, caplog):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": 7, "input": 3, "output": "a"},
            {"instruction": ["x"], "output": "a"}, {"instruction": "q2", "output": "b"}]
    with caplog.at_level(logging.WARNING, logger="test"):
        examples, stats = collect_file(tmp_path, rows)
    assert [e["messages"][0]["content"] for e in examples] == ["q", "7\n3", "q2"]
    assert stats["invalid"] == 1
    assert "converted values in 1 records: 1 instruction: number converted to text (record 2); " \
           "1 input: number converted to text (record 2)" in caplog.text
    assert "dropped 1 of 4 records: 1 instruction is a list, not text (record 3)" in caplog.text


@pytest.mark.parametrize("message", ["hello", None])
def test_a_sharegpt_message_that_is_not_an_object_is_dropped_with_a_count(tmp_path, caplog, message):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    bad = {"conversations": [message, {"from": "gpt", "value": "yo"}]}
    with caplog.at_level(logging.WARNING, logger="test"):
        other = {"conversations": [{"from": "human", "value": "ho"}, {"from": "gpt", "value": "yo"}]}
        examples, _ = collect_file(tmp_path, [good, other, bad], {"formatting": "sharegpt"})
    assert len(examples) == 2 and "1 a message in conversations is not an object (record 3)" in caplog.text


def test_an_empty_data_file_is_named(tmp_path):
    with pytest.raises(TunelineError, match=r"dataset 'd': .*d\.json holds no records \(the file is empty\)"):
        collect_file(tmp_path, "")


def test_invalid_utf8_names_the_file_and_byte(tmp_path):
    with pytest.raises(TunelineError, match=r"d\.json: not valid UTF-8 at byte 18"):
        collect_file(tmp_path, b'[{"instruction": "\xff"}]')


def test_every_rule_that_collects_records_has_the_keys_it_needs():
    # export_gptq once raised KeyError: 'stage' whenever export_quantization_dataset was set
    for rule in ("prepare_data", "prepare_eval_data", "export_gptq"):
        assert set(records.COLLECT_KEYS) <= set(rule_params({}, rule)), rule


@pytest.mark.parametrize("stage,dataset", [("sft", "identity"), ("pt", "c4_demo")])
def test_gptq_calibration_set_from_the_registry_on_cpu(tokenizer, stage, dataset):
    from conftest import LF_DATA
    from tuneline import export_gptq
    from tuneline.templates import get_template

    params = rule_params({"dataset_dir": str(LF_DATA), "stage": stage, "export_quantization_dataset": dataset,
                          "max_samples": 16}, "export_gptq")
    params["entries"] = selected_entries(str(LF_DATA), dataset)
    examples = export_gptq.load_examples({}, params, LOG)
    texts = export_gptq.calibration_texts(examples, get_template(None, tokenizer, None, LOG), tokenizer, 8, 64, 0, LOG)
    assert len(texts) == 8 and all(t.strip() for t in texts)


def test_registry_entries_that_are_not_objects_or_lack_file_name_are_named(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"s": "s.json", "n": {"formatting": "alpaca"}}))
    with pytest.raises(TunelineError, match=r"dataset 's' in .*dataset_info.json is a str, not an object"):
        selected_entries(str(tmp_path), "s")
    with pytest.raises(TunelineError, match=r"dataset 'n' in .*dataset_info.json has neither file_name nor a hub"):
        selected_entries(str(tmp_path), "n")


def test_a_data_file_outside_dataset_dir_is_logged(tmp_path, caplog):
    (tmp_path / "reg").mkdir()
    (tmp_path / "outside.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    (tmp_path / "reg" / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "../outside.json"}}))
    keys = rule_params({"dataset_dir": str(tmp_path / "reg"), "dataset": "d"}, "prepare_data")
    with caplog.at_level(logging.INFO, logger="test"):
        records.collect(selected_entries(str(tmp_path / "reg"), "d"), LOG, **{k: keys[k] for k in records.COLLECT_KEYS})
    assert "dataset 'd': file_name '../outside.json' lies outside dataset_dir" in caplog.text


def test_chat_refuses_a_pickle_only_model_folder_with_a_message(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    proc = subprocess.run([str(Path(sys.executable).parent / "tuneline"), "chat", str(folder), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "holds only pickle weights (pytorch_model.bin): Tuneline loads safetensors only" in proc.stderr


def test_a_llamafactory_example_config_plans_and_output_dir_yields_to_directory(tmp_path, tiny_model):
    import yaml

    from conftest import LF_DATA
    from test_config import LF_SFT

    work = make_workdir(tmp_path, tiny_model)
    # LLaMA-Factory's qwen3_lora_dpo.yaml keys, model/template/dataset_dir swapped for local ones
    cfg = dict(LF_SFT, stage="dpo", dataset="dpo_en_demo", pref_beta=0.1, pref_loss="sigmoid", learning_rate=5.0e-6,
               model_name_or_path=str(tiny_model), template="chatml", dataset_dir=str(LF_DATA), bf16=False)
    cfg.pop("trust_remote_code")
    (work / "lf.yaml").write_text(yaml.safe_dump(cfg))
    (work / "tuneline.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(work, "results/merged_model")
    assert jobs == {"base_model", "prepare_data", "tokenize", "train", "merge"}
    proc = snakemake(work, "--dry-run", "results/merged_model")
    assert "Tuneline: LLaMA-Factory's key `do_train` is accepted and not used" in proc.output
    # output_dir is the run's folder; an explicit --directory (as these tests give) names it instead, with a warning
    proc = snakemake(work, "--dry-run", "results/merged_model", "--config", "output_dir=saves/qwen3-4b/lora/dpo")
    assert proc.returncode == 0 and "output_dir saves/qwen3-4b/lora/dpo is not used: --directory" in proc.output


@pytest.mark.parametrize("content, expect", [
    ("max_steps: 2\n\tmax_samples: 24\n", ["bad.yaml:2:1: the config file is not valid YAML", "YAML does not allow tabs"]),
    ("- max_steps: 2\n", ["bad.yaml: a config file is a mapping of keys", "not a list"]),
    ("lerning_rate: 1.0\n", ["bad.yaml: unknown config key 'lerning_rate' (did you mean learning_rate?)"]),
])
def test_tuneline_run_names_the_config_file_and_line_snakemake_does_not(tmp_path, tiny_model, content, expect):
    """Snakemake reads --configfile in its own command line, before any workflow code, and says only
    "Config file is not valid JSON or YAML"; `tuneline run` checks the files first and names both."""
    import subprocess
    import sys

    from conftest import REPO

    work = make_workdir(tmp_path, tiny_model)
    (work / "bad.yaml").write_text(content)
    proc = subprocess.run([sys.executable, "-m", "tuneline.cli", "run", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(work), "-n", "results/merged_model", "--configfile",
                           str(work / "tuneline.yaml"), str(work / "bad.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for text in expect:
        assert text in proc.stderr, proc.stderr
    check = subprocess.run([sys.executable, "-m", "tuneline.cli", "check", str(work / "bad.yaml")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and expect[0] in check.stderr


def test_tuneline_run_is_snakemake_with_the_same_arguments(tmp_path, tiny_model):
    import subprocess
    import sys

    from conftest import REPO

    work = make_workdir(tmp_path, tiny_model)
    proc = subprocess.run([sys.executable, "-m", "tuneline.cli", "run", "--configfile", str(work / "tuneline.yaml"),
                           "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), "-n", "results/tokenized"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenize" in proc.stdout + proc.stderr and not (work / "results").exists()
