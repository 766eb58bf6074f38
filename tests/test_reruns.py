"""Stale-only reruns: after a change, a dry-run plans exactly the rules that depend on it.

The tiny pipeline runs once; every case then reads a dry-run's job list.
"""

import json
import os
import shutil

import pytest

from conftest import make_workdir, planned_jobs, snakemake

DATA_ON = {"prepare_data", "tokenize", "train", "merge"}
MODEL_ON = {"base_model", "tokenize", "train", "merge"}
TRAIN_ON = {"train", "merge"}


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_model):
    """A working directory whose pipeline has run to the end (merged model and evaluation)."""
    work = make_workdir(tmp_path_factory.mktemp("reruns"), tiny_model)
    snakemake(work, "all", check=True)
    return work


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_model):
    other = tmp_path_factory.mktemp("other") / "tiny-copy"
    shutil.copytree(tiny_model, other)
    return other


def test_nothing_changed_plans_nothing(done):
    assert planned_jobs(done, "results/merged_model") == set()
    assert planned_jobs(done, "all") == set()


EVAL_GEN = {"predict", "score_generation", "eval_summary"}


@pytest.mark.parametrize("key, value, expected", [
    ("max_new_tokens", "12", EVAL_GEN),
    ("num_beams", "2", EVAL_GEN),
    ("per_device_eval_batch_size", "2", EVAL_GEN),
    ("n_shot", "1", {"mmlu", "eval_summary"}),
    ("lang", "zh", {"mmlu", "eval_summary"}),
    ("lora_rank", "16", TRAIN_ON | EVAL_GEN | {"mmlu"}),
])
def test_evaluation_keys_rerun_evaluation_only(done, key, value, expected):
    # predict and mmlu run for both models, the summary reads both; no training for an eval key
    assert planned_jobs(done, "all", "--config", f"{key}={value}") == expected


def test_every_artifact_has_provenance(done):
    for name in ("base_model", "data", "tokenized", "adapter", "merged_model"):
        record = json.loads((done / "results" / name / "provenance.json").read_text())
        assert record["packages"]["torch"] and record["packages"]["transformers"]
        for entries in record["inputs"].values():
            assert all(len(e["sha256"]) == 64 for e in entries)
    train = json.loads((done / "results" / "adapter" / "provenance.json").read_text())
    assert train["config"]["lora_rank"] == 8 and "cutoff_len" not in train["config"]
    assert set(train["inputs"]) == {"tokenized", "model"}


@pytest.mark.parametrize("key, value, expected", [
    ("lora_rank", "16", TRAIN_ON),
    ("lora_alpha", "32", TRAIN_ON),
    ("lora_dropout", "0.1", TRAIN_ON),
    ("lora_target", "q_proj,v_proj", TRAIN_ON),
    ("learning_rate", "0.0005", TRAIN_ON),
    ("max_steps", "6", TRAIN_ON),
    ("quantization_bit", "4", TRAIN_ON),
    ("lr_scheduler_type", "constant", TRAIN_ON),
    ("cutoff_len", "64", {"tokenize"} | TRAIN_ON),
    ("template", "chatml", {"tokenize"} | TRAIN_ON),
    ("train_on_prompt", "true", {"tokenize"} | TRAIN_ON),
    ("max_samples", "50", DATA_ON),
    ("val_size", "0.2", DATA_ON),
    ("identity_name", "Bob", DATA_ON),
    ("seed", "7", DATA_ON),
    ("trust_remote_code", "true", MODEL_ON),
    ("merge_tolerance", "0.05", {"merge"}),
    ("max_new_tokens", "64", set()),  # read by later stages only
    ("temperature", "0.5", set()),
    ("nproc_per_node", "2", TRAIN_ON),  # the global batch changes
    ("fsdp", "full_shard", TRAIN_ON),
    # resources and launch settings: where and how a job runs, never what it computes
    ("gpus", "1", set()),
    ("model_job_mem_mb", "1000", set()),
    ("data_job_cpus", "2", set()),
    ("slurm_partition", "gpu", set()),
    ("master_port", "12345", set()),
])
def test_config_change_reruns_exactly_its_readers(done, key, value, expected):
    assert planned_jobs(done, "results/merged_model", "--config", f"{key}={value}") == expected


def test_every_job_records_a_benchmark(done):
    """Snakemake's `benchmark:` file for each job the pipeline ran, with real time and memory."""
    names = {f.stem for f in (done / "results" / "benchmarks").glob("*.tsv")}
    assert names == {"base_model", "prepare_data", "tokenize", "train", "merge", "eval_summary",
                     *(f"{rule}_{m}" for rule in ("predict", "score_generation", "mmlu") for m in ("base", "tuned"))}
    import csv

    with open(done / "results" / "benchmarks" / "train.tsv") as fh:
        row = next(csv.DictReader(fh, delimiter="\t"))
    assert float(row["s"]) > 0 and float(row["max_rss"]) > 100  # seconds; MB (torch alone is more)


def test_another_base_model_reruns_model_side_only(done, other_model):
    jobs = planned_jobs(done, "results/merged_model", "--config", f"model_name_or_path={other_model}")
    assert jobs == MODEL_ON


def test_data_edits(done):
    data = done / "data" / "identity.json"
    # touching without changing the content plans nothing (checksums, raised limit in the profile)
    os.utime(data, (data.stat().st_atime + 100, data.stat().st_mtime + 100))
    assert planned_jobs(done, "results/merged_model") == set()

    # another dataset's registry entry is not this run's business
    registry = done / "data" / "dataset_info.json"
    original_registry = registry.read_text()
    entries = json.loads(original_registry)
    entries["unrelated"] = {"file_name": "nowhere.json"}
    registry.write_text(json.dumps(entries))
    assert planned_jobs(done, "results/merged_model") == set()

    # but the selected dataset's entry is
    entries["identity"]["columns"]["query"] = "input"
    entries["identity"]["columns"].pop("history")
    registry.write_text(json.dumps(entries))
    assert planned_jobs(done, "results/merged_model") == DATA_ON
    registry.write_text(original_registry)

    # a real edit reruns prepare_data onward
    original = data.read_text()
    records = json.loads(original)
    records[0]["output"] = "Something else entirely."
    data.write_text(json.dumps(records))
    try:
        assert planned_jobs(done, "results/merged_model") == DATA_ON
    finally:
        data.write_text(original)


def test_eval_dataset_replaces_the_val_split_for_predict(done):
    jobs = planned_jobs(done, "results/eval/tuned/predict_results.json", "--config", "eval_dataset=identity",
                        "val_size=0")
    assert "prepare_eval_data" in jobs and {"predict", "score_generation"} <= jobs
    # it is the validation split in training too: tokenize encodes it, train evaluates on it
    assert {"prepare_eval_data", "tokenize", "train"} <= planned_jobs(
        done, "results/adapter", "--config", "eval_dataset=identity", "val_size=0")
