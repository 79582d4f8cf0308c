#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Plot examples/train_moe's CSV: loss, accuracy, experts per token and load imbalance against
the epoch, one line per router.

usage: plot.py train_moe.csv train_moe.png
"""
import csv
import sys
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    runs = OrderedDict()
    with open(argv[1], newline="") as f:
        for row in csv.DictReader(f):
            runs.setdefault(row["router"], []).append(row)
    panels = [
        ("loss", "cross-entropy (train)", None),
        ("accuracy", "accuracy (train)", None),
        ("mean_k", "experts per token (solid: hard tokens, dotted: easy)", ("mean_k_hard", "mean_k_easy")),
        ("imbalance", "load imbalance max/mean", None),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=80)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (column, title, split) in zip(axes.flat, panels):
        for i, (router, rows) in enumerate(runs.items()):
            epochs = [int(r["epoch"]) for r in rows]
            color = colors[i % len(colors)]
            if split is None:
                ax.plot(epochs, [float(r[column]) for r in rows], label=router, color=color)
            else:
                ax.plot(epochs, [float(r[split[0]]) for r in rows], label=router, color=color)
                ax.plot(epochs, [float(r[split[1]]) for r in rows], color=color, linestyle=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes.flat[0].set_yscale("log")
    axes.flat[0].legend(fontsize=8, ncol=2)
    fig.suptitle("examples/train_moe: every router on the same task (hard tokens need two skills)", fontsize=11)
    fig.tight_layout()
    fig.savefig(argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
