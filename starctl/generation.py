"""Stop, think, autoregress: batched generation with one prefix cache.

    prompt -> tokens -> prefix cache -> THINK: DPM-Solver++ over the denoiser, which runs only
    the K plan slots on top of the cache at every step -> plan -> re-noise to alpha^2 = 0.95 ->
    soft prompt appended to the same cache -> AUTOREGRESS tokens -> (optionally) STOP and think
    again with the longer prefix.

Everything is batched over prompts x samples. Prompts are left-padded; every cache position
has a 0/1 mask entry and positions are counted over real entries only, so the layout at every
round is exactly the training layout [text][K slots][continuation]. For re-planning the cache
is cropped back to the text (the old slots and the segment are dropped) and the segment's
tokens are re-fed as plain text, so the text cache is reused rather than recomputed.

`reference_thinking=True` runs thinking the way the reference implementation does (the whole
prefix re-run at every denoising step, one example at a time), for benchmarks and for the
test that both give the same plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .errors import StarctlError
from .model import StarCore, crop_cache
from .sampler import Guidance, SamplerTrace, sample_dpmpp_2m
from .schedule import logsnr_from_alpha2

SENTENCE_ENDS = (".", "!", "?")


@dataclass
class GenerationConfig:
    steps: int = 20
    max_new_tokens: int = 64
    num_samples: int = 1
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.2
    seed: int | None = 0
    plan_every: int | str | None = None     # re-plan every N tokens, or "sentence"; None = plan once
    decode_alpha2: float = 0.95             # the final plan is re-noised to this level
    spacing: str = "logsnr"
    tolerance: float | None = None          # adaptive thinking (see sampler.sample_dpmpp_2m)
    reference_thinking: bool = False

    def validate(self) -> None:
        if self.steps < 1:
            raise StarctlError(f"steps must be >= 1, got {self.steps}")
        if self.max_new_tokens < 1:
            raise StarctlError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise StarctlError(f"num-samples must be >= 1, got {self.num_samples}")
        if not 0 < self.top_p <= 1:
            raise StarctlError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise StarctlError(f"temperature must be > 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise StarctlError(f"repetition-penalty must be > 0, got {self.repetition_penalty}")
        if not 0 < self.decode_alpha2 <= 1:
            raise StarctlError(f"decode alpha^2 must be in (0, 1], got {self.decode_alpha2}")
        pe = self.plan_every
        if pe is not None and pe != "sentence" and not (isinstance(pe, int) and pe >= 1):
            raise StarctlError(f"plan-every must be a positive number of tokens or 'sentence', got {pe!r}")


def parse_plan_every(value: str | None) -> int | str | None:
    if value is None or value == "":
        return None
    if value == "sentence":
        return value
    try:
        n = int(value)
    except ValueError:
        raise StarctlError(f"plan-every must be a positive number of tokens or 'sentence', got {value!r}") from None
    if n < 1:
        raise StarctlError(f"plan-every must be a positive number of tokens or 'sentence', got {value!r}")
    return n


@dataclass
class Generation:
    prompt: str
    continuation: str
    sample: int
    token_ids: list[int] = field(default_factory=list)        # the generated tokens
    plans: list[torch.Tensor] = field(default_factory=list)   # the plan (d,) of each round
    steps_used: list[int] = field(default_factory=list)


@dataclass
class GenerationResult:
    generations: list[Generation]
    seconds: float
    think_seconds: float
    write_seconds: float
    new_tokens: int


NUCLEUS_CANDIDATES = 4096
"""Top-p looks for the nucleus among this many most likely tokens first (see `_nucleus`). With
SmolLM2-135M, top-p 0.9 and repetition penalty 1.2 the largest nucleus of a batch of 8 held
660-3100 tokens (the top 1024 sufficed at only 20-45% of the steps, the top 4096 at all)."""


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of probs (B, V): (probabilities in descending order with those
    outside the nucleus zeroed, their token ids), both (B, n).

    The nucleus is the smallest prefix of the tokens sorted by probability whose mass reaches
    top_p (the top token is always in). Sorting the whole vocabulary costs ~20 ms per token at
    batch 8 with a 49k vocabulary on one CPU thread, so the top NUCLEUS_CANDIDATES are taken
    first (topk, ~4 ms); when they already hold top_p of the mass in every row, every token
    after them is outside the nucleus, and the result is the full sort's (the same values,
    prefix sums and ids; only exact ties straddling the nucleus' edge could be ordered
    differently). Otherwise (flat distributions) the whole vocabulary is sorted.
    """
    if probs.shape[-1] > NUCLEUS_CANDIDATES:
        top, order = probs.topk(NUCLEUS_CANDIDATES, dim=-1)  # (B, n), descending
        mass = top.cumsum(-1)
        if bool((mass[:, -1] >= top_p).all()):
            return top.masked_fill(mass - top >= top_p, 0.0), order
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p
    return sorted_p.masked_fill(outside, 0.0), order


def sample_next_token(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerationConfig,
                      generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids with repetition penalty, temperature and top-p.

    Repetition penalty (Keskar et al. 2019, as in transformers): for every token already in the
    sequence (`seen` (B, V) bool), positive logits are divided and negative ones multiplied by it.
    """
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        # only the seen entries change: compute them alone (same values as a where over all V)
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
    logits = logits / cfg.temperature
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        kept, order = _nucleus(probs, cfg.top_p)
        probs = torch.zeros_like(probs).scatter(-1, order, kept)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Batch:
    """Mutable state of one batched generation: the cache, its mask, and the text so far."""

    def __init__(self, core: StarCore, token_lists: list[list[int]]):
        self.core = core
        dev = core.device
        B = len(token_lists)
        P = max(len(t) for t in token_lists)
        pad = core.tokenizer.pad_token_id
        ids = torch.full((B, P), pad, dtype=torch.long, device=dev)
        mask = torch.zeros(B, P, dtype=torch.long, device=dev)
        for i, t in enumerate(token_lists):
            ids[i, P - len(t):] = torch.tensor(t, device=dev)
            mask[i, P - len(t):] = 1
        self.texts = [list(t) for t in token_lists]       # prompt + generated tokens per row
        self.generated: list[list[int]] = [[] for _ in range(B)]
        self.cache = DynamicCache()
        self.mask = mask[:, :0]
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.last_state = self.append(core.embed_tokens(ids), mask)[:, -1]  # (B, H), at the last prompt token

    def append(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run new positions (B, n, H) with their mask (B, n) on top of the cache; return states."""
        full = torch.cat([self.mask, mask], dim=1)
        positions = (full.cumsum(-1) - 1).clamp(min=0)[:, -mask.shape[1]:]
        states = self.core.run_body(embeds, full, positions, cache=self.cache)
        self.mask = full
        return states

    def crop(self, length: int) -> None:
        crop_cache(self.cache, length)
        self.mask = self.mask[:, :length]


def _denoiser(core: StarCore, batch: _Batch):
    prefix_mask = batch.mask

    def denoise(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        return core.denoise(z, logsnr.to(z.dtype), batch.cache, prefix_mask)

    return denoise


def _reference_denoiser(core: StarCore, token_lists: list[list[int]]):
    """The reference algorithm: no cache, whole prefix re-run per step, one example at a time."""
    K = core.config.num_slots
    dev = core.device

    def denoise(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        out = []
        for i, tokens in enumerate(token_lists):
            ids = torch.tensor([tokens], device=dev)
            slots = core.soft_prompt(z[i:i + 1], logsnr[i:i + 1].to(z.dtype))  # (1, K, H)
            embeds = torch.cat([core.embed_tokens(ids), slots], dim=1)
            mask = torch.ones(1, embeds.shape[1], dtype=torch.long, device=dev)
            states = core.run_body(embeds, mask, torch.arange(embeds.shape[1], device=dev)[None])
            drop = torch.zeros(1, dtype=torch.bool, device=dev)
            out.append(core.score_head(states[:, -K:], slots, torch.sigmoid(logsnr[i:i + 1]).to(z.dtype), drop))
        return torch.cat(out)

    return denoise


def think(core: StarCore, batch: _Batch, cfg: GenerationConfig, guidance: list[Guidance],
          generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Sample one plan per row: (B, d) and the number of denoiser evaluations used."""
    B = batch.mask.shape[0]
    noise = torch.randn(B, core.config.latent_dim, generator=generator).to(core.device)
    if cfg.reference_thinking:
        denoiser = _reference_denoiser(core, batch.texts)
    else:
        denoiser = _denoiser(core, batch)
    trace = SamplerTrace()
    plan = sample_dpmpp_2m(denoiser, noise, cfg.steps, spacing=cfg.spacing, guidance=guidance,
                           tolerance=cfg.tolerance, trace=trace)
    return plan, trace.steps_used


def write(core: StarCore, batch: _Batch, plan: torch.Tensor, cfg: GenerationConfig, budget: int,
          generator: torch.Generator) -> list[list[int]]:
    """Append the re-noised plan's slots to the cache and sample up to `budget` tokens per row.

    Returns each row's segment. A row's segment ends at EOS, at the budget, or (plan_every =
    'sentence') after a token that ends a sentence; a row that has ended feeds masked padding.
    """
    dev = core.device
    B = plan.shape[0]
    a2 = cfg.decode_alpha2
    eps = torch.randn(plan.shape, generator=generator).to(dev)
    z = math.sqrt(a2) * plan + math.sqrt(1 - a2) * eps
    logsnr = logsnr_from_alpha2(min(a2, 1 - 1e-6)).to(dev).expand(B)
    slots = core.soft_prompt(z, logsnr)  # (B, K, H)
    states = batch.append(slots, torch.ones(B, slots.shape[1], dtype=torch.long, device=dev))
    return sample_tokens(core, batch, core.lm_head()(states[:, -1]), cfg, budget, generator)


def sample_tokens(core: StarCore, batch: _Batch, logits: torch.Tensor, cfg: GenerationConfig, budget: int,
                  generator: torch.Generator) -> list[list[int]]:
    """The autoregressive loop on the batch's cache, from next-token logits (B, V)."""
    # inference_mode, not only no_grad: no autograd bookkeeping at all on the ~600 small ops
    # of every token step. Thinking stays under no_grad (guidance differentiates heads); it
    # reads the cache entries made here, which inference tensors allow outside the mode.
    with torch.inference_mode():
        return _sample_tokens(core, batch, logits, cfg, budget, generator)


def _sample_tokens(core: StarCore, batch: _Batch, logits: torch.Tensor, cfg: GenerationConfig, budget: int,
                   generator: torch.Generator) -> list[list[int]]:
    dev = core.device
    B = logits.shape[0]
    vocab = logits.shape[-1]
    seen = torch.zeros(B, vocab, dtype=torch.bool, device=dev)
    for i, t in enumerate(batch.texts):
        seen[i, torch.tensor(t, device=dev).clamp(max=vocab - 1)] = True
    active = ~batch.finished
    segments: list[list[int]] = [[] for _ in range(B)]
    eos = core.tokenizer.eos_token_id
    pad = core.tokenizer.pad_token_id
    for step in range(budget):
        if not bool(active.any()):
            break
        token = sample_next_token(logits, seen, cfg, generator)  # (B,)
        token = torch.where(active, token, torch.full_like(token, pad))
        kept = active & (token != eos)  # rows whose token joins the text
        batch.finished |= active & (token == eos)
        active &= token != eos
        seen[kept, token[kept]] = True  # one indexed write for the batch, not one per row
        tokens, kept_rows = token.tolist(), kept.tolist()  # one device->host copy each per step
        for i in range(B):
            if kept_rows[i]:
                t = tokens[i]
                segments[i].append(t)
                if cfg.plan_every == "sentence" and core.tokenizer.decode([t]).rstrip().endswith(SENTENCE_ENDS):
                    active[i] = False
        if step == budget - 1:
            break  # the last token's forward pass would only serve a token never sampled
        states = batch.append(core.embed_tokens(token[:, None]), kept.long()[:, None])
        logits = core.lm_head()(states[:, -1])
    return segments


def replan_prefix(core: StarCore, batch: _Batch, text_length: int, segments: list[list[int]]) -> None:
    """Drop the old slots and segment from the cache, then re-feed the segments as plain text."""
    batch.crop(text_length)
    n = max((len(s) for s in segments), default=0)
    if n == 0:
        return
    B = len(segments)
    dev = core.device
    pad = core.tokenizer.pad_token_id
    ids = torch.full((B, n), pad, dtype=torch.long, device=dev)
    mask = torch.zeros(B, n, dtype=torch.long, device=dev)
    for i, s in enumerate(segments):
        if s:
            ids[i, :len(s)] = torch.tensor(s, device=dev)
            mask[i, :len(s)] = 1
    batch.append(core.embed_tokens(ids), mask)


def context_limit(core: StarCore) -> int | None:
    cfg = core.backbone.config.get_text_config()
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def tokenize_prompts(core: StarCore, prompts: list[str], cfg: GenerationConfig) -> list[list[int]]:
    if not prompts:
        raise StarctlError("no prompt given")
    out = []
    limit = context_limit(core)
    for p in prompts:
        if not p or not p.strip():
            raise StarctlError("empty prompt: give some text to continue")
        ids = core.tokenizer(p, add_special_tokens=False)["input_ids"]
        if not ids:
            raise StarctlError(f"prompt {p!r} has no tokens")
        # Each round drops the previous slots, so at most K slot positions are in use at once.
        needed = len(ids) + core.config.num_slots + cfg.max_new_tokens
        if limit is not None and needed > limit:
            raise StarctlError(f"prompt is {len(ids)} tokens; with {core.config.num_slots} plan slots and "
                               f"{cfg.max_new_tokens} new tokens it exceeds the backbone's context of {limit} tokens")
        out.append(ids)
    return out


@torch.no_grad()
def generate(core: StarCore, prompts: list[str], cfg: GenerationConfig | None = None,
             guidance: list[Guidance] | None = None) -> GenerationResult:
    """Generate `cfg.num_samples` continuations for each prompt (rows are prompt-major)."""
    cfg = cfg or GenerationConfig()
    cfg.validate()
    guidance = list(guidance or [])
    token_lists = tokenize_prompts(core, prompts, cfg)
    rows = [(p, t, s) for p, t in zip(prompts, token_lists) for s in range(cfg.num_samples)]
    generator = torch.Generator().manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    started = time.perf_counter()
    think_s = write_s = 0.0
    batch = _Batch(core, [t for _, t, _ in rows])
    all_plans: list[list[torch.Tensor]] = [[] for _ in rows]
    steps_used: list[list[int]] = [[] for _ in rows]
    written = 0
    while written < cfg.max_new_tokens and not bool(batch.finished.all()):
        t0 = time.perf_counter()
        plan, used = think(core, batch, cfg, guidance, generator)
        t1 = time.perf_counter()
        think_s += t1 - t0
        budget = cfg.max_new_tokens - written
        if isinstance(cfg.plan_every, int):
            budget = min(budget, cfg.plan_every)
        text_length = batch.mask.shape[1]
        segments = write(core, batch, plan, cfg, budget, generator)
        write_s += time.perf_counter() - t1
        for i, seg in enumerate(segments):
            batch.texts[i].extend(seg)
            batch.generated[i].extend(seg)
            all_plans[i].append(plan[i].cpu())
            steps_used[i].append(used)
        written = max(len(g) for g in batch.generated) if cfg.plan_every == "sentence" else written + budget
        if cfg.plan_every is None or written >= cfg.max_new_tokens:
            break
        if cfg.plan_every == "sentence" and not any(segments):
            break
        replan_prefix(core, batch, text_length, segments)
    seconds = time.perf_counter() - started
    gens = [Generation(prompt=p, continuation=core.tokenizer.decode(batch.generated[i], skip_special_tokens=True),
                       sample=s, token_ids=batch.generated[i], plans=all_plans[i], steps_used=steps_used[i])
            for i, (p, _, s) in enumerate(rows)]
    return GenerationResult(gens, seconds, think_s, write_s, sum(len(g) for g in batch.generated))



class plain_backbone:
    """Context manager: the backbone exactly as shipped (LoRA adapters disabled, if any)."""

    def __init__(self, core: StarCore):
        self.core = core
        self.ctx = core.backbone.disable_adapter() if hasattr(core.backbone, "disable_adapter") else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()
        return self.core

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


@torch.no_grad()
def generate_plain(core: StarCore, prompts: list[str], cfg: GenerationConfig | None = None) -> GenerationResult:
    """Plain backbone sampling (no plan, LoRA adapters off) with the same decoding settings and
    the same sampling loop as `generate`: the baseline for fluency, diversity and speed."""
    cfg = cfg or GenerationConfig()
    cfg.validate()
    token_lists = tokenize_prompts(core, prompts, cfg)
    rows = [(p, t, s) for p, t in zip(prompts, token_lists) for s in range(cfg.num_samples)]
    generator = torch.Generator().manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    started = time.perf_counter()
    with plain_backbone(core):
        batch = _Batch(core, [t for _, t, _ in rows])
        segments = sample_tokens(core, batch, core.lm_head()(batch.last_state), cfg, cfg.max_new_tokens, generator)
    seconds = time.perf_counter() - started
    gens = [Generation(prompt=p, continuation=core.tokenizer.decode(segments[i], skip_special_tokens=True), sample=s,
                       token_ids=segments[i])
            for i, (p, _, s) in enumerate(rows)]
    return GenerationResult(gens, seconds, 0.0, seconds, sum(len(seg) for seg in segments))
