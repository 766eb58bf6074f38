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
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import TunelineError
from .modeling import base_of, compute_dtype, load_causal_lm, lora_targets, set_threads, use_packed_attention
from .provenance import sha256_path

CHECKPOINT_ROOT = Path(".tuneline") / "checkpoints"


def train_key(params: dict, tokenized: str) -> dict:
    """What a checkpoint belongs to: the train config slice and the tokenized data's digest."""
    return {"params": params, "tokenized": sha256_path(tokenized)}


def checkpoint_dir(key: dict) -> Path:
    digest = hashlib.sha256((json.dumps(key["params"], sort_keys=True) + key["tokenized"]).encode()).hexdigest()
    return CHECKPOINT_ROOT / f"train-{digest[:16]}"


def _names(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def decoder_layers(model):
    """(parameter-name prefix, count) of the model's stack of transformer layers."""
    import torch

    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, count
    raise TunelineError("finetuning_type freeze: cannot find this model's list of transformer layers.")


def apply_freeze(model, params: dict) -> list[str]:
    """LLaMA-Factory's freeze tuning: train the last (+n) or first (-n) layers, optionally only some
    submodules in them, plus extra modules outside the layers. Returns the trained parameter names."""
    prefix, count = decoder_layers(model)
    n = params["freeze_trainable_layers"]
    if n == 0 or abs(n) > count:
        raise TunelineError(f"freeze_trainable_layers: {n} - this model has {count} layers; use 1..{count} "
                            f"(the last n) or -1..-{count} (the first n).")
    layer_ids = set(range(count - n, count)) if n > 0 else set(range(-n))
    modules, extras = _names(params["freeze_trainable_modules"]), _names(params["freeze_extra_modules"])
    trained, seen_in_layers, seen_outside = [], set(), set()
    for name, param in model.named_parameters():
        parts = name.split(".")
        in_layers = name.startswith(prefix + ".")
        if in_layers:
            layer = int(name[len(prefix) + 1:].split(".")[0])
            seen_in_layers.update(parts[len(prefix.split(".")) + 1:-1])
            train = layer in layer_ids and (modules == ["all"] or any(m in parts for m in modules))
        else:
            seen_outside.update(parts[:-1])
            train = any(e in parts for e in extras)
        param.requires_grad_(train)
        if train:
            trained.append(name)
    for wanted, seen, key in ((modules, seen_in_layers, "freeze_trainable_modules"),
                              (extras, seen_outside, "freeze_extra_modules")):
        missing = [m for m in wanted if m != "all" and m not in seen]
        if missing:
            raise TunelineError(f"{key}: {', '.join(missing)} names no module of this model; available: "
                                f"{', '.join(sorted(seen - {''}))}.")
    return trained


def build_model(base: str, params: dict, dtype, log):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    method = params["finetuning_type"]
    quant = None
    if params["quantization_bit"]:
        if method != "lora":
            raise TunelineError(f"finetuning_type {method} trains the base weights themselves, which a "
                                f"{params['quantization_bit']}-bit base cannot do: set quantization_bit: null, "
                                "or use finetuning_type: lora (QLoRA).")
        quant = {"bits": params["quantization_bit"]}
        if params["quantization_bit"] == 4:  # type and double quantization are 4-bit options only
            quant.update(type=params["quantization_type"], double=params["double_quantization"])
    model_dtype = dtype if torch.cuda.is_available() or dtype == torch.float32 else torch.float32
    model = load_causal_lm(base, model_dtype, quant)
    if method != "lora":
        if method == "freeze":
            trained = apply_freeze(model, params)
        else:
            trained = [n for n, p in model.named_parameters() if p.requires_grad_(True) is not None]
        if params["gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info("%s tuning: %d trainable of %d parameters (%.2f%%) in %d tensors; compute %s", method, trainable,
                 total, 100 * trainable / total, len(trained), str(dtype).replace("torch.", ""))
        return model, quant, trained

    targets = lora_targets(model, params["lora_target"])
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params["gradient_checkpointing"])
    elif params["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(r=params["lora_rank"], lora_alpha=params["lora_alpha"] or 2 * params["lora_rank"],
                      lora_dropout=params["lora_dropout"], target_modules=targets, task_type="CAUSAL_LM",
                      use_dora=params["use_dora"], use_rslora=params["use_rslora"],
                      modules_to_save=_names(params["additional_target"]) or None,
                      # a tied embedding trained in full must stay tied to the output layer
                      ensure_weight_tying=bool(params["additional_target"]) and bool(
                          getattr(model.config, "tie_word_embeddings", False)))
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    variant = "".join([" DoRA" if params["use_dora"] else "", " rsLoRA" if params["use_rslora"] else "",
                       f" + full {params['additional_target']}" if params["additional_target"] else ""])
    log.info("LoRA%s r=%d on %s: %d trainable of %d parameters (%.2f%%); base %s, compute %s", variant,
             params["lora_rank"], ",".join(targets), trainable, total, 100 * trainable / total,
             f"{quant['bits']}-bit {quant['type'] if quant['bits'] == 4 else ''}".strip() if quant else "unquantised",
             str(dtype).replace("torch.", ""))
    return model, quant, targets


def loraplus_optimizer(model, args, params: dict):
    """LoRA+ (PEFT's create_loraplus_optimizer) with the optimizer class that `optim` names."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model, optimizer_cls, lr=params["learning_rate"],
                                     loraplus_lr_ratio=params["loraplus_lr_ratio"],
                                     loraplus_lr_embedding=params["loraplus_lr_embedding"],
                                     weight_decay=params["weight_decay"], **kwargs)


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


def training_arguments(params: dict, out_dir: Path, dtype):
    """TrainingArguments from the config; for stage dpo TRL's DPOConfig (its subclass) with the
    pref_* keys. Our tokenize rule already cut every pair to cutoff_len: no max_length here."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    warmup = params["warmup_ratio"] if params["warmup_ratio"] > 0 else params["warmup_steps"]
    args_class, extra = TrainingArguments, {}
    if params["stage"] == "dpo":
        from trl import DPOConfig

        losses = [params["pref_loss"]] + (["sft"] if params["pref_ftx"] else [])
        args_class = DPOConfig
        extra = dict(beta=params["pref_beta"], loss_type=losses, max_length=None,
                     loss_weights=[1.0, params["pref_ftx"]] if params["pref_ftx"] else None,
                     # TRL's own default is True: ours (off, ~25% faster on CPU) holds for every stage
                     gradient_checkpointing=params["gradient_checkpointing"])
    return args_class(
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
        eval_strategy=params["eval_strategy"],
        eval_steps=params["eval_steps"] or params["logging_steps"],
        per_device_eval_batch_size=params["per_device_train_batch_size"],
        optim=params["optim"],
        report_to=[] if params["report_to"] == "none" else [params["report_to"]],
        disable_tqdm=False,
        dataloader_num_workers=0,
        **distributed_arguments(params, cuda),
        **extra,
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
    """PEFT writes target_modules (and modules_to_save) from sets, in hash-randomised order: sort them."""
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
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


def main(inputs, outputs, params, log, threads=1, launch=None):
    if world_size(params) > 1 and "LOCAL_RANK" not in os.environ:
        return launch_distributed(inputs, outputs, params, log, threads, launch or {})
    return train(inputs, outputs, params, log, threads)


class LabelledLogitsOnly:
    """Wraps a collator so that the output layer and the loss run only at positions that predict a
    label: transformers' `logits_to_keep` (a tensor of positions) and `shift_labels` (their targets).
    In SFT the prompt tokens predict nothing, and on a small model the vocabulary-sized output layer
    and its softmax are a large part of each step (SmolLM2: 49152 x 576). The loss is the same sum
    over the same targets, divided by the same count (`labels` stays in the batch for the Trainer)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        shifted = batch["labels"][:, 1:]  # position t predicts token t + 1
        keep = (shifted != -100).any(0).nonzero().squeeze(1)
        if len(keep):
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = shifted[:, keep].contiguous()
        return batch


def make_collator(tokenizer, packing: bool, model=None):
    """Packing: the batch as one row, position ids restarting per example, the example boundaries
    for modeling.packed_sdpa, and the first label of each example masked, so no example predicts
    from another. Otherwise: padded to the longest example of the batch. Either way logits only
    where a label is, when the model's forward takes `logits_to_keep`."""
    import inspect

    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100,
                                              return_flash_attn_kwargs=True)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    if model is not None and "logits_to_keep" in inspect.signature(base_of(model).forward).parameters:
        return LabelledLogitsOnly(collator)
    return collator


def preference_trainer(model, args, params, tokenizer, train_ds, eval_ds, optimizers, base: str, log):
    """TRL's DPOTrainer on the pairs our tokenize rule wrote (prompt_ids/chosen_ids/rejected_ids,
    rendered with the pipeline's template). The reference model is the base: for LoRA the adapter
    switched off (TRL adds a frozen copy of the fresh adapter, removed before saving), for
    freeze/full a second, frozen copy of the base weights."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
            if missing:
                raise TunelineError(f"the {dataset_name} split has no {', '.join(sorted(missing))}: it was not "
                                    "tokenized for stage dpo. Rerun tokenize (snakemake -R tokenize).")
            return dataset

    ref_model = None
    if params["finetuning_type"] != "lora":
        ref_model = load_causal_lm(base, model.dtype, None).eval()
        ref_model.requires_grad_(False)
    if params["packing"]:
        log.info("stage dpo: packing does not apply (TRL's DPOTrainer pads each batch of pairs)")
    log.info("DPO: loss %s, beta %s%s; reference: %s", params["pref_loss"], params["pref_beta"],
             f", + {params['pref_ftx']} x SFT loss" if params["pref_ftx"] else "",
             "the base model (through a frozen copy of the untrained adapter)" if ref_model is None
             else "a frozen copy of the base model")
    return PretokenizedDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds,
                                  eval_dataset=eval_ds, processing_class=tokenizer, optimizers=optimizers)


def resumable_checkpoint(ckpt: Path, key: dict, log) -> str | None:
    """The newest complete checkpoint of an interrupted run of exactly this config and data, if any.
    The folder name is a hash of both; train_key.json inside is checked too, never trusted blindly.
    The Trainer writes trainer_state.json last: a checkpoint without it was cut off mid-save."""
    if not ckpt.is_dir():
        return None
    stored = ckpt / "train_key.json"
    if not stored.is_file() or json.loads(stored.read_text()) != key:
        log.warning("%s holds checkpoints of another config or data: removing them, starting fresh", ckpt)
        shutil.rmtree(ckpt, ignore_errors=True)
        return None
    by_step = sorted(ckpt.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for candidate in by_step:
        try:
            json.loads((candidate / "trainer_state.json").read_text())
            return str(candidate)
        except (OSError, ValueError):
            log.warning("%s was cut off while being saved: skipping it", candidate)
    return None


def train(inputs, outputs, params, log, threads=1):
    import datasets
    import torch
    from transformers import AutoTokenizer, Trainer, set_seed

    set_threads(threads)
    set_seed(params["seed"])
    unused = [k for k in ("deepspeed", "fsdp") if params[k] and world_size(params) == 1]
    if unused:
        log.warning("%s: not used in a single-process run (nproc_per_node x nnodes = 1); train_report.json "
                    "records what was used under `distributed`", " and ".join(unused))
    dtype = compute_dtype(params["bf16"], params["fp16"], log)
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds = datasets.load_from_disk(str(Path(inputs["tokenized"]) / "train"))
    eval_dir = Path(inputs["tokenized"]) / "validation"
    eval_ds = datasets.load_from_disk(str(eval_dir)) if eval_dir.is_dir() else []
    if params["eval_strategy"] != "no" and not len(eval_ds):
        raise TunelineError(f"eval_strategy {params['eval_strategy']} needs a validation split: set val_size "
                            "(e.g. 0.1) so that prepare_data holds examples out, or name eval_dataset.")
    model, quant, targets = build_model(inputs["model"], params, dtype, log)
    # no KV cache in training: with one, the models ignore packed position ids and attend across examples
    model.config.use_cache = False
    packed = params["packing"] and params["stage"] != "dpo"
    if packed:  # attention within each packed example only, at each example's own cost
        use_packed_attention(model)

    key = train_key(params, inputs["tokenized"])  # hashes the tokenized data once
    ckpt = checkpoint_dir(key)
    resume = resumable_checkpoint(ckpt, key, log)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "train_key.json").write_text(json.dumps(key, indent=2, sort_keys=True))
    if resume:
        log.info("resuming the interrupted run from %s", resume)
    if params["report_to"] == "tensorboard":  # events beside the checkpoints; copied to the output at the end
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(ckpt / "runs")
    args = training_arguments(params, ckpt, dtype)
    optimizers = (None, None)
    if params["loraplus_lr_ratio"]:
        if params["finetuning_type"] != "lora":
            raise TunelineError("loraplus_lr_ratio applies to finetuning_type lora only.")
        optimizers = (loraplus_optimizer(model, args, params), None)
    eval_during = eval_ds if params["eval_strategy"] != "no" else None
    if params["stage"] == "dpo":
        trainer = preference_trainer(model, args, params, tokenizer, train_ds, eval_during, optimizers,
                                     inputs["model"], log)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                          data_collator=make_collator(tokenizer, params["packing"], model),
                          eval_dataset=eval_during, optimizers=optimizers)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    metrics = dict(result.metrics)
    if resume:  # the Trainer's train_loss covers only the steps of this process: recompute it over the whole run
        metrics["train_loss"] = whole_run_loss(trainer.state.log_history, metrics.get("train_loss"))
        log.info("resumed run: train_loss %.4f is the mean over all %d steps (loss_history.json)",
                 metrics["train_loss"], trainer.state.global_step)
    last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last_eval and last_eval["step"] == trainer.state.global_step:  # evaluated at the last step already
        metrics.update({k: v for k, v in last_eval.items() if k.startswith("eval_")})
        log.info("validation loss %.4f", metrics["eval_loss"])
    elif len(eval_ds):
        from transformers.integrations import TensorBoardCallback

        trainer.remove_callback(TensorBoardCallback)  # it closed its file at the end of training
        metrics.update(trainer.evaluate(eval_dataset=eval_ds))
        log.info("validation loss %.4f", metrics["eval_loss"])
    if not trainer.is_world_process_zero():
        return {}  # rank 0 writes the outputs

    out = Path(outputs["adapter"])
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True  # for inference with what is saved
    if packed:
        use_packed_attention(model, on=False)
    if "ref" in getattr(model, "peft_config", {}):  # DPOTrainer's frozen reference copy of the adapter
        model.delete_adapter("ref")
    model.save_pretrained(out)
    if params["finetuning_type"] == "lora":
        sort_target_modules(out)
    shutil.copy(Path(inputs["tokenized"]) / "template.json", out / "template.json")
    if (ckpt / "runs").is_dir():
        shutil.copytree(ckpt / "runs", out / "runs")
    history = trainer.state.log_history
    (out / "loss_history.json").write_text(json.dumps(history, indent=2) + "\n")
    title = (f"LoRA r={params['lora_rank']}" if params["finetuning_type"] == "lora" else params["finetuning_type"])
    plot_loss(history, out / "loss.png", f"{title}, lr={params['learning_rate']}")
    real_tokens = sum(map(len, train_ds["input_ids"])) if "input_ids" in train_ds.column_names else sum(
        len(row["prompt_ids"]) * 2 + len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in train_ds)
    real_tokens *= trainer.state.epoch or 1
    report = {
        "stage": params["stage"],
        "finetuning_type": params["finetuning_type"],
        "quantization": quant,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "processes": world_size(params),
        "distributed": {k: v for k, v in distributed_arguments(params, torch.cuda.is_available()).items()
                        if k in ("deepspeed", "fsdp") and v},
        "resumed_from": Path(resume).name if resume else None,
        "lora_target_modules" if params["finetuning_type"] == "lora" else "trained_parameters": targets,
        "global_steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_seconds": round(seconds, 2),
        "real_tokens_per_second": round(real_tokens / seconds, 1),
        "metrics": metrics,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    losses = [h["loss"] for h in history if "loss" in h] + [metrics.get("train_loss", 0.0), metrics.get("eval_loss", 0.0)]
    if not all(math.isfinite(x) for x in losses):  # gate: a NaN/inf loss trained nothing usable
        raise TunelineError("training loss became NaN or infinite (loss_history.json, train_report.json): lower "
                            "learning_rate, or compute in fp32 (bf16: false, fp16: false).")
    log.info("trained %d steps in %.0f s (%.0f real tokens/s); final loss %.4f",
             trainer.state.global_step, seconds, report["real_tokens_per_second"], metrics.get("train_loss", float("nan")))
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"train_report": report}


def whole_run_loss(history: list[dict], fallback):
    """Mean training loss over every step of a run, from the logged window means (each weighted by
    the steps it covers); the checkpoint restores the log history of the steps before a resume."""
    total = steps = previous = 0
    for entry in history:
        if "loss" in entry:
            width = entry["step"] - previous
            total, steps, previous = total + entry["loss"] * width, steps + width, entry["step"]
    return total / steps if steps else fallback


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
