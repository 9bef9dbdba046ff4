"""Learning-curve figures: return against env steps, with a shaded band where there is one."""

import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@dataclass
class Curve:
    label: str
    env_steps: np.ndarray
    value: np.ndarray
    low: np.ndarray | None = None  # a band around `value`, e.g. a confidence interval
    high: np.ndarray | None = None


def plot_curves(curves: list[Curve], path: Path, title: str, ylabel: str = "eval return") -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for curve in curves:
        (line,) = ax.plot(curve.env_steps, curve.value, label=curve.label)
        if curve.low is not None:
            ax.fill_between(curve.env_steps, curve.low, curve.high, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="env steps", ylabel=ylabel)
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
