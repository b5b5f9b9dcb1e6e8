"""Loss curves from the Trainer's log history."""

from __future__ import annotations

import os


def smooth(values: list[float]) -> list[float]:
    """A centred moving average over about 5% of the points: it follows the curve without the lag
    of an exponential average (windows shrink at the ends)."""
    n = len(values)
    half = max(1, n // 40)
    out = []
    for i in range(n):
        window = values[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def plot_loss(log_history: list[dict], output_dir: str, name: str = "training_loss.png") -> str | None:
    """Write the training loss (raw and smoothed) and the eval loss, when logged; None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, alpha=0.35, color="tab:blue", label="train loss")
        ax.plot(steps, smooth(list(losses)), color="tab:blue", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"Training loss — {os.path.basename(os.path.abspath(output_dir))}")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl")


def plot_rewards(log_history: list[dict], output_dir: str, name: str = "training_rewards.png") -> str | None:
    """Preference runs: the logged rewards (chosen, rejected, margins; KTO's kl) and the pair accuracy, per step;
    None if none was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(h["step"], h[k]) for h in log_history if k in h and "step" in h and "loss" in h]
              for k in REWARD_KEYS}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, points in series.items():
        steps, values = zip(*points)
        (right if k == "rewards/accuracies" else left).plot(steps, values, label=k)
    left.set_xlabel("step")
    left.set_ylabel("reward")
    left.legend()
    right.set_xlabel("step")
    right.set_ylabel("share of pairs with chosen reward > rejected")
    right.set_ylim(-0.05, 1.05)
    fig.suptitle(f"Preference rewards — {os.path.basename(os.path.abspath(output_dir))}")
    fig.tight_layout()
    path = os.path.join(output_dir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
