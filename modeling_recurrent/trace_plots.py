"""Figures of `recurrent-depth trace`: convergence heatmap, per-token PCA trajectories, steps-to-exit histogram.

Each function draws one figure of a `trace.Trajectory` into one PNG (matplotlib, Agg backend) and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .generation_recurrent_depth import EXIT_CRITERIA

if TYPE_CHECKING:
    from .trace import Trajectory

MAX_PAIRS = 3  # PCA panels per token: PC1-PC2, PC3-PC4, PC5-PC6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(index: int, text: str) -> str:
    return f"{index}: {text!r}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_convergence(traj: Trajectory, texts: list[str], path: Path) -> Path:
    """Token x step heatmap of log10 ||s_i - s_{i-1}|| / ||s_i||, the latent-diff exit step marked per token."""
    plt = _pyplot()
    values = traj.relative_change.clamp_min(1e-12).log10().T.numpy()  # (T, N)
    length, steps = values.shape
    fig, ax = plt.subplots(figsize=(min(4 + steps / 8, 16), min(2 + length / 4, 20)))
    image = ax.imshow(
        values, aspect="auto", cmap="magma", interpolation="nearest", extent=(0.5, steps + 0.5, length - 0.5, -0.5)
    )
    fig.colorbar(image, ax=ax, label="log10 relative change ||s_i - s_(i-1)|| / ||s_i||")
    exited = traj.exited.get("latent-diff")
    if exited is not None and exited.any():
        rows = exited.nonzero()[:, 0]
        exit_step = traj.exit_steps["latent-diff"]  # exit_steps has the criteria of exited
        ax.scatter(exit_step[rows].numpy(), rows.numpy(), marker="|", color="cyan", s=60, label="latent-diff exit")
        ax.legend(loc="upper right", fontsize=7)
    stride = max(1, length // 60)
    ax.set_yticks(range(0, length, stride), [_label(i, texts[i]) for i in range(0, length, stride)], fontsize=7)
    ax.set_xlabel("recurrence step i")
    ax.set_ylabel("token")
    ax.set_title("Convergence of the latent state per token")
    return _save(fig, path)


def pca(states: torch.Tensor, components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Project (S, D) states onto their own first principal components: (S, k) and the explained variance (k,)."""
    x = states.double()
    x = x - x.mean(dim=0)
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(components, vh.shape[0])
    total = singular.pow(2).sum()
    explained = singular[:k].pow(2) / total if total > 0 else torch.zeros(k, dtype=x.dtype)
    return x @ vh[:k].T, explained


def plot_pca(traj: Trajectory, texts: list[str], tokens: list[int], classes: list[str], path: Path) -> Path:
    """The paper's trajectory figure: one row per token, PCA fitted on that token's own trajectory, panels
    PC1-PC2, PC3-PC4, PC5-PC6; points coloured by step, start marked x and the last step *."""
    plt = _pyplot()
    pairs = max(1, min(MAX_PAIRS, (len(traj.steps) - 1) // 2, traj.states.shape[-1] // 2))
    fig, axes = plt.subplots(len(tokens), pairs, figsize=(3.2 * pairs, 2.9 * len(tokens)), squeeze=False)
    steps = traj.steps.numpy()
    for row, token in enumerate(tokens):
        projected, explained = pca(traj.token_states(token), 2 * pairs)
        for col in range(pairs):
            ax = axes[row, col]
            a, b = 2 * col, 2 * col + 1
            if b >= projected.shape[1]:
                ax.axis("off")
                continue
            x, y = projected[:, a].numpy(), projected[:, b].numpy()
            ax.plot(x, y, color="0.7", linewidth=0.8, zorder=1)
            points = ax.scatter(x, y, c=steps, cmap="viridis", s=10, zorder=2)
            ax.scatter(x[:1], y[:1], marker="x", color="black", s=40, zorder=3)
            ax.scatter(x[-1:], y[-1:], marker="*", color="red", s=80, zorder=3)
            ax.set_xlabel(f"PC{a + 1} ({float(explained[a]):.0%})", fontsize=8)
            ax.set_ylabel(f"PC{b + 1} ({float(explained[b]):.0%})", fontsize=8)
            ax.tick_params(labelsize=6)
            if col == 0:
                ax.set_title(f"{_label(token, texts[token])} {classes[token]}", fontsize=9, loc="left")
        fig.colorbar(points, ax=axes[row, -1], label="step", fraction=0.05)
    fig.suptitle("Latent trajectories (PCA per token over its own trajectory)", fontsize=10)
    return _save(fig, path)


def plot_exit_histogram(traj: Trajectory, path: Path) -> Path:
    """Per exit criterion (default threshold), how many tokens would exit at each step; those that never exit
    are counted in the title."""
    plt = _pyplot()
    names = list(traj.exit_steps)
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    bins = [s + 0.5 for s in range(traj.num_steps + 1)]
    for ax, name in zip(axes.flat, names, strict=False):
        exited = traj.exited[name]
        ax.hist(traj.exit_steps[name][exited].numpy(), bins=bins, color="tab:blue")
        never = int((~exited).sum())
        threshold = EXIT_CRITERIA[name].default
        ax.set_title(f"{name} ({threshold:g}): {never} of {len(exited)} never exit", fontsize=9)
        ax.set_xlim(0.5, traj.num_steps + 0.5)
        ax.set_xlabel("exit step", fontsize=8)
        ax.set_ylabel("tokens", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"Steps to exit per token (default thresholds, at most {traj.num_steps} steps)", fontsize=10)
    return _save(fig, path)
