"""Rule `train`: a LoRA adapter (QLoRA by default) with the Hugging Face Trainer and PEFT.

Writes into the adapter folder: the PEFT adapter (safetensors), template.json (from tokenize,
so inference renders prompts the same way), loss_history.json, loss.png and train_report.json.
Checkpoints go to .tuneline/checkpoints/<key>, outside the output that Snakemake owns; the
key is a hash of the config slice and the tokenized data, and the folder is removed after a
successful run.

With nproc_per_node or nnodes above 1 the job launches itself through torchrun
(`python -m tuneline.train JOB.json` in every process): DDP, or the deepspeed / fsdp options
passed to the Trainer. Rank 0 writes the outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .modeling import compute_dtype, load_causal_lm, lora_targets, set_threads
from .provenance import sha256_path

CHECKPOINT_ROOT = Path(".tuneline") / "checkpoints"


def checkpoint_dir(params: dict, tokenized: str) -> Path:
    key = hashlib.sha256((json.dumps(params, sort_keys=True) + sha256_path(tokenized)).encode()).hexdigest()[:16]
    return CHECKPOINT_ROOT / f"train-{key}"


def build_model(base: str, params: dict, dtype, log):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quant = None
    if params["quantization_bit"]:
        quant = {"bits": params["quantization_bit"], "type": params["quantization_type"],
                 "double": params["double_quantization"]}
    model_dtype = dtype if torch.cuda.is_available() or dtype == torch.float32 else torch.float32
    model = load_causal_lm(base, model_dtype, quant)
    targets = lora_targets(model, params["lora_target"])
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params["gradient_checkpointing"])
    elif params["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(r=params["lora_rank"], lora_alpha=params["lora_alpha"] or 2 * params["lora_rank"],
                      lora_dropout=params["lora_dropout"], target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %d trainable of %d parameters (%.2f%%); base %s, compute %s",
             params["lora_rank"], ",".join(targets), trainable, total, 100 * trainable / total,
             f"{quant['bits']}-bit {quant['type'] if quant['bits'] == 4 else ''}".strip() if quant else "unquantised",
             str(dtype).replace("torch.", ""))
    return model, quant, targets


def distributed_arguments(params: dict, cuda: bool) -> dict:
    """The Trainer's multi-process options: none for a single process."""
    if world_size(params) == 1:
        return {}
    find_unused = params["ddp_find_unused_parameters"]
    return {
        "ddp_backend": params["ddp_backend"] or ("nccl" if cuda else "gloo"),
        "ddp_timeout": params["ddp_timeout"],
        # LoRA: frozen base weights are not "unused"; searching for them costs a graph walk per step
        "ddp_find_unused_parameters": False if find_unused is None else find_unused,
        "deepspeed": params["deepspeed"],
        "fsdp": params["fsdp"] or "",
    }


def training_arguments(params: dict, out_dir: Path, dtype):
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    warmup = params["warmup_ratio"] if params["warmup_ratio"] > 0 else params["warmup_steps"]
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=params["per_device_train_batch_size"],
        gradient_accumulation_steps=params["gradient_accumulation_steps"],
        learning_rate=params["learning_rate"],
        num_train_epochs=params["num_train_epochs"],
        max_steps=params["max_steps"],
        lr_scheduler_type=params["lr_scheduler_type"],
        warmup_steps=warmup,  # transformers 5 reads a float below 1 as a ratio
        weight_decay=params["weight_decay"],
        max_grad_norm=params["max_grad_norm"],
        logging_steps=params["logging_steps"],
        logging_first_step=True,
        save_strategy="steps",
        save_steps=params["save_steps"],
        save_total_limit=2,
        seed=params["seed"],
        data_seed=params["seed"],
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        eval_strategy="no",
        per_device_eval_batch_size=params["per_device_train_batch_size"],
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        **distributed_arguments(params, cuda),
    )


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if train:
        ax.plot(*zip(*train), marker=".", label="training loss")
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if evals:
        ax.plot(*zip(*evals), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sort_target_modules(adapter_dir: Path) -> None:
    """PEFT writes target_modules from a set (hash-randomised order): make the file reproducible."""
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


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
    return cmd + ["-m", "tuneline.train", str(job_file)]


def launch_distributed(inputs, outputs, params, log, threads, launch):
    """Run this job in nproc_per_node processes through torchrun and wait for them."""
    from .errors import TunelineError

    ckpt = checkpoint_dir(params, inputs["tokenized"])
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


def main(inputs, outputs, params, log, threads=1, launch=None):
    ckpt = checkpoint_dir(params, inputs["tokenized"])
    if ckpt.exists():
        log.info("removing stale checkpoints in %s (resume is not implemented yet: starting fresh)", ckpt)
        shutil.rmtree(ckpt)
    if world_size(params) > 1 and "LOCAL_RANK" not in os.environ:
        return launch_distributed(inputs, outputs, params, log, threads, launch or {})
    return train(inputs, outputs, params, log, threads)


def train(inputs, outputs, params, log, threads=1):
    import datasets
    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, set_seed

    set_threads(threads)
    set_seed(params["seed"])
    dtype = compute_dtype(params["bf16"], params["fp16"], log)
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds = datasets.load_from_disk(str(Path(inputs["tokenized"]) / "train"))
    eval_dir = Path(inputs["tokenized"]) / "validation"
    eval_ds = datasets.load_from_disk(str(eval_dir)) if eval_dir.is_dir() else []
    model, quant, targets = build_model(inputs["model"], params, dtype, log)

    ckpt = checkpoint_dir(params, inputs["tokenized"])
    args = training_arguments(params, ckpt, dtype)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    metrics = dict(result.metrics)
    if len(eval_ds):
        metrics.update(trainer.evaluate(eval_dataset=eval_ds))
        log.info("validation loss %.4f", metrics["eval_loss"])
    if not trainer.is_world_process_zero():
        return {}  # rank 0 writes the outputs

    out = Path(outputs["adapter"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    sort_target_modules(out)
    shutil.copy(Path(inputs["tokenized"]) / "template.json", out / "template.json")
    history = trainer.state.log_history
    (out / "loss_history.json").write_text(json.dumps(history, indent=2) + "\n")
    plot_loss(history, out / "loss.png", f"LoRA r={params['lora_rank']}, lr={params['learning_rate']}")
    real_tokens = sum(len(x) for x in train_ds["input_ids"]) * (trainer.state.epoch or 1)
    report = {
        "quantization": quant,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "processes": world_size(params),
        "lora_target_modules": targets,
        "global_steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_seconds": round(seconds, 2),
        "real_tokens_per_second": round(real_tokens / seconds, 1),
        "metrics": metrics,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("trained %d steps in %.0f s (%.0f real tokens/s); final loss %.4f",
             trainer.state.global_step, seconds, report["real_tokens_per_second"], metrics.get("train_loss", float("nan")))
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"train_report": report}


def worker(job_file: str) -> None:
    """One torchrun process: rank 0 logs to the rule's log file, every rank to stderr."""
    from .rule import setup_logging

    job = json.loads(Path(job_file).read_text())
    rank = int(os.environ.get("RANK", "0"))
    # rank 0 appends to the rule's log after the launcher's lines; every rank logs to stderr
    log = setup_logging(job["log"] if rank == 0 else None, f"train.rank{rank}", mode="a")
    train(job["inputs"], job["outputs"], job["params"], log, job["threads"])


if __name__ == "__main__":
    worker(sys.argv[1])
