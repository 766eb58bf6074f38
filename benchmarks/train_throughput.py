"""Training throughput: Tuneline's `train` (its defaults) against a plain HF Trainer + PEFT baseline.

Both train the same model on the same tokenized data with the same hyper-parameters, seed and
sample order (QLoRA nf4 as Tuneline's default, LoRA r=8 on every linear layer, batch 8,
cutoff_len 256); the baseline pads each batch to its longest example, as the Trainer's usual
collator does. Each run is a subprocess of its own (clean peak memory). Prints a table: real
(non-padding) tokens per second, peak RSS, final loss, and the speed-up.

    python benchmarks/train_throughput.py [--model results/base_model] [--steps 12]
        [--datasets identity,alpaca_en_demo] [--quantization-bit 4|none]

The model is a Hugging Face folder (default results/base_model: run `snakemake --cores 2
results/base_model` first for SmolLM2-135M). identity comes from resources/, alpaca_en_demo from
LLaMA-Factory's demo data in ../shared/lf-data.

On a GPU (no hub there either) `--random-init 1b` trains a randomly initialised llama of Llama 3.2
1B's shape with --model's tokenizer instead; both runs then compute in bf16 (QLoRA nf4 with bf16
compute) and the table adds peak GPU memory and MFU (6 x parameters x tokens/s over the GPU's
dense bf16 peak, --peak-tflops, default 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIRS = {"identity": REPO / "resources", "alpaca_en_demo": REPO.parent / "shared" / "lf-data"}
LOG = logging.getLogger("bench")


RANDOM_SHAPES = {  # Llama 3.2 1B's shape (the vocabulary comes from the tokenizer); tiny: a CPU check
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def random_llama(tokenizer_dir: str, shape: str, out: Path) -> str:
    """A randomly initialised llama with `tokenizer_dir`'s tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **RANDOM_SHAPES[shape])
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def count_parameters(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def common_params(args) -> dict:
    return {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": 1e-3,
            "lora_rank": 8, "lora_target": "all", "logging_steps": 1, "seed": 42, "warmup_ratio": 0.0,
            "quantization_bit": None if args.quantization_bit == "none" else int(args.quantization_bit)}


def tokenize_dataset(name: str, model: str, root: Path, cutoff_len: int) -> Path:
    from tuneline import prepare_data, tokenize
    from tuneline.config import rule_params
    from tuneline.registry import selected_entries

    params = rule_params({"dataset": name, "dataset_dir": str(DATA_DIRS[name]), "val_size": 0.0}, "prepare_data")
    params["entries"] = selected_entries(params["dataset_dir"], name)
    prepare_data.main({}, {"data": str(root / "data")}, params, LOG)
    tokenize.main({"data": str(root / "data"), "model": model}, {"tokenized": str(root / "tok")},
                  rule_params({"cutoff_len": cutoff_len}, "tokenize"), LOG)
    return root / "tok"


def run_baseline(model_dir: str, tokenized: Path, params: dict, out: Path) -> dict:
    """The Trainer and PEFT as their documentation shows them: padded batches, no packing."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments, set_seed)

    torch.set_num_threads(os.cpu_count() or 1)
    set_seed(params["seed"])
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32  # what Tuneline picks on each device
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {}
    if params["quantization_bit"]:
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True,
                                                            bnb_4bit_compute_dtype=dtype),
                  "device_map": {"": 0 if cuda else "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    if params["quantization_bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=params["lora_rank"], lora_alpha=2 * params["lora_rank"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    train_ds = datasets.load_from_disk(str(tokenized / "train"))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=params["per_device_train_batch_size"],
                             learning_rate=params["learning_rate"], max_steps=params["max_steps"],
                             lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", seed=params["seed"],
                             data_seed=params["seed"], use_cpu=not cuda, bf16=cuda, report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    real_tokens = sum(len(x) for x in train_ds["input_ids"]) * trainer.state.epoch
    return {"seconds": seconds, "real_tokens": real_tokens, "train_loss": result.metrics["train_loss"]}


def run_tuneline(model_dir: str, tokenized: Path, params: dict, out: Path) -> dict:
    """Tuneline's train stage with its defaults and the shared hyper-parameters."""
    import datasets

    from tuneline import train
    from tuneline.config import rule_params

    os.chdir(out)  # checkpoints go to ./.tuneline
    train.main({"tokenized": str(tokenized), "model": model_dir}, {"adapter": str(out / "adapter")},
               rule_params({**params, "lr_scheduler_type": "cosine"}, "train"), LOG, threads=os.cpu_count() or 1)
    report = json.loads((out / "adapter" / "train_report.json").read_text())
    train_ds = datasets.load_from_disk(str(tokenized / "train"))
    real_tokens = sum(len(x) for x in train_ds["input_ids"]) * report["epochs"]
    return {"seconds": report["train_seconds"], "real_tokens": real_tokens,
            "train_loss": report["metrics"]["train_loss"]}


def worker(variant: str, model_dir: str, tokenized: str, params_json: str) -> None:
    params = json.loads(params_json)
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_baseline if variant == "baseline" else run_tuneline
        result = fn(model_dir, Path(tokenized), params, Path(tmp))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def measure(variant: str, model_dir: str, tokenized: Path, params: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, model_dir, str(tokenized), json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    result["tokens_per_second"] = result["real_tokens"] / result["seconds"]
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="results/base_model")
    parser.add_argument("--datasets", default="identity,alpaca_en_demo")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--quantization-bit", default="4", choices=["4", "8", "none"])
    parser.add_argument("--random-init", choices=sorted(RANDOM_SHAPES),
                        help="train a randomly initialised llama of this shape with --model's tokenizer")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    args = parser.parse_args()
    model_dir = str(Path(args.model).resolve())
    if not (Path(model_dir) / "config.json").is_file():
        sys.exit(f"{args.model} is not a Hugging Face model folder (run `snakemake --cores 2 results/base_model`).")
    params = common_params(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_init:
            model_dir = random_llama(model_dir, args.random_init, Path(tmp) / f"random-{args.random_init}")
        n_params = count_parameters(model_dir)
        for name in args.datasets.split(","):
            tokenized = tokenize_dataset(name, model_dir, Path(tmp) / name, args.cutoff_len)
            base = measure("baseline", model_dir, tokenized, params)
            ours = measure("tuneline", model_dir, tokenized, params)
            rows.append((name, base, ours))
    print(f"\n{args.steps} steps x batch {args.batch}, cutoff_len {args.cutoff_len}, "
          f"quantization_bit {args.quantization_bit}, {os.cpu_count()} CPU threads, model {args.model}\n")
    gpu = "peak_gpu_mb" in rows[0][1]
    print(f"{n_params / 1e6:.0f}M parameters{' (random init, ' + args.random_init + ')' if args.random_init else ''}\n")
    extra = " peak GPU MB | MFU |" if gpu else ""
    print(f"| dataset | run | real tokens/s | peak RSS MB |{extra} train loss | speed-up |")
    print("|---|---|---|---|" + ("---|---|" if gpu else "") + "---|---|")
    for name, base, ours in rows:
        for label, r in (("HF Trainer + PEFT (padded)", base), ("Tuneline train (defaults)", ours)):
            speed = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x"
            cells = ""
            if gpu:  # model FLOPs utilisation, the 6N-per-token convention
                mfu = 6 * n_params * r["tokens_per_second"] / (args.peak_tflops * 1e12)
                cells = f" {r['peak_gpu_mb']:.0f} | {100 * mfu:.1f}% |"
            print(f"| {name} | {label} | {r['tokens_per_second']:.0f} | {r['peak_rss_mb']:.0f} |{cells} "
                  f"{r['train_loss']:.4f} | {speed} |")


if __name__ == "__main__":
    main()
