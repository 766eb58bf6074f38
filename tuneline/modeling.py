"""Shared model helpers: device and compute dtype, bitsandbytes config, linear-module discovery."""

from __future__ import annotations

import logging
import warnings

from .errors import TunelineError

# bitsandbytes looks for an optional CPU kernel package (`kernels`) when it is imported on a CPU with
# AVX-512 bf16, and warns when it is missing. Tuneline never uses that kernel (see
# standard_4bit_layout), so the warning is noise: keep it out of every rule's log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# PEFT and TRL read transformers 5's deprecated `is_gradient_checkpointing` property on every model they
# wrap; the FutureWarning is addressed to them, not to a Tuneline user.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# TRL's DPOConfig still declares the field by its transformers 4 name (gradient_checkpointing)
warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)


def device_supports_bf16() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # CPUs without native bf16 units (AVX2) emulate it: ~45x slower than fp32 here.
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def compute_dtype(bf16: bool, fp16: bool, log=None):
    """bf16/fp16 only where the device has them; neither asked for: the best the device has."""
    import torch

    cuda = torch.cuda.is_available()
    if bf16 and not device_supports_bf16():
        if log:
            log.warning("bf16 asked for, but this device has no bf16 units: computing in fp32")
        return torch.float32
    if fp16 and not cuda:
        if log:
            log.warning("fp16 asked for, but there is no CUDA device: computing in fp32")
        return torch.float32
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    if cuda:
        return torch.bfloat16 if device_supports_bf16() else torch.float16
    return torch.bfloat16 if device_supports_bf16() else torch.float32


def bnb_config(bits: int | None, quant_type: str, double_quant: bool, dtype, skip: list[str] | None = None):
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=dtype, llm_int8_skip_modules=skip)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise TunelineError(f"quantization_bit must be 4, 8 or null, not {bits}.")


def is_reward_model(path) -> bool:
    """A folder holding a reward model (stage rm): a LoRA adapter of task SEQ_CLS, or a model whose
    architecture is *ForSequenceClassification (a scalar value head, `score`, on the decoder)."""
    import json
    from pathlib import Path

    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    if (folder / "config.json").is_file():
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        return any(a.endswith("ForSequenceClassification") for a in architectures)
    return False


def require_causal_lm(path, use: str) -> None:
    """Generation (predict, mmlu, chat) and the quantized exports, which verify a model by its next-token
    logits and greedy answers, need a causal LM: a reward model (stage rm) has only the value head's score."""
    if is_reward_model(path):
        raise TunelineError(f"{path} is a reward model (stage rm): it scores a conversation and does not generate "
                            f"one, which {use} needs. Its evaluation is rule reward_accuracy; export_format: merged "
                            "keeps its value head (`score`) in safetensors.")


ATTENTION = {"auto": None, "sdpa": "sdpa", "disabled": "eager", "fa2": "flash_attention_2"}


def attention_implementation(flash_attn: str) -> str | None:
    """LLaMA-Factory's flash_attn value as transformers' attn_implementation (None: the model's default, SDPA);
    fa2 needs the flash-attn package and a CUDA GPU, checked here rather than deep in from_pretrained."""
    import importlib.util

    import torch

    if flash_attn == "fa2":
        missing = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                         ("the flash-attn package", importlib.util.find_spec("flash_attn") is not None))
                   if not ok]
        if missing:
            raise TunelineError(f"flash_attn: fa2 needs {' and '.join(missing)} (none here); use flash_attn: sdpa "
                                "(PyTorch's attention, the default) or auto.")
    return ATTENTION[flash_attn]


def load_causal_lm(path, dtype, quantization: dict | None = None, reward: bool | None = None,
                   attention: str | None = None):
    """The base model in `dtype`, quantised on load when `quantization` (bits/type/double) is given.

    reward: load it with a scalar value head (AutoModelForSequenceClassification, num_labels 1; a
    causal LM's folder gets a new head, initialised from the current seed). None: as the folder says
    (`is_reward_model`). attention: transformers' attn_implementation (None: the model's default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    require_safetensors(path)
    reward = is_reward_model(path) if reward is None else reward
    q = quantization or {}
    kwargs = {"num_labels": 1} if reward else {}
    if attention:
        kwargs["attn_implementation"] = attention
    bnb = bnb_config(q.get("bits"), q.get("type", "nf4"), q.get("double", True), dtype,
                     skip=["score"] if reward else None)  # the value head stays in full precision
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    model_class = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = model_class.from_pretrained(path, dtype=dtype, use_safetensors=True, **kwargs)
    if reward and bnb is not None:  # the skipped value head is created in the checkpoint's dtype (bf16)
        model.score.to(dtype)
    return standard_4bit_layout(model)


def require_safetensors(path) -> None:
    """A local model folder must hold safetensors weights: pickle files (.bin, .pt) can run code on load."""
    from pathlib import Path

    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no model weights"
        raise TunelineError(f"{folder} holds {what}: Tuneline loads safetensors only (a pickle file can run code "
                            "when loaded). Convert it once with transformers (`model.save_pretrained(dir, "
                            "safe_serialization=True)` in a trusted environment), then point to the new folder.")


def standard_4bit_layout(model):
    """Keep bitsandbytes' 4-bit weights in their standard layout on every CPU.

    On a CPU with AVX-512 bf16, bitsandbytes (0.48+) rewrites each 4-bit weight into a packed
    layout at its first eval-mode forward pass and computes in bf16 from then on. `dequantize()`
    does not undo that layout: a QLoRA merge into the dequantized base after a check forward pass
    saved a garbage model (issue 13), and saving re-quantizes the statistics lossily. Turning the
    repacking off makes 4-bit layers compute the same way on every CPU (dequantize, matmul in the
    compute dtype): slower inference on such CPUs, the same numbers everywhere.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def packed_4bit_weights(model) -> list[str]:
    """Names of 4-bit layers whose weights bitsandbytes rewrote into its CPU-only packed layout."""
    return [name for name, module in model.named_modules()
            if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


def set_threads(threads: int) -> None:
    """Torch threads for a job: what Snakemake gave it, never more than the machine has, nor more than
    OMP_NUM_THREADS when that is set (a machine shared with other jobs: the test suite's parallel workers)."""
    import os

    import torch

    limit = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    torch.set_num_threads(max(1, min(threads, limit)))


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_for_inference(path, use: str = "generation"):
    """A saved causal LM folder in fp32, in eval mode (predict, mmlu, chat, the exports' references)."""
    import torch

    require_causal_lm(path, use)
    return load_causal_lm(path, torch.float32).eval()


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can adapt (LLaMA-Factory's `all`: no lm_head)."""
    import torch

    names = set()
    output_layer = model.get_output_embeddings()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__
        if is_linear and module is not output_layer and "lm_head" not in full_name:
            names.add(full_name.split(".")[-1])
    return sorted(names)


def lora_targets(model, lora_target: str) -> list[str]:
    available = linear_module_names(model)
    wanted = [t.strip() for t in lora_target.split(",") if t.strip()]
    if wanted == ["all"]:
        return available
    missing = [t for t in wanted if t not in available]
    if missing or not wanted:
        raise TunelineError(
            f"lora_target '{lora_target}': {', '.join(missing) or 'nothing'} matches no linear module of this "
            f"model. Its linear modules are: {', '.join(available)} (or use `all`)."
        )
    return sorted(wanted)


PACKED_ATTENTION = "tuneline_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """Attention for a packed row (DataCollatorWithFlattening with return_flash_attn_kwargs): causal
    SDPA on each example's own slice, so the cost is the sum of Lᵢ² rather than (ΣLᵢ)² for a
    block-diagonal mask over the whole row (measured on SmolLM2, alpaca batch of 8: a third of the
    step). The CPU has no varlen flash-attention kernel; this is its exact equivalent."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        if query.shape[0] != 1 or attention_mask is not None:
            raise TunelineError(f"{PACKED_ATTENTION} takes packed rows only (no padding, no attention mask).")
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
               for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outputs, dim=1), None


def base_of(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_packed_attention(model, on: bool = True) -> None:
    """Switch a (PEFT-wrapped) model to packed_sdpa for training, and back to the implementation
    it was loaded with for what is saved."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    base = base_of(model)
    if on:
        base.tuneline_loaded_attention = base.config._attn_implementation
        base.set_attn_implementation(PACKED_ATTENTION)
    else:
        base.set_attn_implementation(getattr(base, "tuneline_loaded_attention", "sdpa"))
