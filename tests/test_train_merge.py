"""train and merge on the tiny model, called as library functions (no Snakemake)."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_params
from tuneline import merge, train
from tuneline.config import rule_params
from tuneline.errors import TunelineError

LOG = logging.getLogger("test")


@pytest.mark.parametrize("bits", [None, 4])
def test_lora_training_lowers_the_loss_and_merges_exactly(tmp_path, tiny_model, tokenized, bits, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints go to ./.tuneline
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    train.main({"tokenized": str(tokenized), "model": str(tiny_model)}, {"adapter": str(adapter)},
               train_params(quantization_bit=bits), LOG)
    history = json.loads((adapter / "loss_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert (adapter / "loss.png").stat().st_size > 1000
    report = json.loads((adapter / "train_report.json").read_text())
    assert report["quantization"] == ({"bits": 4, "type": "nf4", "double": True} if bits else None)
    assert report["compute_dtype"] == "float32"  # this CPU has no bf16 units
    # only LoRA weights are saved, on every linear layer but lm_head, in a reproducible order
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(cfg["target_modules"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not any((tmp_path / ".tuneline" / "checkpoints").iterdir())  # cleaned after success

    merge.main({"adapter": str(adapter), "model": str(tiny_model)}, {"model": str(merged)},
               rule_params({}, "merge"), LOG)
    result = json.loads((merged / "merge_report.json").read_text())
    assert result["merge_error"]["max_abs_logit_diff"] < 1e-4
    if bits:
        assert result["quantization_error"]["max_abs_logit_diff"] > result["merge_error"]["max_abs_logit_diff"]
    else:
        assert "quantization_error" not in result
    # a standard HF folder that differs from the base
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert (merged / "model.safetensors").is_file() and (merged / "template.json").is_file()


def test_merge_fails_above_tolerance(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "adapter"
    train.main({"tokenized": str(tokenized), "model": str(tiny_model)}, {"adapter": str(adapter)},
               train_params(max_steps=2, quantization_bit=None), LOG)
    with pytest.raises(TunelineError, match="merge check failed"):
        merge.main({"adapter": str(adapter), "model": str(tiny_model)}, {"model": str(tmp_path / "m")},
                   rule_params({"merge_tolerance": 1e-12}, "merge"), LOG)


def test_chat_answers_with_the_training_template(tmp_path, tiny_model, tokenized, monkeypatch, capsys):
    from tuneline.cli import main as cli

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "m")
    shutil.copy(tokenized / "template.json", tmp_path / "m" / "template.json")
    assert cli(["chat", str(tmp_path / "m"), "--prompt", "Who are you?", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "You: Who are you?" in out and "Assistant:" in out
    assert cli(["chat", str(tmp_path / "missing")]) == 1


def test_chat_raises_a_generation_error_instead_of_waiting_for_pieces_forever(tmp_path, tiny_model, tokenized):
    import time

    from tuneline.chat import Chat
    from tuneline.generation import generation_kwargs

    # YAML's `temperature: 1` is an int: passed on as a float (transformers refuses an int temperature)
    assert generation_kwargs({"do_sample": True, "temperature": 1, "top_p": 1, "repetition_penalty": 1}) == {
        "do_sample": True, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}
    assert isinstance(generation_kwargs({"do_sample": True, "temperature": 1})["temperature"], float)
    shutil.copytree(tiny_model, tmp_path / "m")
    shutil.copy(tokenized / "template.json", tmp_path / "m" / "template.json")
    chat = Chat(str(tmp_path / "m"), generation={"max_new_tokens": 4, "do_sample": True, "temperature": 2})
    assert isinstance(chat.reply("hi"), str)
    chat.generation["temperature"] = 0.0  # generate raises in its thread: the caller gets the error, at once
    start = time.time()
    with pytest.raises(ValueError, match="temperature"):
        chat.reply("hi")
    assert time.time() - start < 60
