"""Exports (GGUF, bitsandbytes, GPTQ) from a tiny model: written, reloaded, compared; and `tuneline chat`."""

import json
import logging
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_workdir, planned_jobs, snakemake
from tuneline.errors import TunelineError

LOG = logging.getLogger("test")
NO_FLOOR = {"export_min_top1": 0.0}  # a random tiny model is far more quantization-sensitive than a trained one


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model):
    """A folder shaped like results/merged_model (template.json beside the weights) and its base_model."""
    from transformers import AutoTokenizer

    from tuneline.templates import get_template

    root = tmp_path_factory.mktemp("export")
    model = root / "merged_model"
    shutil.copytree(tiny_model, model)
    (model / "template.json").write_text(json.dumps(get_template(None, AutoTokenizer.from_pretrained(model)).describe()))
    base = root / "base_model"
    base.mkdir()
    (base / "source.json").write_text(json.dumps({"kind": "folder", "path": str(tiny_model)}))
    return model


@pytest.fixture(scope="module")
def gguf_dir(merged):
    from tuneline import export_gguf

    out = merged.parent / "gguf"
    export_gguf.main({"model": str(merged), "base": str(merged.parent / "base_model")}, {"gguf": str(out)},
                     {"export_gguf_types": ["f32", "f16", "q8_0", "q4_0"], "export_name": "tiny", **NO_FLOOR}, LOG)
    return out


def test_gguf_files_reload_and_match_by_type(gguf_dir):
    report = json.loads((gguf_dir / "export_report.json").read_text())
    files = report["files"]
    assert set(files) == {f"tiny-{t}.gguf" for t in ("f32", "f16", "q8_0", "q4_0")}
    # f32 round-trips exactly: this also proves the q/k rotary permutation is the one llama.cpp expects,
    # since transformers' GGUF loader undoes it
    assert files["tiny-f32.gguf"]["transformers"]["max_abs_logit_diff"] < 1e-4
    assert files["tiny-f16.gguf"]["transformers"]["top1_agreement"] >= 0.95
    assert files["tiny-f16.gguf"]["transformers"]["max_abs_logit_diff"] < 0.5
    assert files["tiny-q8_0.gguf"]["transformers"]["top1_agreement"] >= 0.85
    for name, entry in files.items():
        assert entry["transformers"]["tokenizer_matches"], name
        assert entry["metadata"]["problems"] == [], name
    sizes = {t: files[f"tiny-{t}.gguf"]["bytes"] for t in ("f32", "f16", "q8_0", "q4_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]
    # below 8 bits the embedding stays Q8_0 (as llama.cpp does), norms stay F32
    assert files["tiny-q4_0.gguf"]["tensor_types"] == {"Q8_0": 1, "F32": 5, "Q4_0": 14}


def test_gguf_metadata_has_tokenizer_template_and_special_tokens(gguf_dir, merged):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    reader = GGUFReader(gguf_dir / "tiny-q8_0.gguf")

    def field(key):
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama" and field("general.name") == "tiny"
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == len(tok) and tokens[tok.eos_token_id] == "<|im_end|>"
    assert field("tokenizer.ggml.token_type")[tok.eos_token_id] == 3  # CONTROL
    assert len(field("tokenizer.ggml.merges")) > 100
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field("tokenizer.chat_template") == tok.chat_template
    assert field("llama.attention.head_count_kv") == 2 and field("llama.block_count") == 2


def test_ollama_modelfile_renders_the_training_template(gguf_dir):
    text = (gguf_dir / "Modelfile").read_text()
    assert "FROM ./tiny-f32.gguf" in text  # the first of export_gguf_types
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert template == ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                        '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
                        '<|im_start|>assistant\n{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n'
                        '{{ end }}{{ end }}')
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_gguf_floor_fails_the_rule(merged, tmp_path):
    from tuneline import export_gguf

    with pytest.raises(TunelineError, match="top-1 agreement .* < 1.0"):
        export_gguf.main({"model": str(merged), "base": str(merged.parent / "base_model")}, {"gguf": str(tmp_path / "g")},
                         {"export_gguf_types": ["q4_0"], "export_name": "tiny", "export_min_top1": 1.0}, LOG)


def test_gguf_rejects_what_it_cannot_write(merged, tmp_path):
    from tuneline import export_gguf

    other = tmp_path / "m"
    shutil.copytree(merged, other)
    config = json.loads((other / "tokenizer.json").read_text())
    config["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (other / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(TunelineError, match="byte-level BPE"):
        export_gguf.vocabulary(other, None, 10)
    with pytest.raises(TunelineError, match="not supported"):
        export_gguf.main({"model": str(merged), "base": str(merged.parent / "base_model")}, {"gguf": str(tmp_path / "g")},
                         {"export_gguf_types": ["q2_k"], "export_name": "tiny", **NO_FLOOR}, LOG)


def test_permutation_interleaves_rotary_halves_per_head():
    import numpy as np

    from tuneline.export_gguf import permute_rotary

    w = np.arange(8)[:, None].repeat(3, 1)  # 2 heads of 4 rows: halves (0,1)(2,3) -> 0,2,1,3
    assert permute_rotary(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.skipif(not __import__("importlib").util.find_spec("llama_cpp"),
                    reason="llama-cpp-python not installed (optional: pip install '.[gguf]')")
def test_llama_cpp_loads_and_answers_like_the_merged_model(gguf_dir):
    report = json.loads((gguf_dir / "export_report.json").read_text())
    cpp = report["files"]["tiny-f32.gguf"]["llama_cpp"]
    assert cpp["tokenizer_matches"]
    assert cpp["same_greedy_answers"] == "3/3", (cpp["answers"], report["merged_answers"])
    assert cpp["chat_template_renders_like_training"], cpp["chat_answer"]


@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_export_reloads_exactly(merged, tmp_path, bits):
    from transformers import AutoModelForCausalLM

    from tuneline import export_bnb

    out = tmp_path / f"bnb-{bits}bit"
    export_bnb.main({"model": str(merged)}, {"model": str(out)},
                    {"bits": bits, "quantization_type": "nf4", "double_quantization": True, "export_size": 1,
                     "export_legacy_format": False, **NO_FLOOR}, LOG)
    report = json.loads((out / "export_report.json").read_text())
    assert report["reload_vs_saved"]["max_abs_logit_diff"] == 0.0
    assert report["vs_merged_model"]["max_abs_logit_diff"] > 0  # it is quantized, and says by how much
    assert "model.safetensors" in report["files"] and not [f for f in report["files"] if f.endswith(".bin")]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_4bit"] if bits == 4 else config["load_in_8bit"]
    if bits == 4:
        assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")


def test_gptq_stops_at_once_without_cuda(merged, tmp_path):
    import torch

    from tuneline import export_gptq

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    start = time.perf_counter()
    with pytest.raises(TunelineError, match="needs a CUDA GPU"):
        export_gptq.main({"model": str(merged), "data": str(tmp_path)}, {"model": str(tmp_path / "q")},
                         {"bits": 4}, LOG)
    assert time.perf_counter() - start < 5 and not (tmp_path / "q").exists()
    with pytest.raises(TunelineError, match="2, 3, 4, 8 bits, not 5"):
        export_gptq.main({}, {}, {"bits": 5}, LOG)


def test_gptq_calibration_set_is_seeded_and_cut_with_a_log_line(tokenizer, caplog):
    from tuneline.export_gptq import calibration_texts
    from tuneline.templates import get_template

    template = get_template("chatml", tokenizer)
    examples = [{"messages": [{"role": "user", "content": f"question {i} " * (i % 7 + 1)},
                              {"role": "assistant", "content": f"answer {i}"}]} for i in range(40)]
    with caplog.at_level(logging.INFO):
        a = calibration_texts(examples, template, tokenizer, 8, 24, seed=42, log=LOG)
    b = calibration_texts(examples, template, tokenizer, 8, 24, seed=42, log=LOG)
    c = calibration_texts(examples, template, tokenizer, 8, 24, seed=7, log=LOG)
    assert a == b and a != c and len(a) == 8
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) <= 25 for t in a)
    assert "cut to export_quantization_maxlen=24" in caplog.text
    with caplog.at_level(logging.INFO):
        assert len(calibration_texts(examples, template, tokenizer, 100, 512, 0, LOG)) == 40
    assert "only 40 examples for export_quantization_nsamples=100" in caplog.text


def test_gptq_calibration_file_as_in_llamafactorys_examples(tmp_path, tiny_model, tokenizer):
    """export_quantization_dataset: data/c4_demo.jsonl (LLaMA-Factory's GPTQ example): the file's `text`
    column is the calibration set, and the file is the rule's input (an edit reruns the export)."""
    from conftest import LF_DATA, make_workdir, planned_jobs, snakemake
    from tuneline.export_gptq import calibration_texts, load_examples

    c4 = LF_DATA / "c4_demo.jsonl"
    examples = load_examples({}, {"export_quantization_dataset": str(c4)}, LOG)
    assert len(examples) == sum(1 for line in c4.read_text().splitlines() if line.strip())
    texts = calibration_texts(examples, None, tokenizer, 4, 32, seed=1, log=LOG)
    assert len(texts) == 4 and all(t.strip() for t in texts)
    work = make_workdir(tmp_path, tiny_model, export_quantization_dataset=str(c4))
    assert "export_gptq" in planned_jobs(work, "results/export/gptq-4bit")
    plan = snakemake(work, "--dry-run", "results/export/gptq-4bit").output
    assert re.search(r"rule export_gptq:\s+input: [^\n]*c4_demo\.jsonl", plan)
    with pytest.raises(TunelineError, match="no record has a `text` column"):
        load_examples({}, {"export_quantization_dataset": str(LF_DATA / "alpaca_en_demo.json")}, LOG)


def test_gptq_on_cuda(merged, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("GPTQ needs a CUDA GPU (none here)")
    pytest.importorskip("gptqmodel")
    from tuneline import export_gptq

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Tell me about number {i}."},
                          {"role": "assistant", "content": f"{i} is a number. " * 8}]} for i in range(16)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gptq-4bit"
    export_gptq.main({"model": str(merged), "data": str(data)}, {"model": str(out)},
                     {"bits": 4, "export_quantization_nsamples": 8, "export_quantization_maxlen": 64, "seed": 42,
                      "export_size": 1, **NO_FLOOR}, LOG)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


# ---------------------------------------------------------------- chat in a pseudo-terminal


def read_until(fd, marker: str, timeout: float = 120) -> str:
    buf, end = b"", time.time() + timeout
    while marker.encode() not in buf:
        if time.time() > end:
            raise AssertionError(f"no {marker!r} in {buf.decode(errors='replace')!r}")
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            buf += chunk
    return buf.decode(errors="replace")


@pytest.mark.parametrize("which", ["folder", "gguf"])
def test_chat_holds_a_two_turn_conversation_in_a_terminal(merged, gguf_dir, which):
    from tuneline.chat import Chat

    target = str(merged) if which == "folder" else str(gguf_dir / "tiny-f32.gguf")
    q1, q2 = "Who are you?", "And what can you do?"
    expected = Chat(target, {"max_new_tokens": 6})
    first = expected.reply(q1)
    second = expected.reply(q2)
    expected.history = []
    alone = expected.reply(q2)
    assert second != alone  # the second answer depends on the first turn: a real test of history

    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tuneline.cli", "chat", target, "--max-new-tokens", "6"],
                            stdin=child_fd, stdout=child_fd, stderr=child_fd, cwd=REPO, close_fds=True)
    os.close(child_fd)
    try:
        read_until(main_fd, "You: ")
        os.write(main_fd, (q1 + "\n").encode())
        turn1 = read_until(main_fd, "You: ")
        os.write(main_fd, (q2 + "\n").encode())
        turn2 = read_until(main_fd, "You: ")
        os.write(main_fd, b"/clear\n")
        cleared = read_until(main_fd, "You: ")
        os.write(main_fd, (q2 + "\n").encode())
        turn3 = read_until(main_fd, "You: ")
        os.write(main_fd, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main_fd)
    clean = [t.replace("\r", "") for t in (turn1, turn2, turn3)]
    assert f"Assistant: {first}" in clean[0]
    assert f"Assistant: {second}" in clean[1]
    assert "(history cleared)" in cleared and f"Assistant: {alone}" in clean[2]


# ---------------------------------------------------------------- the rules in the pipeline


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    work = make_workdir(tmp_path_factory.mktemp("export-rules"), tiny_model, export_gguf_types=["f16", "q8_0"],
                        export_dir=str(tmp_path_factory.mktemp("user") / "my-export"), **NO_FLOOR)
    snakemake(work, "export", "results/export/bnb-8bit", check=True)
    return work


def test_export_rules_write_reports_and_copy_to_export_dir(exported):
    gguf = exported / "results" / "export" / "gguf"
    assert sorted(p.name for p in gguf.glob("*.gguf")) == ["model-f16.gguf", "model-q8_0.gguf"]
    for folder in (gguf, exported / "results" / "export" / "bnb-8bit"):
        assert json.loads((folder / "export_report.json").read_text())
        provenance = json.loads((folder / "provenance.json").read_text())
        assert "merged_model" in json.dumps(provenance["inputs"])
    cfg = json.loads((gguf / "provenance.json").read_text())["config"]
    assert set(cfg) == {"export_gguf_types", "export_name", "export_min_top1"}
    copied = Path(yaml.safe_load((exported / "tuneline.yaml").read_text())["export_dir"])
    assert (copied / "model-q8_0.gguf").read_bytes() == (gguf / "model-q8_0.gguf").read_bytes()


@pytest.mark.parametrize("key, value, expected", [
    ("export_gguf_types", "[f16]", {"export_gguf", "export"}),
    ("export_name", "tuna", {"export_gguf", "export"}),
    ("export_size", "2", {"export_bnb"}),
    ("export_min_top1", "0.01", {"export_gguf", "export_bnb", "export"}),
    ("export_quantization_nsamples", "8", set()),  # GPTQ only, not asked for here
    ("merge_tolerance", "0.05", {"merge", "export_gguf", "export_bnb", "export"}),
])
def test_an_export_key_reruns_only_its_export(exported, key, value, expected):
    assert planned_jobs(exported, "export", "results/export/bnb-8bit", "--config", f"{key}={value}") == expected


def test_export_format_bits_must_fit_the_format(exported):
    proc = snakemake(exported, "--dry-run", "export", "--config", "export_format=bnb", "export_quantization_bit=3")
    assert proc.returncode != 0 and "bnb takes export_quantization_bit 4 or 8" in proc.output
    proc = snakemake(exported, "--dry-run", "--config", "export_legacy_format=true")
    assert proc.returncode != 0 and "export_legacy_format" in proc.output and "safetensors" in proc.output


def test_bnb_floor_fails_the_rule_and_leaves_no_output(merged, tmp_path):
    import logging

    from tuneline import export_bnb
    from tuneline.config import rule_params
    from tuneline.rule import run_stage, staging_path

    final = tmp_path / "bnb-4bit"
    params = {**rule_params({"export_min_top1": 1.0}, "export_bnb"), "bits": 4}
    with pytest.raises(SystemExit):
        run_stage("export_bnb", export_bnb.main, {"model": str(merged)}, {"model": final},
                  {"model": staging_path(final)}, params, logging.getLogger("test"), str(tmp_path / "logs" / "x.log"))
    assert not final.exists() and not staging_path(final).exists()
    report = json.loads((tmp_path / "logs" / "x.failed" / "export_report.json").read_text())
    assert report["vs_merged_model"]["min_top1_agreement"] == 1.0
