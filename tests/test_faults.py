"""Faults: nothing lost, nothing stale, nothing half-written — real Snakemake runs on the tiny model.

One pipeline runs to the merged model; each case works in a copy of that folder (metadata and
file times kept), so every case starts from "a good run of the previous config".
"""

import shutil

import pytest

from conftest import REPO, make_workdir, snakemake


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_model):
    work = make_workdir(tmp_path_factory.mktemp("faults"), tiny_model)
    snakemake(work, "results/merged_model", check=True)
    return work


@pytest.fixture
def work(done, tmp_path):
    copy = tmp_path / "work"
    shutil.copytree(done, copy, symlinks=True)
    return copy


def broken_model(work, tiny_model):
    bad = work / "broken-model"
    shutil.copytree(tiny_model, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])  # a download cut short
    return str(bad)


# one failure per rule on the way to the merged model: a key whose new value makes that job fail
FAILURES = {
    "base_model": lambda work, tiny: f"model_name_or_path={broken_model(work, tiny)}",
    "prepare_data": lambda work, tiny: "val_size=1000",
    "tokenize": lambda work, tiny: "cutoff_len=1",
    "train": lambda work, tiny: "lora_target=no_such_module",
    "merge": lambda work, tiny: "merge_tolerance=1e-30",
}


@pytest.mark.parametrize("rule", list(FAILURES))
def test_a_failed_config_never_looks_complete(work, tiny_model, rule):
    override = FAILURES[rule](work, tiny_model)
    first = snakemake(work, "results/merged_model", "--config", override)
    assert first.returncode != 0 and f"Error in rule {rule}" in first.output, first.output[-3000:]
    # Snakemake alone answered "Nothing to be done" here and kept the old config's merged model
    again = snakemake(work, "results/merged_model", "--config", override)
    assert again.returncode != 0 and f"Error in rule {rule}" in again.output, again.output[-3000:]
    assert not (work / "results" / "merged_model").exists()
    assert not list((work / "results").glob(".partial.*"))


def test_a_broken_weights_file_is_named(work, tiny_model):
    proc = snakemake(work, "results/base_model", "--config", FAILURES["base_model"](work, tiny_model))
    assert proc.returncode != 0 and "broken-model/model.safetensors" in proc.output, proc.output[-3000:]


def test_a_killed_merge_leaves_no_half_written_model_and_reruns_by_itself(work):
    # a merge killed while writing: the staging folder is left, the final name never exists
    staged = work / "results" / ".partial.merged_model"
    shutil.rmtree(work / "results" / "merged_model")
    staged.mkdir()
    (staged / "model-00001-of-00002.safetensors").write_bytes(b"half")
    proc = snakemake(work, "results/merged_model", "--config", "merge_tolerance=0.02")
    assert proc.returncode == 0, proc.output[-3000:]
    assert not staged.exists() and (work / "results" / "merged_model" / "model.safetensors").is_file()


def test_export_dir_never_deletes_a_users_folder(work, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep").write_text("x")
    for target in (str(mine), str(REPO / "resources"), str(REPO.parent), str(work / "data"), "results", str(work)):
        proc = snakemake(work, "export", "--config", "export_format=merged", f"export_dir={target}")
        assert proc.returncode != 0 and "export_dir=" in proc.output, (target, proc.output[-2000:])
    assert (mine / "keep").read_text() == "x" and (work / "data" / "dataset_info.json").is_file()
    ok = snakemake(work, "export", "--config", "export_format=merged", f"export_dir={tmp_path / 'new'}")
    assert ok.returncode == 0, ok.output[-3000:]
    assert (tmp_path / "new" / "model.safetensors").is_file() and (tmp_path / "new" / ".tuneline-export").is_file()
    again = snakemake(work, "export", "--config", "export_format=merged", f"export_dir={tmp_path / 'new'}",
                      "--forcerun", "export")
    assert again.returncode == 0, again.output[-3000:]  # its own export is replaced


def test_export_dir_expands_the_home_folder(work, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    proc = snakemake(work, "export", "--config", "export_format=merged", "export_dir=~/models/m")
    assert proc.returncode == 0, proc.output[-3000:]
    assert (tmp_path / "home" / "models" / "m" / "config.json").is_file() and not (work / "~").exists()


def test_an_export_dir_copy_of_another_config_never_looks_current(work, tmp_path):
    out = tmp_path / "exported"
    args = ["export", "--config", "export_format=merged", f"export_dir={out}"]
    assert snakemake(work, *args).returncode == 0
    assert (out / "model.safetensors").is_file()
    failing = snakemake(work, *args, "merge_tolerance=1e-30")
    assert failing.returncode != 0 and "Error in rule merge" in failing.output
    assert not out.exists()  # it was made from the merged model that this config replaces
    again = snakemake(work, *args, "merge_tolerance=1e-30")
    assert again.returncode != 0 and "Error in rule merge" in again.output, again.output[-2000:]
