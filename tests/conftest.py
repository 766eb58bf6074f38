"""Shared fixtures: a tiny randomly initialised llama (built in seconds), and Snakemake helpers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LF_DATA = REPO.parent / "shared" / "lf-data"
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

# SmolLM2's chat template: the tiny model behaves like the default model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the bundled identity data (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.dumps(r, ensure_ascii=False) for r in json.loads((REPO / "resources" / "identity.json").read_text())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# `make test` runs the tests on two pytest-xdist workers (--dist loadscope --no-loadscope-reorder: without
# the flag xdist hands out the scopes with the most tests first), in collection order: the longest files go
# first, so that none of them starts last and runs alone at the end (measured: the SmolLM2 e2e file and SLURM,
# few tests each, otherwise started after 33 minutes).
LONGEST_FIRST = ("test_e2e.py", "test_slurm.py", "test_methods.py", "test_stages.py", "test_board.py",
                 "test_board_browser.py", "test_llamafactory.py", "test_export.py", "test_faults.py")


if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one torch thread per job, else four threads contend for two cores (measured:
    # the suite used 1.4 cores and took 50 min with two threads per job)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# files whose module-scoped fixtures (a whole pipeline run, a merged model) should be built once: each goes to
# one worker whole; every other test goes to whichever worker is free (with `--dist loadfile` the board and
# resume tests queued behind one another on one worker). xdist's own `loadgroup` cannot do it here: its group
# marks never reach the test ids under pytest 9.2 (measured: an xdist_group-marked file still ran on both
# workers), so `make test` asks for `--dist loadscope` and this hook says what a scope is.
ONE_WORKER = ("test_e2e.py", "test_stages.py", "test_export.py", "test_reruns.py", "test_faults.py", "test_trust.py",
              "test_evaluation.py", "test_slurm.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileOrTest(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return file if Path(file).name in ONE_WORKER else nodeid

    return FileOrTest(config, log)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# ---------------------------------------------------------------- Snakemake helpers

def tiny_config(model: Path, dataset_dir: Path, **overrides) -> dict:
    """A config that runs the whole DAG on the tiny model in well under a minute."""
    cfg = dict(model_name_or_path=str(model), dataset="identity", dataset_dir=str(dataset_dir), cutoff_len=128,
               max_steps=4, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3,
               quantization_bit=None, num_train_epochs=1.0, task_dir=str(dataset_dir / "eval"), max_new_tokens=8,
               n_shot=2)
    cfg.update(overrides)
    return cfg


def make_workdir(tmp: Path, model: Path, **overrides) -> Path:
    """A fresh working directory with its own copy of the demo data and a config file."""
    data = tmp / "data"
    shutil.copytree(REPO / "resources", data)
    (tmp / "tuneline.yaml").write_text(yaml.safe_dump(tiny_config(model, data, **overrides)))
    return tmp


def snakemake(workdir: Path, *args: str, check: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    # --configfile takes several values: keep it before the other options and targets
    cmd = [SNAKEMAKE, "--configfile", str(workdir / "tuneline.yaml"), "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", "2", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.output[-6000:]}")
    return proc


def planned_jobs(workdir: Path, *args: str) -> set[str]:
    """The rules a dry-run would run, read from its 'Job stats' table (the target rule `all` left out)."""
    proc = snakemake(workdir, "--dry-run", *args)
    if proc.returncode != 0:
        raise AssertionError(proc.output[-4000:])
    if "Nothing to be done" in proc.output:
        return set()
    table = proc.output.split("Job stats:", 1)[1]
    jobs = set()
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+\d+$", line.strip())
        if not m or m.group(1) == "total":
            break
        jobs.add(m.group(1))
    return jobs - {"all"}


# ---------------------------------------------------------------- stage-level helpers (no Snakemake)

def make_tokenized(root: Path, model: Path, cutoff_len: int = 128, **prepare) -> Path:
    """prepare_data + tokenize on 24 identity examples (root/data, root/tok), called as functions."""
    import logging

    from tuneline import prepare_data, tokenize
    from tuneline.config import rule_params
    from tuneline.registry import selected_entries

    log = logging.getLogger("test")
    params = rule_params({"dataset_dir": str(REPO / "resources"), "max_samples": 24, **prepare}, "prepare_data")
    params["entries"] = selected_entries(params["dataset_dir"], params["dataset"])
    prepare_data.main({}, {"data": str(root / "data")}, params, log)
    tokenize.main({"data": str(root / "data"), "model": str(model)}, {"tokenized": str(root / "tok")},
                  rule_params({"cutoff_len": cutoff_len, "stage": prepare.get("stage", "sft")}, "tokenize"), log)
    return root / "tok"


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tiny_model):
    return make_tokenized(tmp_path_factory.mktemp("stages"), tiny_model)


def train_params(**overrides):
    from tuneline.config import rule_params

    base = dict(max_steps=20, learning_rate=3e-2, per_device_train_batch_size=8, logging_steps=1, lora_rank=8)
    return rule_params({**base, **overrides}, "train")
