"""prepare_data reads LLaMA-Factory registries and data as they are, and counts what it drops."""

import json
import logging

import pytest

from conftest import LF_DATA, REPO
from tuneline import prepare_data as pd_
from tuneline import records as rec
from tuneline.errors import TunelineError
from tuneline.registry import selected_entries

LOG = logging.getLogger("test")


def run(tmp_path, registry, files, dataset, **params):
    data = tmp_path / "in"
    data.mkdir(exist_ok=True)
    (data / "dataset_info.json").write_text(json.dumps(registry))
    for name, content in files.items():
        path = data / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    out = tmp_path / "out"
    cfg = dict(dataset_dir=str(data), max_samples=None, val_size=0.0, seed=42, identity_name="Tuna",
               identity_author="Tuneline", stage="sft", entries=selected_entries(str(data), dataset))
    cfg.update(params)
    result = pd_.main(inputs={}, outputs={"data": str(out)}, params=cfg, log=LOG)
    read = lambda split: [json.loads(l) for l in (out / f"{split}.jsonl").read_text().splitlines()]
    return read("train"), read("validation"), result["stats"]


def test_alpaca_with_input_history_and_system(tmp_path):
    records = [{"instruction": "Translate", "input": "hello", "output": "bonjour", "sys": "Be exact.",
                "hist": [["hi", "salut"]]}]
    entry = {"file_name": "a.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                 "system": "sys", "history": "hist"}}
    train, _, _ = run(tmp_path, {"a": entry}, {"a.json": records}, "a")
    assert train == [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "salut"},
                                   {"role": "user", "content": "Translate\nhello"},
                                   {"role": "assistant", "content": "bonjour"}],
                      "system": "Be exact.", "tools": "", "dataset": "a"}]


def test_columns_object_replaces_defaults_like_llamafactory(tmp_path):
    # a `columns` object without `query` drops the input column, as in LLaMA-Factory
    records = [{"instruction": "Translate", "input": "hello", "output": "bonjour"}]
    entry = {"file_name": "a.json", "columns": {"prompt": "instruction", "response": "output"}}
    train, _, _ = run(tmp_path, {"a": entry}, {"a.json": records}, "a")
    assert train[0]["messages"][0]["content"] == "Translate"


def test_openai_style_messages_with_system_and_broken_examples(tmp_path, caplog):
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    good = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                         {"role": "assistant", "content": "A"}]}
    broken = {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}
    entry = {"file_name": "c.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags}
    with caplog.at_level(logging.WARNING, logger="test"):
        train, _, stats = run(tmp_path, {"c": entry}, {"c.jsonl": "\n".join(json.dumps(r) for r in (good, broken))}, "c")
    assert train[0]["system"] == "S" and [m["role"] for m in train[0]["messages"]] == ["user", "assistant"]
    assert stats["invalid"] == 1 and "dropped 1 of 2" in caplog.text


def test_sharegpt_tool_calls(tmp_path):
    conv = {"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{}"},
                              {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
            "tools": "[{\"name\": \"weather\"}]"}
    entry = {"file_name": "t.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}
    train, _, _ = run(tmp_path, {"t": entry}, {"t.json": [conv]}, "t")
    assert [m["role"] for m in train[0]["messages"]] == ["user", "function", "observation", "assistant"]
    assert train[0]["tools"] == conv["tools"]


def test_csv_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"instruction": ["q1", "q2"], "input": ["", ""], "output": ["a1", "a2"]})
    frame.to_csv(tmp_path / "x.csv", index=False)
    frame.to_parquet(tmp_path / "x.parquet")
    registry = {"c": {"file_name": "x.csv"}, "p": {"file_name": "x.parquet"}}
    files = {"x.csv": (tmp_path / "x.csv").read_bytes(), "x.parquet": (tmp_path / "x.parquet").read_bytes()}
    train, _, stats = run(tmp_path, registry, files, "c,p")
    # the same four examples from both files are exact duplicates: counted, not silently kept
    assert len(train) == 2 and stats["duplicates"] == 2


def test_placeholders_max_samples_and_split(tmp_path, caplog):
    records = [{"instruction": f"q{i}", "input": "", "output": "I am {{name}} by {{author}}."} for i in range(20)]
    with caplog.at_level(logging.INFO, logger="test"):
        train, val, stats = run(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records}, "d",
                                max_samples=10, val_size=0.2)
    assert "max_samples=10 keeps the first 10 of 20" in caplog.text
    assert len(train) == 8 and len(val) == 2 and stats["cut_by_max_samples"] == 10
    assert {m["content"] for ex in train for m in ex["messages"] if m["role"] == "assistant"} == {"I am Tuna by Tuneline."}
    prompts = sorted(ex["messages"][0]["content"] for ex in train + val)
    assert prompts == sorted(f"q{i}" for i in range(10))
    # the split depends on the seed, and only on it
    _, val_again, _ = run(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records}, "d", max_samples=10, val_size=0.2)
    _, val_other, _ = run(tmp_path, {"d": {"file_name": "d.json"}}, {"d.json": records}, "d", max_samples=10,
                          val_size=0.2, seed=1)
    assert val_again == val and val_other != val


def test_bundled_identity_data():
    records = json.loads((REPO / "resources" / "identity.json").read_text())
    assert len(records) >= 80
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in r["instruction"]) for r in records) >= 30
    assert all("{{name}}" in r["output"] or "{{author}}" in r["output"] for r in records)


lf = pytest.mark.skipif(not (LF_DATA / "dataset_info.json").is_file(), reason="../shared/lf-data is absent")


@lf
@pytest.mark.parametrize("name, at_least", [("identity", 80), ("alpaca_en_demo", 900), ("alpaca_zh_demo", 900),
                                            ("glaive_toolcall_en_demo", 250)])
def test_llamafactory_demo_data_as_is(name, at_least):
    entry = selected_entries(str(LF_DATA), name)[name]
    records = rec.load_records(name, entry, str(LF_DATA), LOG)
    examples = rec.convert(name, entry, records, LOG)
    assert len(examples) >= at_least
    assert all(ex["messages"][-1]["role"] == "assistant" for ex in examples)


@lf
def test_llamafactory_entries_we_cannot_use_fail_clearly():
    entry = selected_entries(str(LF_DATA), "dpo_en_demo")["dpo_en_demo"]
    with pytest.raises(TunelineError, match="preference dataset"):
        rec.convert("dpo_en_demo", entry, rec.load_records("dpo_en_demo", entry, str(LF_DATA), LOG), LOG)
    with pytest.raises(TunelineError, match="mllm_demo.*does not exist"):
        from tuneline.registry import data_files
        data_files(str(LF_DATA), selected_entries(str(LF_DATA), "mllm_demo"))


def test_preference_pairs_in_alpaca_and_sharegpt_layouts(tmp_path):
    registry = {
        "pa": {"file_name": "pa.json", "ranking": True,
               "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        "ps": {"file_name": "ps.json", "ranking": True, "formatting": "sharegpt",
               "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    }
    files = {
        "pa.json": [{"instruction": "Name {{name}}", "input": "now", "chosen": "I am {{name}}.", "rejected": "No."},
                    {"instruction": "bad", "chosen": "text", "rejected": None}],
        "ps.json": [{"conversations": [{"from": "human", "value": "Hi"}],
                     "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go."}},
                    {"conversations": [{"from": "human", "value": "Hi"}],
                     "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "human", "value": "B"}}],
    }
    rows, _, stats = run(tmp_path, registry, files, "pa,ps", stage="dpo")
    assert [r["messages"] for r in rows] == [
        [{"role": "user", "content": "Name Tuna\nnow"}, {"role": "assistant", "content": "I am Tuna."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    assert [r["rejected"] for r in rows] == ["No.", "Go."]
    assert stats["invalid"] == 2  # a null rejected answer; a rejected turn with the user's role
    with pytest.raises(TunelineError, match="'pa' is a preference dataset .* stage sft cannot use it"):
        run(tmp_path, registry, files, "pa")
