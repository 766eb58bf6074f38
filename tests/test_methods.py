"""Training methods and options (issue #4) on the tiny model, called as library functions:
freeze and full tuning, LoRA variants, optimizer pass-through, TensorBoard, validation during
training, QLoRA merge bases, byte-identical adapters."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_tokenized, train_params
from tuneline import batching, checkpoints, finetuning, merge, train
from tuneline.config import rule_params
from tuneline.errors import TunelineError
from tuneline.modeling import use_packed_attention

LOG = logging.getLogger("test")


def run_train(tmp_path, tiny_model, tokenized, name="out", **overrides):
    out = tmp_path / name
    train.main({"tokenized": str(tokenized), "model": str(tiny_model)}, {"adapter": str(out)},
               train_params(**{"quantization_bit": None, **overrides}), LOG)
    return out


def losses(out):
    return [h["loss"] for h in json.loads((out / "loss_history.json").read_text()) if "loss" in h]


def changed_tensors(tiny_model, out) -> set[str]:
    before, after = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_freeze_trains_only_the_chosen_layers_and_modules(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_train(tmp_path, tiny_model, tokenized, finetuning_type="freeze", freeze_trainable_layers=1,
                    freeze_trainable_modules="mlp", freeze_extra_modules="norm", max_steps=12)
    assert sum(losses(out)[-3:]) / 3 < losses(out)[0] - 0.3
    changed = changed_tensors(tiny_model, out)
    assert changed == {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                       "model.layers.1.mlp.down_proj.weight", "model.norm.weight"}
    assert not (out / "adapter_config.json").exists()
    # merge passes a full model through, loadable, with tokenizer and template
    merged = tmp_path / "merged"
    merge.main({"adapter": str(out), "model": str(tiny_model)}, {"model": str(merged)}, rule_params({}, "merge"), LOG)
    assert json.loads((merged / "merge_report.json").read_text())["merged"] is False
    assert changed_tensors(tiny_model, merged) == changed
    assert (merged / "tokenizer.json").is_file() and (merged / "template.json").is_file()


def test_freeze_first_layers_and_bad_names(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_train(tmp_path, tiny_model, tokenized, finetuning_type="freeze", freeze_trainable_layers=-1,
                    max_steps=2)
    assert {k.split(".")[2] for k in changed_tensors(tiny_model, out)} == {"0"}  # only layer 0, every module
    with pytest.raises(TunelineError, match="freeze_trainable_modules: mpl names no module.*mlp"):
        run_train(tmp_path, tiny_model, tokenized, "bad", finetuning_type="freeze", freeze_trainable_modules="mpl")
    with pytest.raises(TunelineError, match="freeze_trainable_layers: 5 - this model has 2 layers"):
        run_train(tmp_path, tiny_model, tokenized, "bad", finetuning_type="freeze", freeze_trainable_layers=5)


def test_full_tuning_changes_every_weight_and_refuses_a_quantized_base(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_train(tmp_path, tiny_model, tokenized, finetuning_type="full", max_steps=8, learning_rate=1e-3)
    assert losses(out)[-1] < losses(out)[0]
    assert changed_tensors(tiny_model, out) == set(load_file(tiny_model / "model.safetensors"))
    with pytest.raises(TunelineError, match="finetuning_type full .* set quantization_bit: null"):
        run_train(tmp_path, tiny_model, tokenized, "q", finetuning_type="full", quantization_bit=4)


def test_lora_variants_reach_the_adapter(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_train(tmp_path, tiny_model, tokenized, use_dora=True, use_rslora=True, additional_target="embed_tokens",
                    lora_target="q_proj,v_proj", max_steps=6)
    assert losses(out)[-1] < losses(out)[0]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"] and "embed_tokens" in cfg["modules_to_save"]
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights)  # DoRA's magnitudes
    embed = [k for k in weights if "embed_tokens" in k]
    assert embed and not torch.equal(weights[embed[0]], load_file(tiny_model / "model.safetensors")["model.embed_tokens.weight"])


def test_loraplus_gives_the_b_matrices_a_larger_learning_rate(tmp_path, tiny_model):
    from transformers import TrainingArguments

    params = train_params(quantization_bit=None, loraplus_lr_ratio=16.0, learning_rate=1e-3, optim="sgd")
    model, _, _ = finetuning.build_model(str(tiny_model), params, torch.float32, LOG)
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd", learning_rate=1e-3, use_cpu=True, report_to=[])
    optimizer = finetuning.loraplus_optimizer(model, args, params)
    assert isinstance(optimizer, torch.optim.SGD)  # the optimizer `optim` names
    lrs = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lrs[names[id(p)]] = group["lr"]
    assert {lr for n, lr in lrs.items() if "lora_A" in n} == {1e-3}
    assert {round(lr, 9) for n, lr in lrs.items() if "lora_B" in n} == {1.6e-2}


def test_optim_eval_during_training_and_tensorboard(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with_validation = make_tokenized(tmp_path, tiny_model, cutoff_len=64, val_size=0.25)
    out = run_train(tmp_path, tiny_model, with_validation, optim="adafactor", eval_strategy="steps", eval_steps=3,
                    report_to="tensorboard", max_steps=6)
    history = json.loads((out / "loss_history.json").read_text())
    assert sorted({h["step"] for h in history if "eval_loss" in h}) == [3, 6]  # and the final evaluation
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events and b"train/loss" in events[0].read_bytes() and b"eval/loss" in events[0].read_bytes()
    args = train.training_arguments(train_params(optim="adafactor"), tmp_path, torch.float32)
    assert args.optim == "adafactor"


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_report_to_mlflow_and_wandb_record_the_loss_offline(tmp_path, tiny_model, tokenized, monkeypatch, tracker):
    """mlflow: a local file store mlruns/ in the run's folder; wandb: an offline run under wandb/ (no network)."""
    pytest.importorskip(tracker)
    for var in ("DISABLE_MLFLOW_INTEGRATION", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT",
                "WANDB_SILENT"):
        monkeypatch.delenv(var, raising=False)  # restored (removed) after the test
    monkeypatch.chdir(tmp_path)
    out = run_train(tmp_path, tiny_model, tokenized, report_to=tracker, max_steps=4)
    steps = [h["loss"] for h in json.loads((out / "loss_history.json").read_text()) if "loss" in h]
    if tracker == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient((tmp_path / "mlruns").as_uri())
        [run] = client.search_runs([client.get_experiment_by_name("tuneline").experiment_id])
        assert run.info.run_name.startswith("train-")
        logged = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
        assert logged == pytest.approx(steps)
    else:
        import re

        [record] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # protobuf records, values as JSON text
        logged = {float(v) for v in re.findall(rb"train/loss\x82\x01.([-0-9.e]+)", record.read_bytes())}
        assert len(steps) == 4 and all(any(abs(v - x) < 1e-6 for v in logged) for x in steps)


def test_eval_strategy_without_a_validation_split_is_an_error(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelineError, match="eval_strategy steps needs a validation split: set val_size"):
        run_train(tmp_path, tiny_model, tokenized, eval_strategy="steps")


def test_qlora_merge_into_the_dequantized_base_reproduces_the_trained_model(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_train(tmp_path, tiny_model, tokenized, quantization_bit=4, max_steps=8)
    reports = {}
    for base in ("dequantized", "original"):
        merged = tmp_path / f"merged-{base}"
        merge.main({"adapter": str(out), "model": str(tiny_model)}, {"model": str(merged)},
                   # the random tiny model's nf4 drift is large: the original-base gate is tested in test_trust
                   rule_params({"merge_base": base, "merge_original_min_top1": 0.0}, "merge"), LOG)
        reports[base] = json.loads((merged / "merge_report.json").read_text())
        assert reports[base]["merge_base"] == base and reports[base]["merge_error"]["max_abs_logit_diff"] < 1e-4
    diffs = reports["dequantized"]["trained_vs_merged"]
    assert diffs == reports["original"]["trained_vs_merged"]  # both recorded either way
    assert diffs["dequantized"]["max_abs_logit_diff"] < 1e-3 and diffs["dequantized"]["top1_agreement"] == 1.0
    assert diffs["original"]["max_abs_logit_diff"] > 100 * diffs["dequantized"]["max_abs_logit_diff"]
    a = load_file(tmp_path / "merged-dequantized" / "model.safetensors")
    b = load_file(tmp_path / "merged-original" / "model.safetensors")
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])


def folder_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("train_report.json", "loss_history.json")}  # those two hold timings


def test_two_clean_runs_write_byte_identical_adapters(tmp_path, tiny_model, tokenized, monkeypatch):
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    # separate interpreters: PEFT's target_modules set order changes with the hash seed
    code = ("import logging, sys; from tuneline import train; from conftest import train_params; "
            "train.main({'tokenized': sys.argv[1], 'model': sys.argv[2]}, {'adapter': sys.argv[3]}, "
            "train_params(quantization_bit=None, max_steps=4), logging.getLogger('t'))")
    from conftest import REPO

    for i, seed in enumerate(("1", "2")):
        env = {"PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO / "tests"), "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", code, str(tokenized), str(tiny_model), str(tmp_path / f"run{i}")],
                       check=True, env=env, cwd=tmp_path, capture_output=True)
    first, second = folder_digest(tmp_path / "run0"), folder_digest(tmp_path / "run1")
    assert "adapter_model.safetensors" in first and "adapter_config.json" in first
    assert first == second


@pytest.mark.parametrize("stage,dataset,pref_loss", [
    ("sft", None, None), ("kto", "kto_en_demo", None), ("rm", "dpo_en_demo", None), ("grpo", "alpaca_en_demo", None),
    ("rloo", "alpaca_en_demo", None),
    ("dpo", "dpo_en_demo", "sigmoid"), ("dpo", "dpo_en_demo", "orpo"), ("dpo", "dpo_en_demo", "simpo")])
def test_killed_training_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_model,
                                                                                             stage, dataset, pref_loss):
    import os
    import signal
    import subprocess
    import time

    import shutil

    from conftest import LF_DATA, REPO, SNAKEMAKE, make_workdir, planned_jobs, snakemake

    overrides = dict(max_steps=20, save_steps=5, logging_steps=1, per_device_train_batch_size=8)
    if dataset:  # LLaMA-Factory's demo data for the preference stages
        overrides.update(stage=stage, dataset=dataset, max_samples=16, cutoff_len=96, max_completion_length=8)
    if pref_loss:  # dpo's losses: orpo and simpo reach TRL's CPO/ORPO trainers, whose resume is their own
        overrides.update(pref_loss=pref_loss)
    if stage == "rloo":  # against a reward model whose score is a known function of the text
        from test_stages import parity_reward_model

        parity_reward_model(tmp_path / "parity-rm")
        overrides.update(reward_model=str(tmp_path / "parity-rm"))
    straight = make_workdir(tmp_path / "straight", tiny_model, **overrides)
    if dataset:
        cfg = yaml.safe_load((straight / "tuneline.yaml").read_text())
        (straight / "tuneline.yaml").write_text(yaml.safe_dump({**cfg, "dataset_dir": str(LF_DATA)}))
    # the steps before train once, then a copy of the folder (Snakemake's metadata and times included): the
    # killed run starts at train with the same inputs and config
    snakemake(straight, "results/base_model", "results/tokenized", check=True)
    shutil.copytree(straight, tmp_path / "killed", symlinks=True)
    snakemake(straight, "results/adapter", check=True)

    work = tmp_path / "killed"
    assert planned_jobs(work, "results/adapter") == {"train"}
    cmd = [SNAKEMAKE, "--configfile", str(work / "tuneline.yaml"), "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(work), "--cores", "2", "results/adapter"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list((work / ".tuneline" / "checkpoints").glob("train-*/checkpoint-10/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "training ended before its second checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the training job, mid-run
    proc.wait()
    assert not (work / "results" / "adapter").exists()

    snakemake(work, "--unlock", check=True)  # a kill -9 leaves Snakemake's lock behind
    snakemake(work, "results/adapter", check=True)
    log = (work / "logs" / "train.log").read_text()
    assert "resuming the interrupted run from" in log
    report = json.loads((work / "results" / "adapter" / "train_report.json").read_text())
    assert report["resumed_from"] in {"checkpoint-10", "checkpoint-15"}
    assert report["global_steps"] == 20
    # train_loss is the whole run's mean, not only the resumed steps'
    straight_report = json.loads((straight / "results" / "adapter" / "train_report.json").read_text())
    assert abs(report["metrics"]["train_loss"] - straight_report["metrics"]["train_loss"]) < 1e-3
    a = load_file(straight / "results" / "adapter" / "adapter_model.safetensors")
    b = load_file(work / "results" / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b)
    if stage not in ("grpo", "rloo"):  # online RL resumes and finishes, but its completions after the resume are not
        # the ones an uninterrupted run draws (measured), so its weights are not bit-identical
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((work / ".tuneline" / "checkpoints").iterdir())  # removed after success


def test_a_checkpoint_cut_off_mid_save_is_skipped(tmp_path):
    key = {"params": {"lr": 1}, "tokenized": "x"}
    ckpt = tmp_path / "train-k"
    for step, complete in ((5, True), (10, True), (15, False)):
        (ckpt / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (ckpt / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (ckpt / "train_key.json").write_text(json.dumps(key))
    assert checkpoints.resumable_checkpoint(ckpt, key, LOG) == str(ckpt / "checkpoint-10")


def test_a_checkpoint_of_another_config_is_never_resumed(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = train_params(quantization_bit=None, max_steps=4)
    ckpt = checkpoints.checkpoint_dir(checkpoints.train_key(params, str(tokenized)))
    (ckpt / "checkpoint-2").mkdir(parents=True)
    (ckpt / "train_key.json").write_text(json.dumps({"params": {**params, "learning_rate": 1.0}, "tokenized": "x"}))
    out = run_train(tmp_path, tiny_model, tokenized, max_steps=4)
    assert json.loads((out / "train_report.json").read_text())["resumed_from"] is None


def test_packed_batch_has_the_unpacked_loss(tiny_model, tokenized, tokenizer):
    """One row with restarting position ids: the same loss as the padded batch, to fp32 rounding,
    and without padding; attention crossing examples would change it by far more."""
    import datasets
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.config.use_cache = False  # as train sets it: with a cache, packed position ids are ignored
    rows = datasets.load_from_disk(str(tokenized / "train")).select(range(6))
    features = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows]
    padded = batching.make_collator(tokenizer, packing=False)(features)
    packed = batching.make_collator(tokenizer, packing=True)(features)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in features)
    assert padded["input_ids"].numel() > packed["input_ids"].numel()  # the padding that packing removes
    with torch.no_grad():
        loss_padded = model(**padded).loss.item()
        loss_packed = model(**{k: v for k, v in packed.items()}).loss.item()
        # the same row without position ids: one long sequence, attention across examples
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss.item()
    assert abs(loss_packed - loss_padded) < 1e-5, (loss_packed, loss_padded)
    assert abs(leaky - loss_padded) > 1e-3
    # given the model, the collators keep logits only where a label is: same loss, fewer logits
    for packing, full_loss in ((True, loss_packed), (False, loss_padded)):
        batch = batching.make_collator(tokenizer, packing=packing, model=model)(features)
        labelled = int((batch["labels"][:, 1:] != -100).any(0).sum())
        assert batch["logits_to_keep"].numel() == labelled < batch["input_ids"].shape[1] // 2
        with torch.no_grad():
            out = model(**batch)
        assert out.logits.shape[1] == labelled
        assert abs(out.loss.item() - full_loss) < 1e-5, (packing, out.loss.item(), full_loss)
    # attention on each packed example's own slice (no block mask over the whole row): same loss
    use_packed_attention(model)
    try:
        with torch.no_grad():
            sliced = model(**batching.make_collator(tokenizer, packing=True, model=model)(features)).loss.item()
        assert model.config._attn_implementation == "tuneline_packed_sdpa"
    finally:
        use_packed_attention(model, on=False)
    assert abs(sliced - loss_padded) < 1e-5, (sliced, loss_padded)
    assert model.config._attn_implementation == "sdpa"  # back to what it was loaded with, for saving


@pytest.mark.parametrize("quant, expected", [
    ({"quantization_bit": 8}, {"bits": 8}),
    ({"quantization_bit": 4, "quantization_type": "fp4", "double_quantization": False},
     {"bits": 4, "type": "fp4", "double": False}),
])
def test_8bit_and_fp4_bases_are_quantized_as_asked_and_train(tmp_path, tiny_model, tokenized, monkeypatch, quant,
                                                            expected):
    import bitsandbytes as bnb

    monkeypatch.chdir(tmp_path)
    model, reported, _ = finetuning.build_model(str(tiny_model), train_params(**quant), torch.float32, LOG)
    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    assert reported == expected and len(layers) == 14  # 7 linear layers x 2 decoder layers
    if quant["quantization_bit"] == 4:
        assert {m.weight.quant_type for m in layers} == {"fp4"} and all(
            m.weight.quant_state.nested is False for m in layers)
    else:
        assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in layers)
    out = run_train(tmp_path, tiny_model, tokenized, max_steps=10, **quant)
    assert json.loads((out / "train_report.json").read_text())["quantization"] == expected
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < curve[0] - 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (QLoRA with bf16 compute)")
def test_qlora_on_cuda_computes_in_bf16_with_a_paged_8bit_optimizer(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_train(tmp_path, tiny_model, tokenized, quantization_bit=4, optim="paged_adamw_8bit", max_steps=10)
    report = json.loads((out / "train_report.json").read_text())
    assert report["device"] == "cuda" and report["compute_dtype"] == "bfloat16"
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < curve[0] - 0.5


def test_dataloader_workers_build_the_batches(tmp_path, tiny_model, tokenized, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.training_arguments(train_params(dataloader_num_workers=2), tmp_path,
                                    torch.float32).dataloader_num_workers == 2
    out = run_train(tmp_path, tiny_model, tokenized, max_steps=2, dataloader_num_workers=2)
    assert json.loads((out / "train_report.json").read_text())["global_steps"] == 2
