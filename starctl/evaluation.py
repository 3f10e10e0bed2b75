"""`starctl eval core`: does the core read its plan, does the planner plan, is the text fluent?

On held-out chunks of the training corpora (same document split as the default recipe):
  * continuation NLL per token of the backbone alone (adapters off, no slots), and of the core
    given the true continuation's plan (posterior), another example's plan (shuffled) and a plan
    sampled by the planner from the prefix (prior, 20 steps); plans re-noised to alpha^2 = 0.95;
  * cosine similarity of sampled plans to the true continuation's embedding, and to a shuffled
    pairing's (chance);
  * a steps curve: that cosine at 1..50 DPM-Solver++ steps, and the fewest steps within 1% of
    the 50-step figure (`plateau_steps`);
  * fluency: perplexity of STAR-LDM generations and of plain backbone samples (same prompts, same
    decoding settings) under an independent judge LM (gemma3-270m), and distinct-2/3 of both.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import PlanExamples, build_plan_examples, collate
from .generation import GenerationConfig, _Batch, generate, generate_plain, plain_backbone, think
from .model import StarCore
from .schedule import logsnr_from_alpha2

STEP_GRID = (1, 2, 4, 8, 12, 16, 20, 30, 50)


@dataclass
class EvalSettings:
    sources: tuple[str, ...] = ("wiki", "bbc", "lee")
    heldout_fraction: float = 0.05
    chunk_tokens: int = 48
    examples: int = 128
    fluency_prompts: int = 32
    max_new_tokens: int = 48
    judge: str = "gemma3-270m"
    seed: int = 0

    @classmethod
    def quick(cls) -> "EvalSettings":
        return cls(examples=48, fluency_prompts=16, max_new_tokens=32)


def heldout_examples(core: StarCore, encoder, s: EvalSettings) -> PlanExamples:
    from .corpora import load_texts, split_documents

    docs = [d for src in s.sources for d in load_texts(src)]
    _, held = split_documents(docs, s.heldout_fraction, seed=s.seed)
    random.Random(s.seed + 1).shuffle(held)
    return build_plan_examples(held, core.tokenizer, encoder, chunk_tokens=s.chunk_tokens, min_prefix_tokens=8,
                               min_cont_tokens=8, seed=s.seed + 7, max_chunks=s.examples, cache_dir=None,
                               cache_tag={}, progress=False)


@torch.no_grad()
def sample_plans(core: StarCore, prefixes: list[list[int]], steps: int, seed: int, batch_size: int = 16) -> torch.Tensor:
    """Plans (N, d) sampled by the planner from each prefix (normalised latent space)."""
    out = []
    cfg = GenerationConfig(steps=steps)
    for start in range(0, len(prefixes), batch_size):
        batch = _Batch(core, prefixes[start:start + batch_size])
        g = torch.Generator().manual_seed(seed + start)
        plan, _ = think(core, batch, cfg, [], g)
        out.append(plan.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def continuation_nlls(core: StarCore, ex: PlanExamples, plans: torch.Tensor | None, alpha2: float = 0.95,
                      seed: int = 0, batch_size: int = 16) -> float:
    """Per-token NLL of the continuations given plans (N, d) re-noised to alpha2 (None: no slots)."""
    g = torch.Generator().manual_seed(seed)
    dev = core.device
    total = tokens = 0.0
    for start in range(0, len(ex), batch_size):
        idx = list(range(start, min(len(ex), start + batch_size)))
        b = [t.to(dev) for t in collate([ex.prefixes[i] for i in idx], [ex.continuations[i] for i in idx],
                                        core.tokenizer.pad_token_id)]
        if plans is None:
            z = logsnr = None
        else:
            x = plans[idx].to(dev)
            z = math.sqrt(alpha2) * x + math.sqrt(1 - alpha2) * torch.randn(x.shape, generator=g).to(dev)
            logsnr = logsnr_from_alpha2(alpha2).to(dev).expand(len(idx))
        total += float(core.continuation_nll(*b, z, logsnr).sum())
        tokens += float(b[3].sum())
    return total / tokens


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens, pooled over texts."""
    grams, total = set(), 0
    for t in texts:
        words = t.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i:i + n]))
            total += 1
    return len(grams) / total if total else 0.0


@torch.no_grad()
def judge_perplexity(judge, tokenizer, prompts: list[str], continuations: list[str]) -> float:
    """Perplexity of continuations given their prompts under the judge LM (continuation tokens only)."""
    total = tokens = 0.0
    for p, c in zip(prompts, continuations):
        p_ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        if not c_ids:
            continue
        ids = torch.tensor([p_ids + c_ids])
        logits = judge(input_ids=ids).logits[0, len(p_ids) - 1:-1].float()
        total += float(F.cross_entropy(logits, torch.tensor(c_ids), reduction="sum"))
        tokens += len(c_ids)
    return math.exp(total / tokens) if tokens else float("nan")


def plot_steps_curve(curve: dict[int, float], chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = sorted(curve)
    ax.plot(xs, [curve[x] for x in xs], marker="o", label="sampled plan vs true continuation")
    ax.axhline(chance, color="grey", linestyle="--", label="shuffled pairing (chance)")
    ax.set_xscale("log")
    ax.set_xlabel("DPM-Solver++ steps")
    ax.set_ylabel("cosine similarity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_core(core: StarCore, settings: EvalSettings, out_dir: Path | None = None, log=print) -> dict:
    from .assets import load_backbone, load_encoder

    t0 = time.time()
    s = settings
    encoder = load_encoder(core.config.encoder)
    ex = heldout_examples(core, encoder, s)
    del encoder
    space = core.latent_space
    truth = space.normalise(ex.embeddings)  # (N, d)
    shuffled = truth.roll(1, dims=0)
    log(f"held-out chunks: {len(ex)}")

    with plain_backbone(core):
        nll_backbone = continuation_nlls(core, ex, None)
    nll_posterior = continuation_nlls(core, ex, truth)
    nll_shuffled = continuation_nlls(core, ex, shuffled)
    prior20 = sample_plans(core, ex.prefixes, 20, s.seed)
    nll_prior = continuation_nlls(core, ex, prior20)
    log(f"NLL backbone {nll_backbone:.4f}  posterior {nll_posterior:.4f}  shuffled {nll_shuffled:.4f}  "
        f"prior {nll_prior:.4f}")

    raw = ex.embeddings
    cos = lambda plans: mean_cosine(space.denormalise(plans), raw)  # noqa: E731
    plan_cosine = cos(prior20)
    plan_cosine_shuffled = mean_cosine(space.denormalise(prior20), raw.roll(1, dims=0))
    curve = {20: plan_cosine}
    for steps in STEP_GRID:
        if steps not in curve:
            curve[steps] = cos(sample_plans(core, ex.prefixes, steps, s.seed))
    best = curve[max(STEP_GRID)]
    plateau = min(k for k, v in curve.items() if v >= best - 0.01 * abs(best))
    log("steps curve (cosine): " + ", ".join(f"{k}: {curve[k]:.4f}" for k in sorted(curve)))

    # Fluency and diversity on prompts made of held-out prefixes.
    prompts = [core.tokenizer.decode(p) for p in ex.prefixes[:s.fluency_prompts]]
    gcfg = GenerationConfig(steps=20, max_new_tokens=s.max_new_tokens, seed=s.seed)
    star = [g.continuation for g in generate(core, prompts, gcfg).generations]
    plain = [g.continuation for g in generate_plain(core, prompts, gcfg).generations]
    judge, judge_tok = load_backbone(s.judge)
    judge_ppl_star = judge_perplexity(judge, judge_tok, prompts, star)
    judge_ppl_plain = judge_perplexity(judge, judge_tok, prompts, plain)
    del judge

    result = {
        "nll_backbone": nll_backbone, "nll_posterior": nll_posterior, "nll_shuffled": nll_shuffled,
        "nll_prior": nll_prior, "plan_gain": nll_shuffled - nll_posterior,
        "plan_cosine": plan_cosine, "plan_cosine_shuffled": plan_cosine_shuffled,
        "steps_curve": {str(k): curve[k] for k in sorted(curve)}, "plateau_steps": plateau,
        "judge": s.judge, "judge_ppl_star": judge_ppl_star, "judge_ppl_plain": judge_ppl_plain,
        "judge_ppl_ratio": judge_ppl_star / judge_ppl_plain,
        "distinct2_star": distinct_n(star, 2), "distinct2_plain": distinct_n(plain, 2),
        "distinct3_star": distinct_n(star, 3), "distinct3_plain": distinct_n(plain, 3),
        "examples": len(ex), "fluency_prompts": len(prompts), "seconds": round(time.time() - t0, 1),
        "samples": [{"prompt": p, "star": a, "plain": b} for p, a, b in list(zip(prompts, star, plain))[:4]],
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval-core.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_steps_curve(curve, plan_cosine_shuffled, out_dir / "steps-curve.png")
    return result
