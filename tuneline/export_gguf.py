"""Rule `export_gguf`: the merged model as GGUF files for llama.cpp, Ollama and LM Studio.

Written with the `gguf` package (no llama.cpp build): weights in each of `export_gguf_types`,
the byte-level BPE vocabulary and merges, special token ids and the chat template in the
metadata, and an Ollama `Modelfile` with the training template. Every file is then loaded back
with transformers' GGUF loader (and llama-cpp-python when it is installed) and compared with
the merged model; export_report.json holds the figures and the rule fails when a file is
outside its type's tolerance (TOLERANCE below).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import TunelineError
from .modeling import load_for_inference, set_threads
from .templates import load_template
from .verify import CHECK_PROMPTS, behaviour, compare_behaviour, prompt_ids, same_answers

# HF model_type -> (gguf architecture, whether q/k rows get llama.cpp's rotary permutation)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}

# type -> (tensor type for 2-D weights, llama.cpp file type)
TYPES = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# Below 8 bits the token embedding / output matrix stays Q8_0, as llama.cpp's own quantizer does.
LOW_BIT = {"q5_1", "q5_0", "q4_1", "q4_0"}

# The least a file must keep of the merged model's behaviour: top-1 next-token agreement on the
# check prompts. Measured on SmolLM2-135M: f16 1.0, q8_0 1.0, q4_0 ~0.5 (small models suffer most).
TOLERANCE = {"f32": 0.99, "f16": 0.95, "bf16": 0.9, "q8_0": 0.85, "q5_1": 0.4, "q5_0": 0.4, "q4_1": 0.3, "q4_0": 0.3}


def permute_rotary(w, n_head: int):
    """HF stores q/k rows with the rotary halves split; llama.cpp wants them interleaved per head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise TunelineError(f"export_gguf: rope scaling '{kind}' is not supported yet (model_type "
                            f"{config.model_type}); export with the merged model folder instead.")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_hparams(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def vocabulary(model_dir: Path, tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp's token types; the embedding rows beyond the tokenizer are [PADn]."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model, decoder = spec.get("model", {}), spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise TunelineError(
            f"export_gguf supports byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen); "
            f"{model_dir / 'tokenizer.json'} has a {model.get('type')} model with a {decoder.get('type')} decoder."
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types]


def tensor_type(gguf_name: str, data, kind: str, log):
    import gguf

    qtype = gguf.GGMLQuantizationType[TYPES[kind][0]]
    if data.ndim < 2 or gguf_name.endswith("_norm.weight") or gguf_name.endswith(".bias"):
        return gguf.GGMLQuantizationType.F32
    if kind in LOW_BIT and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        log.info("%s: rows of %d values do not split into %s blocks of %d: stored as F16",
                 gguf_name, data.shape[-1], qtype.name, block)
        return gguf.GGMLQuantizationType.F16
    return qtype


def write_gguf(path: Path, model, tokenizer, model_dir: Path, kind: str, name: str, tokenizer_pre: str, log) -> dict:
    import gguf
    import numpy as np

    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise TunelineError(f"export_gguf: model_type '{config.model_type}' is not supported; supported: "
                            f"{', '.join(sorted(ARCHITECTURES))}.")
    arch_name, permute = ARCHITECTURES[config.model_type]
    arch = gguf.MODEL_ARCH[arch_name]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[TYPES[kind][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, config)

    tokens, types = vocabulary(model_dir, tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)  # merges, bos/eos/pad/unk ids, add_bos_token, chat_template

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TunelineError(f"export_gguf: no GGUF name for tensor '{hf_name}' of a {config.model_type} model.")
        data = tensor.detach().float().cpu().numpy()
        if permute and hf_name.endswith("self_attn.q_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads)
        elif permute and hf_name.endswith("self_attn.k_proj.weight"):
            data = permute_rotary(data, config.num_key_value_heads)
        qtype = tensor_type(gguf_name, data, kind, log)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"tensor_types": counts, "bytes": path.stat().st_size}


def tokenizer_pre(base_source: dict, tokenizer, config, log) -> str:
    """llama.cpp's pre-tokenizer name: kept from a GGUF source, else known families, else 'default'."""
    if base_source.get("gguf_tokenizer_pre"):
        return base_source["gguf_tokenizer_pre"]
    if config.model_type == "qwen2":
        return "qwen2"
    if len(tokenizer) >= 128000 and "<|eot_id|>" in tokenizer.get_vocab():
        return "llama-bpe"
    log.warning("unknown pre-tokenizer family: the GGUF says 'default'; llama.cpp may split words "
                "differently from the HF tokenizer (the llama-cpp check below shows it when installed)")
    return "default"


# ---------------------------------------------------------------- Ollama


def go_literal(text: str) -> str:
    """Literal text inside a Go template: only `{{` needs quoting."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(p: dict) -> str:
    return (
        go_literal(p["prefix"])
        + "{{ if .System }}" + go_literal(p["system_pre"]) + "{{ .System }}" + go_literal(p["system_post"]) + "{{ end }}"
        + "{{ range .Messages }}{{ if eq .Role \"user\" }}"
        + go_literal(p["user_pre"]) + "{{ .Content }}" + go_literal(p["user_post"])
        + "{{ else if eq .Role \"assistant\" }}"
        + go_literal(p["assistant_pre"]) + "{{ .Content }}" + go_literal(p["assistant_post"])
        + "{{ end }}{{ end }}"
    )


def modelfile(gguf_name: str, template, stop_words: list[str]) -> str:
    p = template.pieces()
    system = template.default_system or p["default_system"]
    lines = ["# ollama create <name> -f Modelfile && ollama run <name>", f"FROM ./{gguf_name}",
             f'TEMPLATE """{ollama_template(p)}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{w}"' for w in stop_words]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- verification


def metadata_check(path: Path, tokenizer, n_tokens: int) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key):
        f = reader.get_field(key)
        return f.contents() if f is not None else None

    found = {
        "tokens": len(reader.get_field("tokenizer.ggml.tokens").data),
        "merges": len(reader.get_field("tokenizer.ggml.merges").data) if reader.get_field("tokenizer.ggml.merges") else 0,
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "chat_template_matches": field("tokenizer.chat_template") == tokenizer.chat_template,
    }
    problems = []
    if found["tokens"] != n_tokens:
        problems.append(f"{found['tokens']} tokens instead of {n_tokens}")
    if not found["merges"]:
        problems.append("no BPE merges")
    if found["eos_token_id"] != tokenizer.eos_token_id:
        problems.append(f"eos id {found['eos_token_id']} instead of {tokenizer.eos_token_id}")
    if tokenizer.chat_template and not found["chat_template_matches"]:
        problems.append("chat template differs from the merged model's")
    found["problems"] = problems
    return found


def hf_check(path: Path, reference: dict, template, tokenizer) -> dict:
    """Load the file with transformers' GGUF loader and compare behaviour and tokenization."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [tokenizer.decode(ids) for ids in prompt_ids(template)]
    same_ids = all(gguf_tok.encode(t, add_special_tokens=False) == tokenizer.encode(t, add_special_tokens=False)
                   for t in texts)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return {"tokenizer_matches": same_ids, **compare_behaviour(reference, model, template, tokenizer)}


def llama_cpp_check(path: Path, reference: dict, template, tokenizer) -> dict | None:
    """llama.cpp itself (llama-cpp-python, optional): same prompt tokens and greedy answers."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0)
    stops = set(template.stop_token_ids())
    try:
        rows = prompt_ids(template)
        same_ids = all(llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
                       for ids in rows)
        answer_ids = []
        for ids in rows:
            llm.reset()
            new = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                if token in stops or len(new) == 24:
                    break
                new.append(token)
            answer_ids.append(new)
        completion = llm.create_completion(rows[0], max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
        # a chat request renders with the chat template stored in the file, as llama.cpp-based apps do
        chat = llm.create_chat_completion(messages=[{"role": "user", "content": CHECK_PROMPTS[0]}], max_tokens=24,
                                          temperature=0.0, top_k=1)["choices"][0]["message"]["content"]
    finally:
        llm.close()
    return {"tokenizer_matches": same_ids, "same_greedy_answers": same_answers(answer_ids, reference),
            "answers": [tokenizer.decode(i, skip_special_tokens=True).strip() for i in answer_ids],
            "chat_answer": chat.strip(), "chat_template_renders_like_training": chat.strip() == completion.strip()}


def main(inputs, outputs, params, log, threads=1):
    import torch
    from transformers import AutoTokenizer

    set_threads(threads)
    kinds = params["export_gguf_types"]
    unknown = [k for k in kinds if k not in TYPES]
    if unknown or not kinds:
        raise TunelineError(f"export_gguf_types {kinds}: {', '.join(unknown) or 'empty list'} not supported; "
                            f"choose from {', '.join(TYPES)}.")
    model_dir = Path(inputs["model"])
    model = load_for_inference(model_dir, "the GGUF export")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = load_template(model_dir, tokenizer)
    source = json.loads((Path(inputs["base"]) / "source.json").read_text())
    pre = tokenizer_pre(source, tokenizer, model.config, log)
    reference = behaviour(model, template, tokenizer)

    out = Path(outputs["gguf"])
    out.mkdir(parents=True, exist_ok=True)
    name = params["export_name"]
    report = {"model": str(model_dir), "tokenizer_pre": pre, "files": {}, "merged_answers": reference["answers"]}
    failures = []
    for kind in kinds:
        path = out / f"{name}-{kind}.gguf"
        log.info("writing %s", path)
        written = write_gguf(path, model, tokenizer, model_dir, kind, name, pre, log)
        meta = metadata_check(path, tokenizer, model.config.vocab_size)
        log.info("reloading %s with transformers' GGUF loader", path.name)
        with torch.no_grad():
            hf = hf_check(path, reference, template, tokenizer)
        min_top1 = TOLERANCE[kind] if params["export_min_top1"] is None else params["export_min_top1"]
        entry = {**written, "metadata": meta, "transformers": hf, "min_top1_agreement": min_top1}
        cpp = llama_cpp_check(path, reference, template, tokenizer)
        entry["llama_cpp"] = cpp if cpp is not None else "llama-cpp-python not installed (pip install '.[gguf]')"
        report["files"][path.name] = entry
        log.info("%s: %.1f MB, top-1 agreement %.0f%% (min %.0f%%), max |logit diff| %.3g, greedy answers %s%s",
                 path.name, written["bytes"] / 1e6, 100 * hf["top1_agreement"], 100 * min_top1,
                 hf["max_abs_logit_diff"], hf["same_greedy_answers"],
                 f", llama.cpp answers {cpp['same_greedy_answers']}" if cpp else "")
        if meta["problems"]:
            failures.append(f"{path.name}: " + "; ".join(meta["problems"]))
        if not hf["tokenizer_matches"]:
            failures.append(f"{path.name}: its tokenizer splits the check prompts differently")
        if hf["top1_agreement"] < min_top1:
            failures.append(f"{path.name}: top-1 agreement {hf['top1_agreement']:.2f} < {min_top1} (export_min_top1)")
        if cpp is not None and not cpp["tokenizer_matches"]:
            failures.append(f"{path.name}: llama.cpp tokenizes the check prompts differently")
        if cpp is not None and not cpp["chat_template_renders_like_training"]:
            failures.append(f"{path.name}: llama.cpp's chat (the file's chat template) prompts unlike training")
    first = f"{name}-{kinds[0]}.gguf"
    try:
        (out / "Modelfile").write_text(modelfile(first, template, [tokenizer.convert_ids_to_tokens(i)
                                                                    for i in template.stop_token_ids()]))
        report["modelfile"] = {"from": first}
    except TunelineError as err:  # e.g. llama2/mistral/gemma: the system prompt sits inside the first user turn
        log.warning("no Ollama Modelfile: %s The GGUF file's own chat template still renders as in training.", err)
        report["modelfile"] = {"skipped": str(err)}
    shutil.copy(model_dir / "template.json", out / "template.json")  # `tuneline chat <file>.gguf` renders as in training
    (out / "export_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if failures:
        raise TunelineError("GGUF verification failed: " + " | ".join(failures) + f" (see {out / 'export_report.json'}).")
    return {"export_report": {k: {"top1_agreement": v["transformers"]["top1_agreement"], "bytes": v["bytes"]}
                              for k, v in report["files"].items()}}
