"""base_model: every kind of source becomes a plain safetensors folder, or a clear error."""

import json
import logging

import pytest

from tuneline import base_model
from tuneline.errors import TunelineError

LOG = logging.getLogger("test")


def params(name):
    from tuneline.config import rule_params

    return rule_params({"model_name_or_path": name}, "base_model")  # the slice the rule gets


def test_local_folder_is_copied_as_safetensors_with_its_hash(tmp_path, tiny_model):
    out = tmp_path / "base"
    base_model.main({}, {"model": str(out)}, params(str(tiny_model)), LOG)
    source = json.loads((out / "source.json").read_text())
    assert source["kind"] == "folder" and len(source["sha256"]) == 64
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin"))


def test_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunelineError, match="could not download 'some-org/some-model'.*local model folder or .gguf"):
        base_model.main({}, {"model": str(tmp_path / "b")}, params("some-org/some-model"), LOG)


@pytest.mark.parametrize("name, message", [
    ("./models/nothing-here", "model path './models/nothing-here'.*does not exist"),
    ("/abs/model.gguf", "does not exist"),
])
def test_missing_paths(tmp_path, name, message):
    with pytest.raises(TunelineError, match=message):
        base_model.main({}, {"model": str(tmp_path / "b")}, params(name), LOG)


def test_wrong_kinds_of_local_path(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(TunelineError, match="not a .gguf"):
        base_model.resolve_source(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelineError, match="no config.json"):
        base_model.resolve_source(str(tmp_path / "empty"))
