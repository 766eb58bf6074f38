# Evaluation: downstream of merge and of base_model, so every score has its baseline beside it.
# Changing an evaluation key reruns only these rules.

MODEL_DIRS = {"base": "results/base_model", "tuned": "results/merged_model"}


wildcard_constraints:
    model="base|tuned",


rule predict:
    """Generations for the eval split, rendered with the training template."""
    input:
        model=lambda wildcards: MODEL_DIRS[wildcards.model],
        data=eval_split,
        tokenized="results/tokenized",
    output:
        predictions="results/eval/{model}/generated_predictions.jsonl",
    log:
        "logs/predict_{model}.log",
    benchmark:
        "results/benchmarks/predict_{model}.tsv"
    resources:
        **resources_for("predict"),
    threads: threads_for("predict")
    params:
        cfg=params_for("predict"),
    script:
        "../../scripts/predict.py"


rule score_generation:
    """BLEU-4 and ROUGE-1/2/L (sacrebleu, rouge-score; CJK-aware)."""
    input:
        predictions="results/eval/{model}/generated_predictions.jsonl",
    output:
        scores="results/eval/{model}/predict_results.json",
    log:
        "logs/score_generation_{model}.log",
    benchmark:
        "results/benchmarks/score_generation_{model}.tsv"
    resources:
        **resources_for("score_generation"),
    threads: threads_for("score_generation")
    params:
        cfg=params_for("score_generation"),
    script:
        "../../scripts/score_generation.py"


rule mmlu:
    """Multiple-choice accuracy (MMLU / C-Eval / CMMLU layout) per subject and category."""
    input:
        model=lambda wildcards: MODEL_DIRS[wildcards.model],
    output:
        scores="results/eval/{model}/mmlu.json",
    log:
        "logs/mmlu_{model}.log",
    benchmark:
        "results/benchmarks/mmlu_{model}.tsv"
    resources:
        **resources_for("mmlu"),
    threads: threads_for("mmlu")
    params:
        cfg=params_for("mmlu"),
    script:
        "../../scripts/mmlu.py"


rule reward_accuracy:
    """A reward model's pairwise accuracy (stage rm): chosen scored above rejected on the eval split."""
    input:
        model=lambda wildcards: MODEL_DIRS[wildcards.model],
        tokenized="results/tokenized",
    output:
        scores="results/eval/{model}/reward_accuracy.json",
    log:
        "logs/reward_accuracy_{model}.log",
    benchmark:
        "results/benchmarks/reward_accuracy_{model}.tsv"
    resources:
        **resources_for("reward_accuracy"),
    threads: threads_for("reward_accuracy")
    params:
        cfg=params_for("reward_accuracy"),
    script:
        "../../scripts/reward_accuracy.py"


EVALUATION_OUTPUTS = {  # what each evaluation of a stage's EVALUATION writes, per model
    "generation": "predict_results.json",
    "mmlu": "mmlu.json",
    "pairwise": "reward_accuracy.json",
}


rule eval_summary:
    """Base vs tuned, side by side, with the delta."""
    input:
        # the stage says which evaluations apply (pt: no responses to score; rm: pairwise accuracy only)
        **{f"{model}_{kind}": f"results/eval/{model}/{EVALUATION_OUTPUTS[kind]}"
           for kind in stages.get(config["stage"]).EVALUATION for model in ("base", "tuned")},
    output:
        markdown=report("results/eval/summary.md", caption="../../report/summary.rst", category="Evaluation"),
        json="results/eval/summary.json",
    log:
        "logs/eval_summary.log",
    benchmark:
        "results/benchmarks/eval_summary.tsv"
    resources:
        **resources_for("eval_summary"),
    threads: threads_for("eval_summary")
    params:
        cfg=params_for("eval_summary"),
    script:
        "../../scripts/eval_summary.py"


rule evaluate:
    """Target: every evaluation of base and tuned."""
    default_target: False
    input:
        "results/eval/summary.md",
