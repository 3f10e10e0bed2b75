"""Vocabulary initialisation of the soft-prompt generator.

A cheap map from a plan to the words of its text, fitted on precomputed embeddings with no LM
forward pass: logits = W z + b over a vocabulary subset, trained with softmax cross-entropy
against the continuation's normalised bag of tokens (the most frequent tokens are left out:
they say nothing about the plan). The generator's vocabulary route starts from this map, so
its slots are, from step 0, embeddings of words the continuation is likely to contain.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F


def choose_vocabulary(token_lists: list[list[int]], size: int, skip_most_frequent: int,
                      exclude: set[int] = frozenset()) -> torch.Tensor:
    """Token ids ranked skip_most_frequent .. skip_most_frequent+size by document frequency."""
    counts = Counter()
    for ids in token_lists:
        counts.update(set(ids) - exclude)
    ranked = [t for t, _ in counts.most_common()]
    chosen = ranked[skip_most_frequent:skip_most_frequent + size]
    return torch.tensor(sorted(chosen), dtype=torch.long)


def bag_targets(token_lists: list[list[int]], vocab_ids: torch.Tensor) -> list[torch.Tensor]:
    """For each list, the positions (in vocab_ids) of the distinct tokens it contains."""
    position = {int(t): i for i, t in enumerate(vocab_ids.tolist())}
    return [torch.tensor(sorted({position[t] for t in ids if t in position}), dtype=torch.long)
            for ids in token_lists]


def _dense(bags: list[torch.Tensor], size: int) -> torch.Tensor:
    target = torch.zeros(len(bags), size)  # (B, V)
    for i, b in enumerate(bags):
        if len(b):
            target[i, b] = 1.0 / len(b)
    return target


def noisy(x: torch.Tensor, alpha2_low: float, generator: torch.Generator) -> torch.Tensor:
    """Noise plans at alpha^2 ~ U[alpha2_low, 1]: the generator reads noisy plans."""
    a2 = alpha2_low + (1 - alpha2_low) * torch.rand(x.shape[0], 1, generator=generator)
    return a2.sqrt() * x + (1 - a2).sqrt() * torch.randn(x.shape, generator=generator)


def fit_bow_map(latents: torch.Tensor, bags: list[torch.Tensor], vocab_size: int, *, epochs: int = 3,
                batch_size: int = 256, lr: float = 3e-3, alpha2_low: float = 0.8, seed: int = 0) -> torch.nn.Linear:
    """Fit logits = W z + b (d -> V) by softmax cross-entropy against the bags, on noisy plans."""
    g = torch.Generator().manual_seed(seed)
    keep = [i for i, b in enumerate(bags) if len(b)]
    linear = torch.nn.Linear(latents.shape[1], vocab_size)
    torch.nn.init.zeros_(linear.weight)
    opt = torch.optim.Adam(linear.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(keep), generator=g).tolist()
        for start in range(0, len(order), batch_size):
            idx = [keep[i] for i in order[start:start + batch_size]]
            z = noisy(latents[idx], alpha2_low, g)  # (B, d)
            loss = -(_dense([bags[i] for i in idx], vocab_size) * F.log_softmax(linear(z), -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return linear


@torch.no_grad()
def recall_at_k(linear: torch.nn.Linear, latents: torch.Tensor, bags: list[torch.Tensor], k: int = 8) -> float:
    """Fraction of the top-k predicted tokens that occur in the text (precision of the top k)."""
    top = linear(latents).topk(k, dim=-1).indices  # (N, k)
    hits = [len(set(t.tolist()) & set(b.tolist())) / k for t, b in zip(top, bags)]
    return sum(hits) / max(len(hits), 1)
