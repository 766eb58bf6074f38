"""The loss history of a training run: the curve (loss.png) and the whole run's mean loss."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if train:
        ax.plot(*zip(*train), marker=".", label="training loss")
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if evals:
        ax.plot(*zip(*evals), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def whole_run_loss(history: list[dict], fallback):
    """Mean training loss over every step of a run, from the logged window means (each weighted by
    the steps it covers); the checkpoint restores the log history of the steps before a resume."""
    total = steps = previous = 0
    for entry in history:
        if "loss" in entry:
            width = entry["step"] - previous
            total, steps, previous = total + entry["loss"] * width, steps + width, entry["step"]
    return total / steps if steps else fallback


LIVE = "loss.jsonl"  # in the run's checkpoint folder, while it trains


def live_loss_callback(path: Path):
    """A TrainerCallback that appends each logged step ({step, loss | eval_loss, ...}) to `path` as one JSON
    line as soon as the Trainer logs it, so the board (or `tail -f`) draws the curve during training;
    loss_history.json in the output is the whole history at the end."""
    import json

    from transformers import TrainerCallback

    class LiveLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return LiveLoss()


def read_live(path: Path) -> list[dict]:
    """The lines written so far (a line cut off mid-write is skipped)."""
    import json

    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines() if Path(path).is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
