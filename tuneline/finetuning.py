"""The model a training run starts from: the base (quantized for QLoRA), with LoRA adapters, or
with the layers that freeze/full tuning trains (LLaMA-Factory's finetuning_type)."""

from __future__ import annotations

import json
from pathlib import Path

from . import stages
from .errors import TunelineError
from .modeling import attention_implementation, load_causal_lm, lora_targets


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
    reward = stages.get(params["stage"]).MODEL == "reward"  # stage rm: a value head on the decoder
    attention = attention_implementation(params["flash_attn"])
    model = load_causal_lm(base, model_dtype, quant, reward=reward, attention=attention)
    if attention:
        log.info("flash_attn %s: attention implementation %s", params["flash_attn"], attention)
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
                      lora_dropout=params["lora_dropout"], target_modules=targets,
                      task_type="SEQ_CLS" if reward else "CAUSAL_LM",  # SEQ_CLS: PEFT trains and saves `score` in full
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


def sort_target_modules(adapter_dir: Path) -> None:
    """PEFT writes target_modules (and modules_to_save) from sets, in hash-randomised order: sort them."""
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
