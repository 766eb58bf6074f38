"""The whole DAG through a real SLURM scheduler (issue #7): tests/slurm/cluster.sh installs
Debian's slurm-wlm and munge, starts a single-node cluster on this machine, and stops it after.

Skipped, with the reason, where that cannot be done (not root and no SLURM installed, no apt-get,
no executor plugin). Each job costs the plugin's polling (~10-20 s), so it runs the tiny model.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import REPO, make_workdir, snakemake

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"


def why_not() -> str | None:
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install '.[slurm]')"
    if os.geteuid() != 0:
        return "starting a test SLURM cluster needs root (its daemons and /etc/slurm links)"
    installed = all(shutil.which(p) for p in ("slurmctld", "slurmd", "munged"))
    if not installed and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


pytestmark = pytest.mark.skipif(why_not() is not None, reason=why_not() or "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "TUNELINE_SLURM_DIR": str(state)}
    start = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=900)
    if start.returncode != 0:
        pytest.fail(f"cluster.sh start failed:\n{start.stdout}\n{start.stderr}")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, timeout=60)
    os.environ.pop("SLURM_CONF", None)


def scheduler_records(workdir) -> list[dict]:
    """The controller's records of the jobs that ran in `workdir` (kept MinJobAge seconds)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if fields.get("WorkDir") == str(workdir):
            jobs.append(fields)
    return jobs


def test_whole_dag_runs_through_slurm(cluster, tmp_path, tiny_model):
    # GPU rules ask for a GPU (the test node's gres is backed by /dev/null); small memory requests
    work = make_workdir(tmp_path, tiny_model, gpus=1, model_job_mem_mb=3000, model_job_cpus=2,
                        data_job_mem_mb=1000, max_steps=2)
    started = time.time()
    proc = snakemake(work, "all", "--profile", str(REPO / "profiles" / "slurm"),
                     "--slurm-init-seconds-before-status-checks", "5", timeout=1500)
    assert proc.returncode == 0, proc.output[-6000:]
    for out in ("merged_model/model.safetensors", "eval/summary.md", "adapter/adapter_model.safetensors"):
        assert (work / "results" / out).is_file(), out

    jobs = scheduler_records(work)
    rules = sorted(re.sub(r"^rule_([a-z_]+?)(_wildcards_.*)?$", r"\1", j["Comment"]) for j in jobs)
    assert rules == sorted(["base_model", "prepare_data", "tokenize", "train", "merge", "eval_summary"]
                           + 2 * ["predict", "score_generation", "mmlu"]), rules
    assert all(j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs)
    by_rule = {re.sub(r"^rule_([a-z_]+?)(_wildcards_.*)?$", r"\1", j["Comment"]): j for j in jobs}
    assert "gpu" in by_rule["train"].get("TresPerJob", "") and "gpu" in by_rule["merge"].get("TresPerJob", "")
    assert "gpu" not in by_rule["tokenize"].get("TresPerJob", "")
    # the job-completion log is the scheduler's durable record of the same jobs
    completed = (cluster / "log" / "jobcomp.log").read_text()
    for j in jobs:
        assert f"JobId={j['JobId']} " in completed
    print(f"{len(jobs)} SLURM jobs in {time.time() - started:.0f} s")
