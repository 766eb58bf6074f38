"""Supervised encoding: LLaMA-Factory's length budget and label masking."""

import pytest

from tuneline.templates import get_template
from tuneline.encoding import IGNORE_INDEX, infer_seqlen
from tuneline.stages.sft import encode_supervised

EXAMPLE = {"system": "", "tools": "", "messages": [
    {"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "I am Tuna."},
    {"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "The Tuneline project."}]}


@pytest.mark.parametrize("src, tgt, cutoff, expected", [
    (10, 10, 100, (10, 10)),   # fits
    (100, 10, 50, (40, 10)),   # short target kept whole, prompt cut
    (10, 100, 50, (10, 40)),   # short prompt kept whole, response cut
    (60, 40, 50, (30, 20)),    # both long: split in proportion
])
def test_infer_seqlen(src, tgt, cutoff, expected):
    assert infer_seqlen(src, tgt, cutoff) == expected


def pieces(tokenizer, name=None):
    template = get_template(name, tokenizer)
    return template, template.encode_turns(EXAMPLE["messages"])


def test_prompt_is_masked_and_response_learned(tokenizer):
    template, turns = pieces(tokenizer)
    ids, labels, truncated = encode_supervised(template, EXAMPLE, 1024, False, False)
    (s1, t1), (s2, t2) = turns
    assert ids == s1 + t1 + s2 + t2 and not truncated
    assert labels == [IGNORE_INDEX] * len(s1) + t1 + [IGNORE_INDEX] * len(s2) + t2
    # the response's end-of-turn token is learned, so the model learns to stop
    assert labels[-2] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_train_on_prompt_learns_everything(tokenizer):
    template, _ = pieces(tokenizer)
    ids, labels, _ = encode_supervised(template, EXAMPLE, 1024, True, False)
    assert labels == ids


def test_mask_history_learns_only_the_last_turn(tokenizer):
    template, ((s1, t1), (s2, t2)) = pieces(tokenizer)
    ids, labels, _ = encode_supervised(template, EXAMPLE, 1024, False, True)
    assert ids == s1 + t1 + s2 + t2
    assert labels == [IGNORE_INDEX] * (len(s1) + len(t1) + len(s2)) + t2


def test_truncation_respects_cutoff_and_is_reported(tokenizer):
    template, turns = pieces(tokenizer)
    full = sum(len(s) + len(t) for s, t in turns)
    ids, labels, truncated = encode_supervised(template, EXAMPLE, full - 5, False, False)
    assert truncated and len(ids) == len(labels) <= full - 5
    # mask_history gives the last turn the budget first: it survives whole
    s2, t2 = turns[1]
    ids, labels, _ = encode_supervised(template, EXAMPLE, len(s2) + len(t2), False, True)
    assert ids == s2 + t2


def test_efficient_eos_template_appends_eos(tokenizer):
    template = get_template("fewshot", tokenizer)
    ids, labels, _ = encode_supervised(template, EXAMPLE, 1024, False, False)
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("stage,dataset", [("sft", "alpaca_en_demo"), ("dpo", "dpo_en_demo")])
def test_tokenize_in_worker_processes_writes_the_same_rows(tmp_path, tiny_model, stage, dataset, caplog):
    """The job's threads (data_job_cpus; LLaMA-Factory's preprocessing_num_workers) encode in forked processes:
    the same rows in the same order, byte for byte, as one process."""
    import logging

    import datasets

    from conftest import LF_DATA
    from tuneline import encoding, prepare_data, tokenize
    from tuneline.config import rule_params
    from tuneline.registry import selected_entries

    log = logging.getLogger("t")
    params = rule_params({"dataset_dir": str(LF_DATA), "dataset": dataset, "stage": stage, "val_size": 0}, "prepare_data")
    params["entries"] = selected_entries(params["dataset_dir"], params["dataset"])
    prepare_data.main({}, {"data": str(tmp_path / "data")}, params, log)
    tok_params = rule_params({"cutoff_len": 64, "stage": stage}, "tokenize")
    out = {}
    for threads in (1, 2):
        with caplog.at_level(logging.INFO):
            tokenize.main({"data": str(tmp_path / "data"), "model": str(tiny_model)},
                          {"tokenized": str(tmp_path / f"tok{threads}")}, tok_params, log, threads=threads)
        out[threads] = datasets.load_from_disk(str(tmp_path / f"tok{threads}" / "train")).to_dict()
    assert out[1] == out[2] and len(next(iter(out[1].values()))) >= 2 * encoding.MIN_CHUNK
    assert "examples encoded in 2 processes" in caplog.text
    assert (tmp_path / "tok1" / "stats.json").read_text() == (tmp_path / "tok2" / "stats.json").read_text()
