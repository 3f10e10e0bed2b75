"""Calibrate each built-in head's `max_scale` (the guidance scale that strength 1 maps to).

    python recipes/calibrate_heads.py [--core cores/default] [--scales 2 4 8 16 32] [NAME ...]

For every head, each of its labels is steered at each candidate scale on neutral prompts; the
chosen max_scale is the LARGEST scale whose judged perplexity (gemma3-270m) stays within
--max-ppl-ratio of unsteered generation, averaged over the head's labels: "1 = strong while the
text stays fluent". The figures are printed and written into the head's config.json
(`max_scale`, and the sweep under `training.calibration`).
"""

from __future__ import annotations

import argparse
import json

from starctl.api import Star
from starctl.attributes import builtin_attributes_dir, get_definition
from starctl.steer_eval import NEUTRAL_PROMPTS, Runner, SteerEvalSettings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=["sentiment", "topic", "toxicity"])
    ap.add_argument("--core", default=None)
    ap.add_argument("--scales", type=float, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-ppl-ratio", type=float, default=1.2)
    args = ap.parse_args()

    star = Star.load(args.core)
    settings = SteerEvalSettings(samples=args.samples, max_new_tokens=32)
    runner = Runner(star, settings, print)
    prompts = NEUTRAL_PROMPTS[:args.prompts]
    base = runner.run(prompts, {})
    print(f"unsteered judged perplexity {base['judge_ppl']:.2f}")
    for name in args.names:
        head = star.head(name)
        labels = get_definition(name).labels
        if name == "toxicity":
            labels = ["toxic"]  # steering away (negative strength) is the use; the scale is shared
        sweep = []
        for scale in args.scales:
            head.config.max_scale = scale
            ratios, probs = [], []
            for label in labels:
                sign = -1.0 if name == "toxicity" else 1.0
                r = runner.run(prompts, {label: sign})
                ratios.append(r["judge_ppl"] / base["judge_ppl"])
                p = [probs_of[name][label] for probs_of in r["probabilities"]]
                probs.append(sum(p) / len(p))
            row = {"scale": scale, "ppl_ratio": sum(ratios) / len(ratios), "head_prob": sum(probs) / len(probs)}
            sweep.append(row)
            print(f"{name} scale {scale}: ppl x{row['ppl_ratio']:.2f}, head p(label) {row['head_prob']:.2f}")
        fluent = [r for r in sweep if r["ppl_ratio"] <= args.max_ppl_ratio]
        chosen = max(fluent, key=lambda r: r["scale"])["scale"] if fluent else min(args.scales)
        path = builtin_attributes_dir() / name / "head" / "config.json"
        cfg = json.loads(path.read_text())
        cfg["max_scale"] = chosen
        cfg.setdefault("training", {})["calibration"] = {
            "rule": f"largest scale with judged perplexity <= {args.max_ppl_ratio}x unsteered",
            "judge": settings.judge, "prompts": len(prompts), "samples": settings.samples, "sweep": sweep}
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        print(f"== {name}: max_scale = {chosen}")


if __name__ == "__main__":
    main()
