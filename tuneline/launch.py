"""Several training processes: torchrun launch of the train job, and the Trainer's DDP / deepspeed /
fsdp options. With nproc_per_node or nnodes above 1 the job relaunches itself through torchrun
(`python -m tuneline.launch JOB.json` in every process); rank 0 writes the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .checkpoints import checkpoint_dir, train_key
from .errors import TunelineError


def distributed_arguments(params: dict, cuda: bool) -> dict:
    """The Trainer's multi-process options: none for a single process."""
    if world_size(params) == 1:
        return {}  # deepspeed / fsdp: train() logs that they are not used
    find_unused = params["ddp_find_unused_parameters"]
    return {
        "ddp_backend": params["ddp_backend"] or ("nccl" if cuda else "gloo"),
        "ddp_timeout": params["ddp_timeout"],
        # LoRA: frozen base weights are not "unused"; searching for them costs a graph walk per step
        "ddp_find_unused_parameters": False if find_unused is None else find_unused,
        "deepspeed": params["deepspeed"],
        "fsdp": params["fsdp"] or "",
    }


def world_size(params: dict) -> int:
    return params["nproc_per_node"] * params["nnodes"]


def torchrun_command(params: dict, launch: dict, job_file: Path) -> list[str]:
    """torchrun for this job: standalone on one node (it picks a free port), else the
    rendezvous at master_addr:master_port with this node's rank (SLURM_NODEID on SLURM)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={params['nproc_per_node']}"]
    if params["nnodes"] == 1:
        cmd.append("--standalone")
    else:
        node_rank = int(os.environ.get("SLURM_NODEID", launch.get("node_rank", 0)))
        cmd += [f"--nnodes={params['nnodes']}", f"--node_rank={node_rank}",
                f"--master_addr={launch.get('master_addr', '127.0.0.1')}",
                f"--master_port={launch.get('master_port', 29500)}"]
    return cmd + ["-m", "tuneline.launch", str(job_file)]


def launch_distributed(inputs, outputs, params, log, threads, launch):
    """Run this job in nproc_per_node processes through torchrun and wait for them."""
    ckpt = checkpoint_dir(train_key(params, inputs["tokenized"]))
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    job_file = ckpt.parent / f"{ckpt.name}.job.json"
    per_process = max(1, threads // params["nproc_per_node"])
    log_file = next((h.baseFilename for h in log.handlers if hasattr(h, "baseFilename")), None)
    job_file.write_text(json.dumps({"inputs": inputs, "outputs": outputs, "params": params,
                                    "threads": per_process, "log": log_file}, indent=2))
    cmd = torchrun_command(params, launch, job_file)
    log.info("launching %d processes (%d threads each): %s", world_size(params), per_process, " ".join(cmd))
    for handler in log.handlers:  # rank 0 appends to the log: write after its lines, not over them
        if hasattr(handler, "baseFilename"):
            handler.mode = "a"
            handler.close()
    env = {**os.environ, "OMP_NUM_THREADS": str(per_process)}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise TunelineError(f"torchrun exited with {proc.returncode}: the processes' errors are above "
                            f"(and in this rule's log). The job description is {job_file}.")
    job_file.unlink()
    return {"train_report": json.loads((Path(outputs["adapter"]) / "train_report.json").read_text())}


def worker(job_file: str) -> None:
    """One torchrun process: rank 0 logs to the rule's log file, every rank to stderr."""
    from .rule import setup_logging
    from .train import train

    job = json.loads(Path(job_file).read_text())
    rank = int(os.environ.get("RANK", "0"))
    # rank 0 appends to the rule's log after the launcher's lines; every rank logs to stderr
    log = setup_logging(job["log"] if rank == 0 else None, f"train.rank{rank}", mode="a")
    train(job["inputs"], job["outputs"], job["params"], log, job["threads"])


if __name__ == "__main__":
    worker(sys.argv[1])
