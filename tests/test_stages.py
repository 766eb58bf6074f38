"""Training stages (issue #4) on the tiny model: pt on LLaMA-Factory's raw-text demo data, dpo on
its preference demo data through TRL's DPOTrainer, validation on eval_dataset during training,
and the stages Tuneline refuses."""

from __future__ import annotations

import json
import logging
import math

import datasets
import pytest
import torch
import yaml

from conftest import LF_DATA, REPO, make_tokenized, make_workdir, planned_jobs, snakemake, train_params
from tuneline import prepare_eval_data, records, tokenize, train
from tuneline.config import check_values, rule_params
from tuneline.errors import TunelineError
from tuneline.jsonl import read_jsonl
from tuneline.registry import selected_entries

LOG = logging.getLogger("test")
LN2 = math.log(2)


def run_train(tmp_path, tiny_model, tokenized, name="out", **overrides):
    out = tmp_path / name
    train.main({"tokenized": str(tokenized), "model": str(tiny_model)}, {"adapter": str(out)},
               train_params(**{"quantization_bit": None, **overrides}), LOG)
    return out, json.loads((out / "loss_history.json").read_text())


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


# ---------------------------------------------------------------- pt

def test_pt_reads_lf_text_data_splits_long_texts_without_loss_and_learns(tmp_path, tiny_model, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = make_tokenized(tmp_path, tiny_model, cutoff_len=64, stage="pt", dataset="c4_demo,wiki_demo",
                         dataset_dir=str(LF_DATA), max_samples=4)
    texts = [r["text"] for r in read_jsonl(tmp_path / "data" / "train.jsonl")]
    assert len(texts) == 8 and {r["dataset"] for r in read_jsonl(tmp_path / "data" / "train.jsonl")} == {
        "c4_demo", "wiki_demo"}
    ds = datasets.load_from_disk(str(tok / "train"))
    stats = json.loads((tok / "stats.json").read_text())["train"]
    # every text is cut into windows of cutoff_len; the windows hold every token of text + eos
    assert stats["split_into_windows"] == 8 and max(map(len, ds["input_ids"])) == 64
    expected = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts)
    assert sum(map(len, ds["input_ids"])) == expected == stats["tokens"]
    assert ds["labels"] == ds["input_ids"]  # every token is learned
    _, history = run_train(tmp_path, tiny_model, tok, max_steps=12, stage="pt")
    curve = losses(history)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5


def test_pt_rejects_conversation_and_preference_data():
    params = {"dataset_dir": str(LF_DATA), "max_samples": 2, "identity_name": "", "identity_author": "",
              "stage": "pt"}
    with pytest.raises(TunelineError, match="'dpo_en_demo' is a preference dataset .* set stage: dpo"):
        records.collect(selected_entries(str(LF_DATA), "dpo_en_demo"), LOG, **params)
    with pytest.raises(TunelineError, match="'glaive_toolcall_en_demo': stage pt reads raw text"):
        records.collect(selected_entries(str(LF_DATA), "glaive_toolcall_en_demo"), LOG, **params)


# ---------------------------------------------------------------- dpo

def demo_tokenized(tmp_path_factory, tiny_model, stage, dataset, max_samples=16):
    """The first records of one of LLaMA-Factory's demo datasets, prepared and tokenized for `stage`."""
    root = tmp_path_factory.mktemp(stage)
    make_tokenized(root, tiny_model, cutoff_len=96, stage=stage, dataset=dataset, dataset_dir=str(LF_DATA),
                   max_samples=max_samples)
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model):
    return demo_tokenized(tmp_path_factory, tiny_model, "dpo", "dpo_en_demo")


def pair_margins(model_dir, adapter, tokenized) -> torch.Tensor:
    """log p(chosen) - log p(rejected) of each training pair under the base (+ adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    margins = []
    with torch.no_grad():
        for row in datasets.load_from_disk(str(tokenized / "train")):
            logps = []
            for completion in (row["chosen_ids"], row["rejected_ids"]):
                ids = torch.tensor([row["prompt_ids"] + completion])
                logits = model(ids).logits[0, len(row["prompt_ids"]) - 1:-1].log_softmax(-1)
                logps.append(logits.gather(1, torch.tensor(completion)[:, None]).sum())
            margins.append(logps[0] - logps[1])
    return torch.stack(margins)


def test_dpo_pairs_are_rendered_with_the_template(pairs, tokenizer):
    rows = read_jsonl(pairs / "data" / "train.jsonl")
    assert all(r["messages"][-1]["role"] == "assistant" and isinstance(r["rejected"], str) for r in rows)
    ds = datasets.load_from_disk(str(pairs / "tok" / "train"))
    assert set(ds.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"} and len(ds) == 16
    first = ds[0]
    assert tokenizer.decode(first["prompt_ids"]).startswith("<|im_start|>system\n")
    assert rows[0]["messages"][-1]["content"].startswith(tokenizer.decode(first["chosen_ids"])[:20])
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 96 for r in ds)


def test_dpo_with_lora_prefers_the_chosen_responses(tmp_path, tiny_model, pairs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, history = run_train(tmp_path, tiny_model, pairs / "tok", max_steps=10, stage="dpo", learning_rate=1e-2)
    curve = losses(history)
    # step 1: the policy is the reference (LoRA B = 0), so the sigmoid loss is exactly -log sigmoid(0)
    assert abs(curve[0] - LN2) < 1e-4 and curve[-1] < 0.3
    assert history[-2]["rewards/margins"] > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not (out / "ref").exists()  # TRL's reference copy is not saved
    report = json.loads((out / "train_report.json").read_text())
    assert report["stage"] == "dpo"
    args = train.training_arguments(train_params(stage="dpo", pref_beta=0.3), tmp_path, torch.float32)
    assert (type(args).__name__, args.beta, args.loss_type, args.gradient_checkpointing) == (
        "DPOConfig", 0.3, ["sigmoid"], False)  # TRL's defaults (checkpointing on) do not leak in
    before = pair_margins(tiny_model, None, pairs / "tok")
    after = pair_margins(tiny_model, out, pairs / "tok")
    assert (after - before).mean() > 1.0 and (after > before).float().mean() >= 0.75


def test_dpo_freeze_has_a_frozen_reference_and_pref_ftx_adds_the_sft_loss(tmp_path, tiny_model, pairs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, plain = run_train(tmp_path, tiny_model, pairs / "tok", name="plain", max_steps=2, stage="dpo",
                         finetuning_type="freeze", freeze_trainable_layers=1)
    assert abs(losses(plain)[0] - LN2) < 1e-4  # the reference is a copy of the base: same log-probs
    _, ftx = run_train(tmp_path, tiny_model, pairs / "tok", name="ftx", max_steps=2, stage="dpo",
                       finetuning_type="freeze", freeze_trainable_layers=1, pref_ftx=0.5, pref_loss="hinge")
    # hinge at margin 0 is 1; the SFT term adds half the chosen responses' NLL (~ln 600 for a random model)
    assert losses(ftx)[0] > 1.0 + 0.5 * 4


# ---------------------------------------------------------------- kto

@pytest.fixture(scope="module")
def tagged(tmp_path_factory, tiny_model):
    return demo_tokenized(tmp_path_factory, tiny_model, "kto", "kto_en_demo", max_samples=24)


def completion_logps(model_dir, adapter, tokenized) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(completion | prompt) of each training example, and its label."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    logps, labels = [], []
    with torch.no_grad():
        for row in datasets.load_from_disk(str(tokenized / "train")):
            ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            logits = model(ids).logits[0, len(row["prompt_ids"]) - 1:-1].log_softmax(-1)
            logps.append(logits.gather(1, torch.tensor(row["completion_ids"])[:, None]).sum())
            labels.append(row["label"])
    return torch.stack(logps), torch.tensor(labels)


def test_kto_reads_llamafactorys_kto_tag_data(tagged, tokenizer):
    rows = read_jsonl(tagged / "data" / "train.jsonl")
    assert all(isinstance(r["label"], bool) and r["messages"][-1]["role"] == "assistant" for r in rows)
    ds = datasets.load_from_disk(str(tagged / "tok" / "train"))
    assert set(ds.column_names) == {"prompt_ids", "completion_ids", "label"} and len(ds) == 24
    assert 0 < sum(ds["label"]) < 24  # both kinds
    assert tokenizer.decode(ds[0]["prompt_ids"]).startswith("<|im_start|>system\n")


def test_kto_with_lora_raises_desirable_and_lowers_undesirable_responses(tmp_path, tiny_model, tagged, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, history = run_train(tmp_path, tiny_model, tagged / "tok", max_steps=12, stage="kto", learning_rate=1e-2,
                             kto_rejected_weight=1.5)
    curve = losses(history)
    assert curve[-1] < curve[0]
    args = train.training_arguments(train_params(stage="kto", pref_beta=0.2, kto_rejected_weight=1.5), tmp_path,
                                    torch.float32)
    assert (type(args).__name__, args.beta, args.desirable_weight, args.undesirable_weight) == (
        "KTOConfig", 0.2, 1.0, 1.5)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and json.loads((out / "train_report.json").read_text())["stage"] == "kto"
    before, labels = completion_logps(tiny_model, None, tagged / "tok")
    after, _ = completion_logps(tiny_model, out, tagged / "tok")
    moved = after - before
    assert moved[labels].mean() > moved[~labels].mean() + 1.0  # desirable up relative to undesirable


def test_kto_needs_a_kto_tag_column():
    params = {"dataset_dir": str(LF_DATA), "max_samples": 2, "identity_name": "", "identity_author": "",
              "stage": "kto"}
    with pytest.raises(TunelineError, match="'alpaca_en_demo': stage kto needs .* columns.kto_tag"):
        records.collect(selected_entries(str(LF_DATA), "alpaca_en_demo"), LOG, **params)


# ---------------------------------------------------------------- eval_dataset, refused stages

def test_eval_dataset_is_the_validation_split_in_training(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = rule_params({"dataset_dir": str(REPO / "resources"), "eval_dataset": "identity", "max_samples": 6},
                         "prepare_eval_data")
    params["entries"] = selected_entries(params["dataset_dir"], "identity")
    prepare_eval_data.main({}, {"data": str(tmp_path / "eval_data")}, params, LOG)
    make_tokenized(tmp_path / "a", tiny_model, cutoff_len=64)  # data from the val_size-less split
    tokenize.main({"data": str(tmp_path / "a" / "data"), "eval_data": str(tmp_path / "eval_data"),
                   "model": str(tiny_model)}, {"tokenized": str(tmp_path / "tok")},
                  rule_params({"cutoff_len": 64}, "tokenize"), LOG)
    assert len(datasets.load_from_disk(str(tmp_path / "tok" / "validation"))) == 6
    _, history = run_train(tmp_path, tiny_model, tmp_path / "tok", max_steps=4, eval_strategy="steps", eval_steps=2)
    # evaluated at steps 2 and 4, and not once more after training: step 4 was the last step
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["metrics"]["eval_loss"] == history[-2]["eval_loss"]


@pytest.mark.parametrize("stage", ["ppo"])
def test_unsupported_stages_are_refused_with_the_reason(stage):
    with pytest.raises(TunelineError, match=rf"'stage' = '{stage}' is not supported: .* Allowed: sft, pt, dpo, kto, rm"):
        check_values({"stage": stage})


def test_stage_pt_plans_no_generation_scoring_and_ppo_fails_the_dry_run(tmp_path, tiny_model):
    work = make_workdir(tmp_path, tiny_model, stage="pt", dataset="c4_demo")
    cfg = yaml.safe_load((work / "tuneline.yaml").read_text())
    (work / "tuneline.yaml").write_text(yaml.safe_dump({**cfg, "dataset_dir": str(LF_DATA)}))
    jobs = planned_jobs(work)
    assert {"train", "mmlu", "eval_summary"} <= jobs and not {"predict", "score_generation"} & jobs
    proc = snakemake(work, "--dry-run", "--config", "stage=ppo")
    assert proc.returncode != 0 and "'stage' = 'ppo' is not supported: TRL removed its PPOTrainer" in proc.output


def test_every_stage_of_the_schema_has_its_module_with_the_interface():
    from tuneline import stages
    from tuneline.config import keys

    offered = [s for s in keys()["stage"]["enum"] if s not in keys()["stage"].get("unsupported", {})]
    assert sorted(offered) == sorted(stages.STAGES)
    for name in stages.STAGES:
        module = stages.get(name)
        assert module.RECORD in ("conversation", "text", "pair", "tagged")
        assert set(module.EVALUATION) <= {"generation", "mmlu", "pairwise"} and module.MODEL in ("causal_lm", "reward")
        for fn in ("encode", "training_arguments", "trainer", "real_tokens"):
            assert callable(getattr(module, fn)), (name, fn)
        assert isinstance(module.PACKING, bool)


@pytest.mark.parametrize("stage,dataset", [("kto", "kto_en_demo"), ("dpo", "dpo_en_demo"), ("grpo", "alpaca_en_demo")])
def test_preference_stages_run_the_whole_dag(tmp_path, tiny_model, stage, dataset):
    work = make_workdir(tmp_path, tiny_model, stage=stage, dataset=dataset, max_samples=16, val_size=4, max_steps=3,
                        max_completion_length=16)
    cfg = yaml.safe_load((work / "tuneline.yaml").read_text())
    (work / "tuneline.yaml").write_text(yaml.safe_dump({**cfg, "dataset_dir": str(LF_DATA)}))
    snakemake(work, "all", check=True)
    summary = json.loads((work / "results" / "eval" / "summary.json").read_text())
    assert {r["metric"] for r in summary["rows"]} >= {"bleu-4", "rouge-l"}
    assert json.loads((work / "results" / "merged_model" / "merge_report.json").read_text())["gates"]


@pytest.mark.parametrize("loss,trainer,config", [("orpo", "ORPOTrainer", "ORPOConfig"),
                                                 ("simpo", "CPOTrainer", "CPOConfig")])
def test_reference_free_preference_losses_reach_their_trl_trainer(tmp_path, tiny_model, pairs, monkeypatch, loss,
                                                                   trainer, config, caplog):
    import logging

    monkeypatch.chdir(tmp_path)
    seen = {}
    from tuneline.stages import dpo

    real = dpo.reference_free_trainer
    monkeypatch.setattr(dpo, "reference_free_trainer", lambda run: seen.setdefault("t", real(run)))
    with caplog.at_level(logging.INFO):
        out, history = run_train(tmp_path, tiny_model, pairs / "tok", max_steps=10, stage="dpo", pref_loss=loss,
                                 learning_rate=1e-2, simpo_gamma=0.3)
    assert trainer in [c.__name__ for c in type(seen["t"]).__mro__] and "no reference model" in caplog.text
    args = train.training_arguments(train_params(stage="dpo", pref_loss=loss, simpo_gamma=0.3), tmp_path,
                                    torch.float32)
    assert type(args).__name__ == config and (loss != "simpo" or (args.loss_type, args.simpo_gamma) == ("simpo", 0.3))
    curve = losses(history)
    assert curve[-1] < curve[0]
    before = pair_margins(tiny_model, None, pairs / "tok")
    after = pair_margins(tiny_model, out, pairs / "tok")
    assert (after - before).mean() > 0.5 and (after > before).float().mean() >= 0.75


@pytest.mark.parametrize("stage,fixture", [("kto", "tagged"), ("dpo", "pairs"), ("rm", "ranked"), ("grpo", "prompts"),
                                           ("rloo", "prompts")])
def test_preference_stages_are_byte_reproducible(tmp_path, request, stage, fixture):
    import subprocess
    import sys

    from test_methods import folder_digest

    root = request.getfixturevalue(fixture)
    model = request.getfixturevalue("tiny_model")
    code = ("import logging, sys; from tuneline import train; from conftest import train_params; "
            "train.main({'tokenized': sys.argv[1], 'model': sys.argv[2]}, {'adapter': sys.argv[3]}, "
            f"train_params(quantization_bit=None, max_steps=3, stage='{stage}'{online_extra(stage, tmp_path)}), "
            "logging.getLogger('t'))")
    for i, seed in enumerate(("1", "2")):  # separate interpreters, different hash seeds
        env = {"PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO / "tests"), "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", code, str(root / "tok"), str(model), str(tmp_path / f"run{i}")],
                       check=True, env=env, cwd=tmp_path, capture_output=True)
    first, second = folder_digest(tmp_path / "run0"), folder_digest(tmp_path / "run1")
    assert "adapter_model.safetensors" in first and first == second


def online_extra(stage, tmp_path) -> str:
    """For stage rloo: a reward model (the hand-built one below) as train_params keyword text."""
    if stage != "rloo":
        return ""
    parity_reward_model(tmp_path / "parity-rm")
    return f", reward_model={str(tmp_path / 'parity-rm')!r}"


@pytest.mark.parametrize("stage,dataset", [("kto", "kto_en_demo"), ("rm", "dpo_en_demo"), ("grpo", "alpaca_en_demo"),
                                           ("rloo", "alpaca_en_demo")])
def test_preference_stages_run_in_two_cpu_processes(tmp_path, tiny_model, stage, dataset):
    extra = {"reward_model": str(tmp_path / "parity-rm")} if online_extra(stage, tmp_path) else {}
    work = make_workdir(tmp_path, tiny_model, stage=stage, dataset=dataset, max_samples=16, max_steps=3,
                        per_device_train_batch_size=2, nproc_per_node=2, num_generations=2,
                        max_completion_length=8, **extra)
    cfg = yaml.safe_load((work / "tuneline.yaml").read_text())
    (work / "tuneline.yaml").write_text(yaml.safe_dump({**cfg, "dataset_dir": str(LF_DATA)}))
    snakemake(work, "results/adapter", check=True)
    report = json.loads((work / "results" / "adapter" / "train_report.json").read_text())
    assert report["processes"] == 2 and report["stage"] == stage and report["global_steps"] == 3


# ---------------------------------------------------------------- rm

@pytest.fixture(scope="module")
def ranked(tmp_path_factory, tiny_model):
    return demo_tokenized(tmp_path_factory, tiny_model, "rm", "dpo_en_demo")


def reward_scores(model_dir, tokenized, **load) -> dict:
    from tuneline.modeling import load_causal_lm
    from tuneline.reward_accuracy import pairwise

    torch.manual_seed(0)
    model = load_causal_lm(model_dir, torch.float32, **load).eval()
    model.config.pad_token_id = 0
    return pairwise(model, datasets.load_from_disk(str(tokenized / "train")), 0, 8)


def test_rm_encodes_whole_conversations_from_llamafactorys_ranking_data(ranked, tokenizer):
    ds = datasets.load_from_disk(str(ranked / "tok" / "train"))
    assert set(ds.column_names) == {"chosen_ids", "rejected_ids"} and len(ds) == 16
    row = ds[0]
    assert tokenizer.decode(row["chosen_ids"]).startswith("<|im_start|>system\n")
    shared = next(i for i, (a, b) in enumerate(zip(row["chosen_ids"], row["rejected_ids"])) if a != b)
    assert 0 < shared < min(len(row["chosen_ids"]), len(row["rejected_ids"]))  # one prompt, two responses
    assert all(max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 96 for r in ds)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_rm_learns_to_rank_chosen_above_rejected_and_merges_with_its_value_head(tmp_path, tiny_model, ranked,
                                                                                 monkeypatch, method):
    from safetensors import safe_open

    from tuneline import merge

    monkeypatch.chdir(tmp_path)
    out, history = run_train(tmp_path, tiny_model, ranked / "tok", max_steps=12, stage="rm",
                             learning_rate=1e-3 if method == "full" else 1e-2,
                             finetuning_type="full" if method == "full" else "lora",
                             quantization_bit=4 if method == "qlora" else None)
    curve = losses(history)
    assert curve[-1] < curve[0] and curve[-1] < LN2
    if method != "full":
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["task_type"] == "SEQ_CLS" and "score" in cfg["modules_to_save"]
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            names = list(f.keys())
        assert any("score" in n for n in names) and all("lora_" in n or "score" in n for n in names)
    merged = tmp_path / "merged"
    report = merge.main({"adapter": str(out), "model": str(tiny_model)}, {"model": str(merged)},
                        rule_params({"merge_tolerance": 1e-3}, "merge"), LOG)["merge_report"]
    assert all(g["passed"] for g in report["gates"])
    assert json.loads((merged / "config.json").read_text())["architectures"][0].endswith("ForSequenceClassification")
    base = reward_scores(tiny_model, ranked / "tok", reward=True)
    tuned = reward_scores(merged, ranked / "tok")
    assert tuned["accuracy"] >= 75 and tuned["mean_margin"] > base["mean_margin"] + 0.5, (base, tuned)


def test_rm_runs_the_whole_dag_with_pairwise_accuracy_base_vs_tuned(tmp_path, tiny_model):
    work = make_workdir(tmp_path, tiny_model, stage="rm", dataset="dpo_en_demo", max_samples=16, val_size=4,
                        max_steps=6, learning_rate=1e-2)
    cfg = yaml.safe_load((work / "tuneline.yaml").read_text())
    (work / "tuneline.yaml").write_text(yaml.safe_dump({**cfg, "dataset_dir": str(LF_DATA)}))
    jobs = planned_jobs(work)
    assert "reward_accuracy" in jobs and not {"predict", "mmlu"} & jobs
    snakemake(work, "all", check=True)
    summary = json.loads((work / "results" / "eval" / "summary.json").read_text())
    assert {r["metric"] for r in summary["rows"]} == {"reward accuracy", "reward margin"}
    assert summary["tuned"]["pairwise"]["pairs"] == 4
    assert "pairwise accuracy" in (work / "results" / "eval" / "summary.md").read_text()
    proc = snakemake(work, "export", "--config", "export_format=gguf")
    assert proc.returncode != 0 and "is a reward model (stage rm)" in proc.output
    snakemake(work, "export", "--config", "export_format=merged", f"export_dir={tmp_path / 'rm-export'}", check=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "rm-export" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("score.weight").shape[0] == 1  # the value head is exported


def test_training_leaves_the_tokenized_data_as_tokenize_wrote_it(tmp_path, tiny_model, tagged, monkeypatch):
    """KTOTrainer maps the dataset (its KL pairs): the datasets cache must not land in results/tokenized,
    which would change an upstream artifact and the resume key of an interrupted run."""
    import shutil

    monkeypatch.chdir(tmp_path)
    tok = tmp_path / "tok"
    shutil.copytree(tagged / "tok", tok)
    before = sorted(p.name for p in tok.rglob("*"))
    run_train(tmp_path, tiny_model, tok, max_steps=1, stage="kto")
    assert sorted(p.name for p in tok.rglob("*")) == before


# ---------------------------------------------------------------- online RL: grpo, rloo

@pytest.fixture(scope="module")
def prompts(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("online")
    make_tokenized(root, tiny_model, cutoff_len=64, stage="grpo", max_samples=16)
    return root


def rewards(history) -> list[float]:
    return [h["reward"] for h in history if "reward" in h]


def test_online_prompts_are_rendered_with_the_template_and_keep_the_solution(prompts, tokenizer):
    ds = datasets.load_from_disk(str(prompts / "tok" / "train"))
    assert set(ds.column_names) == {"prompt", "prompt_ids", "solution"}
    row = ds[0]
    assert tokenizer.decode(row["prompt_ids"]) == row["prompt"] and row["prompt"].endswith("<|im_start|>assistant\n")
    assert row["solution"] and row["solution"] not in row["prompt"]


def test_grpo_raises_the_reward_of_its_reward_function(tmp_path, tiny_model, prompts, monkeypatch):
    from tuneline.stages import online

    monkeypatch.chdir(tmp_path)
    out, history = run_train(tmp_path, tiny_model, prompts / "tok", max_steps=15, stage="grpo", learning_rate=5e-2,
                             reward_funcs="format", reward_format="^[a-z]", max_completion_length=8,
                             num_generations=4, per_device_train_batch_size=16)
    curve = rewards(history)
    assert len(curve) == 15 and sum(curve[:3]) / 3 < 0.5 and sum(curve[-3:]) / 3 > 0.8, curve
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    exact, overlap, fmt = online.reward_functions({"reward_funcs": "exact_match,overlap,format",
                                                   "reward_format": r"^\d+$"})
    assert exact(["Paris ", "paris", "Lyon"], ["paris"] * 3) == [1.0, 1.0, 0.0]
    assert overlap(["the cat sat", "dog"], ["the cat", "cat"]) == [0.8, 0.0]
    assert fmt(["42", "4 2"]) == [1.0, 0.0]
    with pytest.raises(TunelineError, match="reward_funcs: bleu - the reward functions are exact_match, overlap"):
        online.reward_functions({"reward_funcs": "bleu", "reward_format": "x"})
    with pytest.raises(TunelineError, match="num_generations=3 must divide"):
        train.training_arguments(train_params(stage="grpo", num_generations=3), tmp_path, torch.float32)


def test_rloo_trains_against_the_reward_model_that_stage_rm_wrote(tmp_path, tiny_model, ranked, prompts, monkeypatch):
    from tuneline import merge

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelineError, match="stage rloo needs reward_model"):
        run_train(tmp_path, tiny_model, prompts / "tok", name="none", max_steps=1, stage="rloo")
    rm, _ = run_train(tmp_path, tiny_model, ranked / "tok", name="rm", max_steps=12, stage="rm", learning_rate=1e-2)
    merge.main({"adapter": str(rm), "model": str(tiny_model)}, {"model": str(tmp_path / "rm-merged")},
               rule_params({"merge_tolerance": 1e-3}, "merge"), LOG)
    out, history = run_train(tmp_path, tiny_model, prompts / "tok", max_steps=6, stage="rloo", learning_rate=1e-2,
                             reward_model=str(tmp_path / "rm-merged"), max_completion_length=8, num_generations=4,
                             per_device_train_batch_size=16)
    steps = [h for h in history if "reward" in h]
    # every completion is scored by the reward model (TRL names the reward by its folder), the scores of a
    # group differ (a learning signal), and the policy moves away from the reference (KL > 0)
    assert len(steps) == 6 and all(h["rewards/rm-merged/mean"] == h["reward"] for h in steps)
    assert all(h["reward_std"] > 0 for h in steps) and steps[-1]["kl"] > 0 and steps[-1]["grad_norm"] > 0
    assert (out / "adapter_model.safetensors").is_file()
    # (a reward model trained for 12 steps on 16 pairs scores the random policy's completions with noise: its
    # mean does not move in 6 steps; the next test gives rloo a reward model whose score is a clean signal)


def parity_reward_model(path):
    """A sequence-classification reward model built by hand, so its score is a known function of the text:
    scale x (share of even token ids - share of odd ones), over the whole sequence. One layer; q/k zero,
    so the last position attends evenly to every token; v/o carry each token's +-1 mark into a dimension
    that the value head reads; everything else zero (the residual keeps the last token's mark, which the
    final norm divides out nearly evenly)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from conftest import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        layer = model.model.layers[0]
        layer.input_layernorm.weight.fill_(1)
        model.model.norm.weight.fill_(1)
        model.model.embed_tokens.weight[:, 0] = torch.tensor([100.0 if i % 2 == 0 else -100.0 for i in range(len(tok))])
        layer.self_attn.v_proj.weight[0, 0] = 1.0  # the normalised mark (+-8) into head 0
        layer.self_attn.o_proj.weight[1, 0] = 1.0  # its mean over the sequence into dimension 1
        model.score.weight[0, 1] = 12.5 / 8 * 10  # the final norm divides by ~12.5: score = 10 x mean mark
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_rloo_raises_the_score_of_its_reward_model(tmp_path, tiny_model, prompts, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok = parity_reward_model(tmp_path / "parity-rm")
    even = [i for i in range(3, 40) if i % 2 == 0]
    with torch.no_grad():
        scores = [model(input_ids=torch.tensor([ids])).logits.item() for ids in (even, [i + 1 for i in even])]
    assert scores[0] > 9 and scores[1] < -9  # the reward model scores what it is built to score
    out, history = run_train(tmp_path, tiny_model, prompts / "tok", max_steps=15, stage="rloo", learning_rate=5e-2,
                             reward_model=str(tmp_path / "parity-rm"), max_completion_length=8, num_generations=4,
                             per_device_train_batch_size=16)
    curve = rewards(history)
    # measured (AVX2 CPU): -0.34 -0.14 -0.68 ... 2.54 2.18 2.32: the policy learned to write even-id tokens
    assert len(curve) == 15 and sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 1.0, curve


def test_rloo_runs_the_whole_dag_against_a_reward_model_folder(tmp_path, tiny_model, ranked, monkeypatch):
    from tuneline import merge

    monkeypatch.chdir(tmp_path)
    rm, _ = run_train(tmp_path, tiny_model, ranked / "tok", name="rm", max_steps=4, stage="rm", learning_rate=1e-2)
    merge.main({"adapter": str(rm), "model": str(tiny_model)}, {"model": str(tmp_path / "rm-merged")},
               rule_params({"merge_tolerance": 1e-3}, "merge"), LOG)
    work = make_workdir(tmp_path / "w", tiny_model, stage="rloo", dataset="alpaca_en_demo", max_samples=16, val_size=4,
                        max_steps=2, max_completion_length=8, reward_model=str(tmp_path / "rm-merged"))
    cfg = yaml.safe_load((work / "tuneline.yaml").read_text())
    (work / "tuneline.yaml").write_text(yaml.safe_dump({**cfg, "dataset_dir": str(LF_DATA)}))
    snakemake(work, "all", check=True)
    report = json.loads((work / "results" / "adapter" / "train_report.json").read_text())
    assert report["stage"] == "rloo" and report["global_steps"] == 2
    assert {r["metric"] for r in json.loads((work / "results" / "eval" / "summary.json").read_text())["rows"]} >= {
        "bleu-4", "rouge-l"}
    # the reward model is an input of train: a new one retrains
    import shutil

    shutil.rmtree(tmp_path / "rm-merged")
    merge.main({"adapter": str(rm), "model": str(tiny_model)}, {"model": str(tmp_path / "rm-merged")},
               rule_params({"merge_tolerance": 1e-3}, "merge"), LOG)
    assert "train" in planned_jobs(work, "results/adapter")
