"""Training examples for the core: token chunks with a random stop point and the encoder's plan
of the text after it.

Each document is tokenised and cut into chunks of `chunk_tokens`. A chunk is split at a stop
point s drawn uniformly such that the prefix has at least `min_prefix_tokens` and the
continuation at least `min_cont_tokens` tokens; the plan target is the frozen encoder's
embedding of the continuation's text. Embeddings are computed once and cached on disk
(safetensors), keyed by everything they depend on, so later runs and resumed runs skip them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .latent import encode_texts


@dataclass
class PlanExamples:
    """Prefix/continuation token lists and raw plan embeddings (N, D), aligned by index."""

    prefixes: list[list[int]]
    continuations: list[list[int]]
    embeddings: torch.Tensor

    def __len__(self) -> int:
        return len(self.prefixes)

    def subset(self, idx: list[int]) -> "PlanExamples":
        return PlanExamples([self.prefixes[i] for i in idx], [self.continuations[i] for i in idx],
                            self.embeddings[idx])


def make_chunks(texts: list[str], tokenizer, chunk_tokens: int, max_chunks: int | None = None) -> list[list[int]]:
    """Cut each document's tokens into full chunks of `chunk_tokens` (the ragged tail is dropped)."""
    chunks: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - chunk_tokens + 1, chunk_tokens):
            chunks.append(ids[start:start + chunk_tokens])
            if max_chunks is not None and len(chunks) >= max_chunks:
                return chunks
    return chunks


def split_at_random_stops(chunks: list[list[int]], min_prefix_tokens: int, min_cont_tokens: int,
                          seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prefixes, conts = [], []
    for chunk in chunks:
        s = rng.randint(min_prefix_tokens, len(chunk) - min_cont_tokens)
        prefixes.append(chunk[:s])
        conts.append(chunk[s:])
    return prefixes, conts


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_plan_examples(texts: list[str], tokenizer, encoder, *, chunk_tokens: int, min_prefix_tokens: int,
                        min_cont_tokens: int, seed: int, max_chunks: int | None, cache_dir: Path | None,
                        cache_tag: dict, progress: bool = True) -> PlanExamples:
    """Chunk, split and encode `texts`; reuse the on-disk cache when everything matches."""
    chunks = make_chunks(texts, tokenizer, chunk_tokens, max_chunks)
    prefixes, conts = split_at_random_stops(chunks, min_prefix_tokens, min_cont_tokens, seed)
    key = _cache_key({**cache_tag, "n": len(chunks), "chunk_tokens": chunk_tokens, "seed": seed,
                      "min_prefix": min_prefix_tokens, "min_cont": min_cont_tokens,
                      "first": chunks[:2], "last": chunks[-2:]})
    path = cache_dir / f"plans-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        embeddings = load_file(str(path))["embeddings"]
    else:
        cont_texts = [tokenizer.decode(c) for c in conts]
        embeddings = encode_texts(encoder, cont_texts, progress=progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"embeddings": embeddings.contiguous()}, str(tmp))
            tmp.replace(path)
    return PlanExamples(prefixes, conts, embeddings)


def collate(prefixes: list[list[int]], conts: list[list[int]], pad_id: int):
    """Left-pad prefixes and right-pad continuations: (B, P), (B, P), (B, C), (B, C) tensors."""
    B = len(prefixes)
    P = max(len(p) for p in prefixes)
    C = max(len(c) for c in conts)
    prefix_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros(B, P, dtype=torch.long)
    cont_ids = torch.full((B, C), pad_id, dtype=torch.long)
    cont_mask = torch.zeros(B, C, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prefixes, conts)):
        prefix_ids[i, P - len(p):] = torch.tensor(p)
        prefix_mask[i, P - len(p):] = 1
        cont_ids[i, :len(c)] = torch.tensor(c)
        cont_mask[i, :len(c)] = 1
    return prefix_ids, prefix_mask, cont_ids, cont_mask
