"""LLaMA-Factory drop-in (issue #16): an adapter trained elsewhere is merged, evaluated, exported and
chatted with, as LLaMA-Factory's merge_lora and inference YAMLs do."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import make_workdir, planned_jobs, snakemake
from tuneline.errors import TunelineError


def peft_adapter(model_dir, out, seed=1):
    """A LoRA adapter saved by PEFT itself, with non-zero B (as a trained one): what a user brings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


def other_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tokenizer

    tok = build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def lf_merge_yaml(work, tiny_model, adapter, **extra):
    # LLaMA-Factory's examples/merge_lora/qwen3_lora_sft.yaml, model and template swapped for local ones
    cfg = yaml.safe_load((work / "tuneline.yaml").read_text())
    cfg.update({"model_name_or_path": str(tiny_model), "adapter_name_or_path": str(adapter), "template": "chatml",
                "trust_remote_code": True, "export_size": 5, "export_device": "cpu", "export_legacy_format": False,
                **extra})
    (work / "tuneline.yaml").write_text(yaml.safe_dump(cfg))


def test_a_peft_adapter_is_merged_evaluated_and_chatted_with_without_training(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = peft_adapter(tiny_model, tmp_path / "their-adapter")
    work = make_workdir(tmp_path / "w", tiny_model)
    lf_merge_yaml(work, tiny_model, adapter)
    assert planned_jobs(work, "results/merged_model") == {"base_model", "import_adapter", "merge"}
    snakemake(work, "results/merged_model", check=True)
    report = json.loads((work / "results" / "adapter" / "train_report.json").read_text())
    assert report["imported_from"] == str(adapter) and report["max_abs_logit_change"] > 1e-3
    gates = json.loads((work / "results" / "merged_model" / "merge_report.json").read_text())["gates"]
    assert gates and all(g["passed"] for g in gates)
    ids = torch.tensor([[5, 9, 12, 7]])
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(work / "results" / "merged_model").eval()(ids).logits
    assert torch.allclose(expected, merged, atol=1e-4)
    chat = subprocess.run([sys.executable, "-m", "tuneline.cli", "chat", str(work / "results" / "merged_model"),
                           "--prompt", "Who are you?", "--max-new-tokens", "4"], capture_output=True, text=True,
                          timeout=300, cwd=work)
    assert chat.returncode == 0 and "Assistant:" in chat.stdout, chat.stderr[-2000:]
    evaluation = planned_jobs(work, "evaluate")  # base vs the imported adapter, nothing trained
    assert {"predict", "mmlu", "eval_summary"} <= evaluation and not {"train", "import_adapter"} & evaluation


def test_an_adapter_of_another_model_is_refused_naming_the_tensor(tmp_path, tiny_model):
    adapter = peft_adapter(other_model(tmp_path), tmp_path / "wrong-adapter")
    work = make_workdir(tmp_path / "w", tiny_model)
    lf_merge_yaml(work, tiny_model, adapter)
    proc = snakemake(work, "results/merged_model")
    assert proc.returncode != 0 and "does not fit this base model" in proc.output and "size mismatch" in proc.output
    assert not (work / "results" / "adapter").exists()


@pytest.mark.parametrize("setup, expect", [
    (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "has no adapter_model.safetensors"),
    (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json there"),
])
def test_an_adapter_folder_that_is_not_a_safe_peft_adapter_is_refused(tmp_path, tiny_model, setup, expect):
    adapter = peft_adapter(tiny_model, tmp_path / "a")
    setup(adapter)
    work = make_workdir(tmp_path / "w", tiny_model)
    lf_merge_yaml(work, tiny_model, adapter)
    proc = snakemake(work, "results/merged_model")
    assert proc.returncode != 0 and expect in proc.output, proc.output[-3000:]
    assert not (work / "results" / "adapter").exists()


# LLaMA-Factory's own example YAMLs (examples/merge_lora, examples/inference), keys as they are; only
# model_name_or_path and adapter_name_or_path are swapped for local ones.
LF_MERGE_QWEN3 = {"model_name_or_path": None, "adapter_name_or_path": None, "template": "qwen3_nothink",
                  "trust_remote_code": True, "export_size": 5, "export_device": "cpu", "export_legacy_format": False}
LF_INFERENCE_LLAMA3 = {"model_name_or_path": None, "adapter_name_or_path": None, "template": "llama3",
                       "finetuning_type": "lora", "trust_remote_code": True, "infer_backend": "huggingface"}


@pytest.mark.parametrize("example", [LF_MERGE_QWEN3, LF_INFERENCE_LLAMA3])
def test_llamafactory_merge_and_inference_yamls_plan_as_they_are(tmp_path, tiny_model, example):
    adapter = peft_adapter(tiny_model, tmp_path / "saves")
    work = make_workdir(tmp_path / "w", tiny_model)
    data = yaml.safe_load((work / "tuneline.yaml").read_text())["dataset_dir"]
    cfg = dict(example, model_name_or_path=str(tiny_model), adapter_name_or_path=str(adapter), dataset_dir=data)
    (work / "tuneline.yaml").write_text(yaml.safe_dump(cfg))
    assert planned_jobs(work, "results/merged_model") == {"base_model", "import_adapter", "merge"}
    proc = snakemake(work, "--dry-run", "results/merged_model")
    key = "export_device" if "export_device" in example else "infer_backend"
    assert f"LLaMA-Factory's key `{key}` is accepted" in proc.output, proc.output[-2000:]


def test_a_multimodal_llamafactory_yaml_is_refused_as_not_supported_yet(tmp_path, tiny_model):
    adapter = peft_adapter(tiny_model, tmp_path / "saves")
    work = make_workdir(tmp_path / "w", tiny_model)
    # examples/merge_lora/qwen3vl_lora_sft.yaml
    cfg = dict(LF_MERGE_QWEN3, model_name_or_path=str(tiny_model), adapter_name_or_path=str(adapter),
               template="qwen3_vl_nothink")
    (work / "tuneline.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--dry-run", "results/merged_model")
    assert proc.returncode != 0 and "multimodal models are not supported by Tuneline yet" in proc.output


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_llamafactory_train_yamls_run_on_the_tiny_model(tmp_path, tiny_model, stage):
    """examples/train_lora/qwen3_lora_sft.yaml and qwen3_lora_dpo.yaml with the model and dataset_dir swapped
    (dpo also max_samples 16 and cutoff_len 256: its pairs are long for the tiny model's one-character tokens)."""
    from conftest import LF_DATA
    from test_config import LF_SFT

    work = make_workdir(tmp_path, tiny_model)
    cfg = dict(LF_SFT, model_name_or_path=str(tiny_model), dataset_dir=str(LF_DATA), template="qwen3_nothink")
    if stage == "dpo":
        cfg.update(stage="dpo", dataset="dpo_en_demo", pref_beta=0.1, pref_loss="sigmoid", learning_rate=5.0e-6,
                   max_samples=16, cutoff_len=256)
    (work / "tuneline.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(work, "results/merged_model", check=True)
    report = json.loads((work / "results" / "adapter" / "train_report.json").read_text())
    assert report["stage"] == stage and report["global_steps"] > 0
    gates = json.loads((work / "results" / "merged_model" / "merge_report.json").read_text())["gates"]
    assert all(g["passed"] for g in gates)


def test_two_output_dir_runs_live_side_by_side_run_at_once_and_share_common_steps(tmp_path, tiny_model):
    """LLaMA-Factory's output_dir: each run in its own folder (Snakemake's workdir), started from the same
    project folder at the same time; with --cache the second config takes base model, data and tokenization
    from the between-workflow cache instead of recomputing them."""
    import os

    from conftest import REPO, SNAKEMAKE

    work = make_workdir(tmp_path, tiny_model)
    base = yaml.safe_load((work / "tuneline.yaml").read_text())
    base["dataset_dir"] = "data"  # relative to the folder snakemake starts in, as users write it
    for name, lr in (("a", 1e-3), ("b", 2e-3)):
        (work / f"{name}.yaml").write_text(yaml.safe_dump(dict(base, output_dir=f"saves/{name}", learning_rate=lr)))
    env = {**os.environ, "SNAKEMAKE_OUTPUT_CACHE": str(tmp_path / "cache")}
    (tmp_path / "cache").mkdir()

    def run(name, *extra):
        # --configfile takes several values: it goes before the other options and targets
        return [SNAKEMAKE, "--configfile", str(work / f"{name}.yaml"), "--snakefile", str(REPO / "Snakefile"),
                "--cores", "1", *extra]

    procs = [subprocess.Popen(run(n, "results/merged_model"), cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in ("a", "b")]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    for name in ("a", "b"):
        folder = work / "saves" / name
        assert (folder / "results" / "merged_model" / "model.safetensors").is_file()
        assert (folder / "logs" / "train.log").is_file() and (folder / ".snakemake").is_dir()
    assert not (work / "results").exists()  # nothing of either run in the project folder itself
    a = json.loads((work / "saves/a/results/adapter/train_report.json").read_text())
    assert a["metrics"]["train_loss"] != json.loads((work / "saves/b/results/adapter/train_report.json").read_text())[
        "metrics"]["train_loss"]

    # common steps: a third config that differs in a training key only, with the between-workflow cache
    (work / "c.yaml").write_text(yaml.safe_dump(dict(base, output_dir="saves/c", learning_rate=3e-3)))
    first = subprocess.run(run("a", "results/tokenized", "--forceall", "--cache"), cwd=work, env=env,  # fills the cache
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    plan = subprocess.run(run("c", "-n", "results/merged_model", "--cache"), cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    out = plan.stdout + plan.stderr
    assert plan.returncode == 0 and out.count("will be obtained from global between-workflow cache") >= 3, out[-3000:]


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_scaling_stretches_the_base_models_positions_to_cutoff_len_as_llamafactory_does(tmp_path, tiny_model,
                                                                                            kind, caplog):
    """Factor ceil(cutoff_len / max_position_embeddings), written into results/base_model's config, so that
    every later rule loads the scaled positions; nothing is scaled when cutoff_len fits already."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneline import base_model
    from tuneline.config import rule_params

    log = logging.getLogger("t")
    before = AutoConfig.from_pretrained(tiny_model)
    assert before.max_position_embeddings == 512
    out = tmp_path / "base"
    params = {**rule_params({"model_name_or_path": str(tiny_model), "rope_scaling": kind, "cutoff_len": 1100},
                            "base_model")}
    assert params["cutoff_len"] == 1100  # read by base_model only because rope_scaling is set
    base_model.main({}, {"model": str(out)}, params, log)
    config = AutoConfig.from_pretrained(out)
    assert config.max_position_embeddings == 3 * 512  # >= cutoff_len 1100
    assert config.rope_parameters["rope_type"] == kind and config.rope_parameters["factor"] == 3.0
    assert json.loads((out / "source.json").read_text())["rope_scaling"]["max_position_embeddings_before"] == 512
    scaled = AutoModelForCausalLM.from_pretrained(out).model.rotary_emb
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).model.rotary_emb
    if kind == "linear":  # position p of the scaled model is position p/3 of the original
        assert torch.allclose(scaled.inv_freq, plain.inv_freq / 3)
    elif kind != "dynamic":  # dynamic rescales only beyond the original length, at run time
        assert not torch.allclose(scaled.inv_freq, plain.inv_freq)

    with caplog.at_level(logging.WARNING):
        fits = {**params, "cutoff_len": 256}
        base_model.main({}, {"model": str(tmp_path / "fits")}, fits, log)
    assert AutoConfig.from_pretrained(tmp_path / "fits").rope_parameters["rope_type"] == "default"
    assert "fits the model's 512 positions, so nothing is scaled" in caplog.text


def test_cutoff_len_reruns_base_model_only_when_rope_scaling_is_set(tmp_path, tiny_model):
    from tuneline.config import rule_params

    assert "cutoff_len" not in rule_params({"model_name_or_path": "m"}, "base_model")
    assert "cutoff_len" in rule_params({"model_name_or_path": "m", "rope_scaling": "yarn"}, "base_model")
    work = make_workdir(tmp_path, tiny_model)
    snakemake(work, "results/base_model", check=True)
    cfg = yaml.safe_load((work / "tuneline.yaml").read_text())
    (work / "tuneline.yaml").write_text(yaml.safe_dump({**cfg, "cutoff_len": 64}))
    assert "base_model" not in planned_jobs(work, "results/base_model", "--rerun-triggers", "params")
    (work / "tuneline.yaml").write_text(yaml.safe_dump({**cfg, "cutoff_len": 1024, "rope_scaling": "linear"}))
    assert "base_model" in planned_jobs(work, "results/base_model", "--rerun-triggers", "params")


def test_flash_attn_disabled_trains_with_eager_attention_on_padded_batches_and_fa2_needs_cuda(tmp_path, tiny_model,
                                                                                            caplog):
    import logging

    from conftest import make_tokenized, train_params
    from tuneline import modeling, train

    if not torch.cuda.is_available():
        with pytest.raises(TunelineError, match="fa2 needs a CUDA GPU"):
            modeling.attention_implementation("fa2")
    tokenized = make_tokenized(tmp_path / "tok", tiny_model)
    with caplog.at_level(logging.INFO):
        train.main({"tokenized": str(tokenized), "model": str(tiny_model)}, {"adapter": str(tmp_path / "eager")},
                   train_params(quantization_bit=None, max_steps=3, flash_attn="disabled"), logging.getLogger("t"))
    assert "attention implementation eager" in caplog.text
    assert "the model's eager attention on padded batches" in caplog.text
    report = json.loads((tmp_path / "eager" / "train_report.json").read_text())
    assert report["global_steps"] == 3 and report["metrics"]["train_loss"] > 0


def test_resume_from_checkpoint_continues_a_trainer_checkpoint_to_the_same_weights(tmp_path, tiny_model, monkeypatch):
    """LLaMA-Factory's resume_from_checkpoint: a checkpoint-N folder of an earlier run; the resumed run ends
    where the uninterrupted one ends."""
    import logging

    from safetensors.torch import load_file

    from conftest import make_tokenized, train_params
    from tuneline import train
    from tuneline.config import check_files

    log = logging.getLogger("t")
    tokenized = make_tokenized(tmp_path / "tok", tiny_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.shutil, "rmtree", lambda *a, **k: None)  # keep the first run's checkpoints
    run = lambda out, **extra: train.main(  # noqa: E731
        {"tokenized": str(tokenized), "model": str(tiny_model)}, {"adapter": str(tmp_path / out)},
        train_params(quantization_bit=None, max_steps=6, save_steps=3, **extra), log)
    run("straight")
    [checkpoint] = (tmp_path / ".tuneline" / "checkpoints").glob("train-*/checkpoint-3")
    run("resumed", resume_from_checkpoint=str(checkpoint))
    report = json.loads((tmp_path / "resumed" / "train_report.json").read_text())
    assert report["resumed_from"] == "checkpoint-3" and report["global_steps"] == 6
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TunelineError, match="resume_from_checkpoint.*no trainer_state.json there"):
        check_files({"resume_from_checkpoint": str(tmp_path / "straight")})
