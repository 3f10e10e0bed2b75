"""Plot plan-gain curves (held-out NLL with a shuffled plan minus with the true plan, at
alpha^2 = 0.95) from training runs' metrics.jsonl files.

    python recipes/plot_plan_gain.py OUT.png LABEL=path/metrics.jsonl [LABEL=path ...]
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    out, runs = sys.argv[1], sys.argv[2:]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for spec in runs:
        label, path = spec.split("=", 1)
        rows = [json.loads(line) for line in open(path) if "plan_gain" in line]
        ax.plot([r["step"] for r in rows], [r["plan_gain"] for r in rows], marker="o", label=label)
    ax.axhline(0.3, color="grey", linestyle="--", linewidth=0.8, label="goal 0.3")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("plan gain (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
