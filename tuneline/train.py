"""Rule `train`: the tuned model (a LoRA adapter, QLoRA by default, or freeze/full weights) for the
configured `stage`, with the Hugging Face Trainer or the stage's TRL trainer.

Writes into the adapter folder: the PEFT adapter or model (safetensors), template.json (from
tokenize, so inference renders prompts the same way), loss_history.json, loss.png and
train_report.json. This module orchestrates; the parts live in modules of their own:

    stages/<stage>.py   the stage's arguments, trainer and token count
    finetuning.py       the model to train: quantized base, LoRA, freeze/full, LoRA+
    batching.py         packed or padded batches for causal-LM stages
    checkpoints.py      hash-keyed checkpoints and resume after a kill
    launch.py           torchrun: several processes, DDP/deepspeed/fsdp options
    history.py          the loss curve and the whole run's mean loss
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from . import stages, tracking
from .checkpoints import checkpoint_dir, resumable_checkpoint, train_key
from .config import check_checkpoint
from .errors import TunelineError
from .finetuning import build_model, loraplus_optimizer, sort_target_modules
from .history import LIVE, live_loss_callback, plot_loss, whole_run_loss
from .launch import distributed_arguments, launch_distributed, world_size
from .modeling import compute_dtype, set_threads, use_packed_attention
from .stages import TrainRun


def training_arguments(params: dict, out_dir: Path, dtype):
    """The Trainer's arguments from the config, in the class the stage's trainer takes (e.g. TRL's
    DPOConfig) with the stage's own keys."""
    import torch

    cuda = torch.cuda.is_available()
    warmup = params["warmup_ratio"] if params["warmup_ratio"] > 0 else params["warmup_steps"]
    args_class, extra = stages.get(params["stage"]).training_arguments(params)
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
        logging_nan_inf_filter=False,  # the Trainer's default hides NaN/inf losses; the gate below needs them
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
        run_name=out_dir.name,  # the checkpoint key (train-<hash>): the tracker's run name
        disable_tqdm=False,
        dataloader_num_workers=params["dataloader_num_workers"],
        **distributed_arguments(params, cuda),
        **extra,
    )


def main(inputs, outputs, params, log, threads=1, launch=None):
    if world_size(params) > 1 and "LOCAL_RANK" not in os.environ:
        return launch_distributed(inputs, outputs, params, log, threads, launch or {})
    return train(inputs, outputs, params, log, threads)


def train(inputs, outputs, params, log, threads=1):
    import datasets
    import torch
    from transformers import AutoTokenizer, set_seed

    set_threads(threads)
    set_seed(params["seed"])
    unused = [k for k in ("deepspeed", "fsdp") if params[k] and world_size(params) == 1]
    if unused:
        log.warning("%s: not used in a single-process run (nproc_per_node x nnodes = 1); train_report.json "
                    "records what was used under `distributed`", " and ".join(unused))
    dtype = compute_dtype(params["bf16"], params["fp16"], log)
    # a trainer's dataset.map (KTO's KL pairs) would otherwise cache its result next to the arrow files
    # of results/tokenized: an upstream artifact changed by this rule, and a resume key that no longer matches
    datasets.disable_caching()
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds = datasets.load_from_disk(str(Path(inputs["tokenized"]) / "train"))
    eval_dir = Path(inputs["tokenized"]) / "validation"
    eval_ds = datasets.load_from_disk(str(eval_dir)) if eval_dir.is_dir() else []
    if params["eval_strategy"] != "no" and not len(eval_ds):
        raise TunelineError(f"eval_strategy {params['eval_strategy']} needs a validation split: set val_size "
                            "(e.g. 0.1) so that prepare_data holds examples out, or name eval_dataset.")
    stage = stages.get(params["stage"])
    model, quant, targets = build_model(inputs["model"], params, dtype, log)
    # no KV cache in training: with one, the models ignore packed position ids and attend across examples
    model.config.use_cache = False
    packed = params["packing"] and stage.PACKING and params["flash_attn"] != "disabled"
    if params["packing"] and not stage.PACKING:
        log.info("stage %s: packing does not apply", params["stage"])
    elif params["packing"] and not packed:
        log.info("flash_attn disabled: the model's eager attention on padded batches (packing needs per-example "
                 "attention: sdpa or fa2)")
    if packed and params["flash_attn"] != "fa2":  # attention within each packed example only (fa2 does that itself)
        use_packed_attention(model)

    key = train_key(params, inputs["tokenized"])  # hashes the tokenized data once
    ckpt = checkpoint_dir(key)
    resume = resumable_checkpoint(ckpt, key, log)
    if resume:
        log.info("resuming the interrupted run from %s", resume)
    elif isinstance(params.get("resume_from_checkpoint"), str):  # a checkpoint-N of another Trainer run (LLaMA-Factory's)
        check_checkpoint(params["resume_from_checkpoint"])
        resume = str(Path(params["resume_from_checkpoint"]).expanduser())
        log.info("resuming from the given checkpoint %s (resume_from_checkpoint)", resume)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "train_key.json").write_text(json.dumps(key, indent=2, sort_keys=True))
    tracking.configure(params["report_to"], ckpt, log)
    args = training_arguments(params, ckpt, dtype)
    optimizers = (None, None)
    if params["loraplus_lr_ratio"]:
        if params["finetuning_type"] != "lora":
            raise TunelineError("loraplus_lr_ratio applies to finetuning_type lora only.")
        optimizers = (loraplus_optimizer(model, args, params), None)
    # the trainer always gets the validation split, also when it is evaluated only after training: TRL's
    # ORPO/CPO trainers tokenize an eval_dataset in __init__ and fail on one handed to evaluate() later
    trainer = stage.trainer(TrainRun(model, args, params, tokenizer, train_ds, eval_ds if len(eval_ds) else None,
                                     optimizers, inputs["model"], log, packed))
    if quant and dtype == torch.float32:  # TRL's trainers cast a quantized model's trainable weights to bf16
        # (the QLoRA paper's choice, for GPUs): in an fp32 run (CPU) that is a dtype mismatch (rm's value head
        # fails on it) and slow bf16 emulation on CPUs without bf16 units. Keep them in fp32.
        recast = [p for p in model.parameters() if p.requires_grad and p.dtype != dtype]
        for param in recast:
            param.data = param.data.to(dtype)
        if recast:
            log.info("trainable weights kept in %s (%d tensors)", str(dtype).replace("torch.", ""), len(recast))
    trainer.add_callback(live_loss_callback(ckpt / LIVE))  # the curve while it trains (tuneline board)
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
        metrics.update(trainer.evaluate())
        log.info("validation loss %.4f", metrics["eval_loss"])
    tracking.finish(params["report_to"])
    if not trainer.is_world_process_zero():
        return {}  # rank 0 writes the outputs

    out = Path(outputs["adapter"])
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True  # for inference with what is saved
    if packed and params["flash_attn"] != "fa2":
        use_packed_attention(model, on=False)
    for name in getattr(stage, "adapters_to_drop", ()):  # e.g. DPOTrainer's frozen reference adapter
        if name in getattr(model, "peft_config", {}):
            model.delete_adapter(name)
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
    real_tokens = stage.real_tokens(train_ds) * (trainer.state.epoch or 1)
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
    figures = [h[k] for h in history for k in ("loss", "grad_norm", "eval_loss") if isinstance(h.get(k), (int, float))]
    figures += [metrics.get("train_loss", 0.0), metrics.get("eval_loss", 0.0)]
    if not all(math.isfinite(x) for x in figures):  # gate: a NaN/inf loss or gradient trained nothing usable
        raise TunelineError("training loss or gradient norm became NaN or infinite (loss_history.json, "
                            "train_report.json): lower "
                            "learning_rate, or compute in fp32 (bf16: false, fp16: false).")
    log.info("trained %d steps in %.0f s (%.0f real tokens/s); final loss %.4f",
             trainer.state.global_step, seconds, report["real_tokens_per_second"], metrics.get("train_loss", float("nan")))
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"train_report": report}
