"""Draw ``minima.png``, the home page's picture of a sharp and a flat minimum.

A 1-D loss with two minima of equal depth: a sharp one (large curvature) and a flat one (small
curvature). Around each minimum the worst loss within a radius ρ, max_{|e| <= ρ} L(w + e), is
marked: SAM minimises that worst loss, so it prefers the flat minimum, where the rise is small.
The curve is made up for the picture (a sum of two Gaussian wells); no training is involved.

    python docs/figures/make_minima.py            # writes docs/figures/minima.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHARP, FLAT = -1.6, 1.6  # positions of the two minima
RHO = 0.45  # the radius drawn around each


def loss(w: np.ndarray) -> np.ndarray:
    """Two wells of equal depth: narrow at SHARP, wide at FLAT."""
    sharp = np.exp(-((w - SHARP) ** 2) / (2 * 0.28**2))
    flat = np.exp(-((w - FLAT) ** 2) / (2 * 0.9**2))
    return 1.2 - sharp - flat + 0.04 * w**2


def draw(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = np.linspace(-2.75, 3.6, 800)
    plt.rcParams.update({"font.size": 12})
    fig, ax = plt.subplots(figsize=(8.0, 3.4), dpi=110)
    ax.plot(w, loss(w), color="#333333", lw=2.2)
    for centre, name, colour in ((SHARP, "sharp minimum", "#c0392b"), (FLAT, "flat minimum", "#1f6fb2")):
        lo, hi = centre - RHO, centre + RHO
        base = float(loss(np.array([centre]))[0])
        worst = float(loss(np.linspace(lo, hi, 201)).max())
        ax.axvspan(lo, hi, color=colour, alpha=0.13, lw=0)
        ax.plot([centre], [base], "o", color=colour, ms=7)
        ax.annotate(
            "",
            xy=(hi, worst),
            xytext=(hi, base),
            arrowprops={"arrowstyle": "<->", "color": colour, "lw": 1.8},
        )
        ax.text(hi + 0.08, (base + worst) / 2, f"rise {worst - base:.2f}", color=colour, va="center")
        ax.text(centre, base - 0.13, name, color=colour, ha="center", va="top")
    ax.text(SHARP, 1.30, "w ± ρ", ha="center", color="#555555")
    ax.text(FLAT, 1.30, "w ± ρ", ha="center", color="#555555")
    ax.set_xlabel("weight w")
    ax.set_ylabel("training loss L(w)")
    ax.set_ylim(-0.15, 1.5)
    ax.set_yticks([])
    ax.set_xticks([])
    ax.set_title("Within ±ρ of its minimum, the loss rises far more at the sharp one")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("minima.png"))
    args = parser.parse_args()
    draw(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
