# Exports: downstream of results/merged_model, one rule per format. Each reloads what it wrote,
# compares it with the merged model and records the figures in export_report.json.
# Changing an export key reruns only the export rules that read it.


wildcard_constraints:
    bnb_bits="4|8",
    gptq_bits="2|3|4|8",


rule export_gguf:
    """GGUF files (export_gguf_types) with tokenizer and chat template, an Ollama Modelfile."""
    input:
        model="results/merged_model",
        base="results/base_model",  # source.json: the GGUF pre-tokenizer name of a GGUF base
    output:
        gguf=directory("results/export/gguf"),
    log:
        "logs/export_gguf.log",
    benchmark:
        "results/benchmarks/export_gguf.tsv"
    resources:
        **resources_for("export_gguf"),
    threads: threads_for("export_gguf")
    params:
        cfg=params_for("export_gguf"),
    script:
        "../../scripts/export_gguf.py"


rule export_bnb:
    """bitsandbytes 4-bit (quantization_type) or 8-bit safetensors, reloaded and compared."""
    input:
        model="results/merged_model",
    output:
        model=directory("results/export/bnb-{bnb_bits}bit"),
    log:
        "logs/export_bnb-{bnb_bits}bit.log",
    benchmark:
        "results/benchmarks/export_bnb-{bnb_bits}bit.tsv"
    resources:
        **resources_for("export_bnb"),
    threads: threads_for("export_bnb")
    params:
        cfg=params_for("export_bnb"),
        bits=lambda wildcards: int(wildcards.bnb_bits),
    script:
        "../../scripts/export_bnb.py"


rule export_gptq:
    """GPTQ with a seeded calibration set from the registry (CUDA only)."""
    input:
        model="results/merged_model",
        # the training split, unless export_quantization_dataset names registry datasets
        data=[] if config["export_quantization_dataset"] else "results/data",
        files=CALIBRATION_FILES,
    output:
        model=directory("results/export/gptq-{gptq_bits}bit"),
    log:
        "logs/export_gptq-{gptq_bits}bit.log",
    benchmark:
        "results/benchmarks/export_gptq-{gptq_bits}bit.tsv"
    resources:
        **resources_for("export_gptq"),
    threads: threads_for("export_gptq")
    params:
        cfg=params_for("export_gptq"),
        bits=lambda wildcards: int(wildcards.gptq_bits),
        entries=CALIBRATION_ENTRIES,
    script:
        "../../scripts/export_gptq.py"


def chosen_export(wildcards=None):
    fmt, bits = config["export_format"], config["export_quantization_bit"]
    return {"gguf": "results/export/gguf", "bnb": f"results/export/bnb-{bits}bit",
            "gptq": f"results/export/gptq-{bits}bit", "merged": "results/merged_model"}[fmt]


if config["export_format"] == "bnb" and config["export_quantization_bit"] not in (4, 8):
    raise WorkflowError(f"export_format: bnb takes export_quantization_bit 4 or 8, not "
                        f"{config['export_quantization_bit']} (2 and 3 bits are GPTQ only).")


if config["export_dir"]:
    from tuneline.export import check_target

    try:  # before any job: Snakemake empties an output folder before its job runs
        EXPORT_DIR = check_target(config["export_dir"], roots=[workflow.basedir, os.getcwd()],
                                  owned=["results", "logs", ".snakemake", ".tuneline", config["dataset_dir"]]
                                  + [os.path.join(workflow.basedir, d) for d in ("resources", "config", "workflow",
                                                                                 "scripts", "tuneline", "tests")])
    except TunelineError as err:
        raise WorkflowError(str(err)) from None

    rule export:
        """The export_format result, copied to export_dir."""
        input:
            chosen=chosen_export(),
        output:
            export=directory(EXPORT_DIR),
        log:
            "logs/export.log",
        benchmark:
            "results/benchmarks/export.tsv"
        resources:
            **resources_for("export"),
        threads: threads_for("export")
        params:
            cfg=params_for("export"),
        script:
            "../../scripts/export.py"

else:

    rule export:
        """The export_format result (set export_dir to copy it elsewhere)."""
        input:
            chosen_export(),
