"""Trust: the merge reproduces the trained model on any CPU, every check that says "this output is
right" can fail its rule (and then leaves no output), and the install is the locked one."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from conftest import REPO
from tuneline import merge, train
from tuneline.config import rule_params
from tuneline.modeling import compute_dtype, load_causal_lm, packed_4bit_weights
from tuneline.rule import run_stage, staging_path
from conftest import train_params

LOG = logging.getLogger("test")
NF4 = {"bits": 4, "type": "nf4", "double": True}


@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    """bitsandbytes as it behaves on a CPU with AVX-512 bf16: every 4-bit layer built from now on
    rewrites its weights into the packed CPU layout at its first eval-mode forward pass."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory, tiny_model, tokenized):
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    train.main({"tokenized": str(tokenized), "model": str(tiny_model)}, {"adapter": str(out)},
               train_params(quantization_bit=4, max_steps=8), LOG)
    return out


def run_merge(tmp_path, tiny_model, adapter, **keys):
    final = tmp_path / "merged"
    run_stage("merge", merge.main, {"adapter": str(adapter), "model": str(tiny_model)}, {"model": final},
              {"model": staging_path(final)}, rule_params(keys, "merge"), LOG, str(tmp_path / "logs" / "merge.log"))
    return final


def test_4bit_layers_keep_the_standard_layout_after_a_forward_pass(tiny_model, avx512_bf16_cpu):
    model = load_causal_lm(tiny_model, torch.float32, NF4).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert packed_4bit_weights(model) == []
    reference = load_causal_lm(tiny_model, torch.float32, NF4).dequantize()
    after = model.dequantize()
    for name, param in reference.named_parameters():
        assert torch.equal(param, dict(after.named_parameters())[name]), name


def test_merge_after_a_forward_pass_reproduces_the_trained_model_on_an_avx512_bf16_cpu(
        tmp_path, tiny_model, qlora_adapter, avx512_bf16_cpu):
    # merge runs the 4-bit trained model on the check prompts before it dequantizes: before the
    # fix, bitsandbytes repacked the weights there and the merged model was garbage (issue 13)
    final = run_merge(tmp_path, tiny_model, qlora_adapter)
    report = json.loads((final / "merge_report.json").read_text())
    saved = report["trained_vs_saved"]
    assert report["merge_base"] == "dequantized"
    assert saved["max_abs_logit_diff"] < 1e-3 and saved["top1_agreement"] == 1.0
    assert all(g["passed"] for g in report["gates"]) and len(report["gates"]) == 3


def test_a_corrupted_dequantization_fails_the_merge_and_leaves_no_output(tmp_path, tiny_model, qlora_adapter,
                                                                         monkeypatch):
    from transformers import PreTrainedModel

    dequantize = PreTrainedModel.dequantize

    def corrupted(self, *args, **kwargs):
        model = dequantize(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
        return model

    monkeypatch.setattr(PreTrainedModel, "dequantize", corrupted)
    with pytest.raises(SystemExit):
        run_merge(tmp_path, tiny_model, qlora_adapter)
    assert not (tmp_path / "merged").exists() and not staging_path(tmp_path / "merged").exists()
    kept = json.loads((tmp_path / "logs" / "merge.failed" / "merge_report.json").read_text())
    failed = {g["figure"] for g in kept["gates"] if not g["passed"]}
    assert "trained_vs_saved.max_abs_logit_diff" in failed
    assert kept["merge_error"]["max_abs_logit_diff"] < 1e-3  # the old, only gate would have passed


@pytest.mark.parametrize("key,value,figure", [
    ("merge_tolerance", 1e-12, "merge_error.max_abs_logit_diff"),
    ("merge_min_top1", 1.01, "trained_vs_saved.top1_agreement"),
])
def test_each_merge_gate_fails_the_rule(tmp_path, tiny_model, qlora_adapter, key, value, figure):
    # values no real merge can meet (top-1 above 1 is beyond the schema; the gate itself is tested)
    with pytest.raises(SystemExit):
        run_merge(tmp_path, tiny_model, qlora_adapter, **{key: value})
    assert not (tmp_path / "merged").exists()
    kept = json.loads((tmp_path / "logs" / "merge.failed" / "merge_report.json").read_text())
    assert figure in {g["figure"] for g in kept["gates"] if not g["passed"]}


def test_merge_original_gate(tmp_path, tiny_model, qlora_adapter):
    with pytest.raises(SystemExit):
        run_merge(tmp_path, tiny_model, qlora_adapter, merge_base="original", merge_original_min_top1=1.01)
    final = run_merge(tmp_path, tiny_model, qlora_adapter, merge_base="original", merge_original_min_top1=0.0)
    gates = json.loads((final / "merge_report.json").read_text())["gates"]
    assert [g["figure"] for g in gates] == ["merge_error.max_abs_logit_diff", "trained_vs_saved.top1_agreement"]


@pytest.mark.parametrize("capability,dtype", [("AVX2", torch.float32), ("AVX512", torch.float32),
                                              ("AVX512_BF16", torch.bfloat16), ("AMX", torch.bfloat16)])
def test_cpu_compute_dtype_follows_the_cpu(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_dtype(False, False) == dtype
    assert compute_dtype(True, False) == dtype  # bf16 asked for: only where the CPU has it


def test_the_venv_holds_exactly_the_locked_versions():
    from tuneline import lock

    pins, have = lock.read(REPO / "requirements.lock"), lock.environment()
    assert {"torch", "transformers", "bitsandbytes", "peft", "trl", "snakemake"} <= set(pins)
    differ = {n: (pins.get(n), have.get(n)) for n in set(pins) | set(have) if pins.get(n) != have.get(n)}
    assert not differ, f"name: (locked, installed) — run `make install`, or `make lock` to move the lock: {differ}"


def test_no_rule_module_imports_another_rule_module():
    # shared logic lives in shared modules (records, generation, verify, modeling): a rule module
    # reaching into another rule's module is how export_gptq came to read a key it did not have
    import ast
    import re

    rules = set(re.findall(r"^\s*rule (\w+):", "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk")),
                           flags=re.M))
    offenders = []
    for path in (REPO / "tuneline").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in rules:
                if path.stem in rules or path.stem in ("chat",):
                    offenders.append(f"{path.stem} imports {node.module}")
    assert not offenders, offenders


def test_a_diverging_training_run_fails_and_leaves_no_adapter(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    final = tmp_path / "adapter"
    params = train_params(quantization_bit=None, max_steps=4, learning_rate=1e30, max_grad_norm=0.0)
    with pytest.raises(SystemExit):
        run_stage("train", train.main, {"tokenized": str(tokenized), "model": str(tiny_model)}, {"adapter": final},
                  {"adapter": staging_path(final)}, params, LOG, str(tmp_path / "logs" / "train.log"))
    assert not final.exists() and not staging_path(final).exists()
    kept = json.loads((tmp_path / "logs" / "train.failed" / "train_report.json").read_text())
    assert math.isnan(kept["metrics"]["train_loss"])  # recorded as it is (the Trainer's NaN filter is off)
