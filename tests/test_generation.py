"""Generation on a tiny core: cached vs reference thinking, multi-round planning, decoding."""

from __future__ import annotations

import pytest
import torch

from starctl.errors import StarctlError
from starctl.generation import GenerationConfig, generate, generate_plain, parse_plan_every, sample_next_token
from starctl.model import StarCore

PROMPTS = ["The movie was", "Stocks fell sharply as the market"]


@pytest.fixture(scope="module")
def core(tiny_core_dir):
    return StarCore.from_pretrained(tiny_core_dir)


def test_cached_thinking_equals_reference_thinking(core):
    cfg = dict(steps=6, max_new_tokens=4, num_samples=2, seed=5)
    cached = generate(core, PROMPTS, GenerationConfig(**cfg))
    reference = generate(core, PROMPTS, GenerationConfig(**cfg, reference_thinking=True))
    for a, b in zip(cached.generations, reference.generations):
        torch.testing.assert_close(a.plans[0], b.plans[0], atol=1e-4, rtol=1e-4)
        assert a.continuation == b.continuation


def test_batch_shape_and_determinism(core):
    cfg = GenerationConfig(steps=3, max_new_tokens=6, num_samples=3, seed=1)
    r1, r2 = generate(core, PROMPTS, cfg), generate(core, PROMPTS, cfg)
    assert [(g.prompt, g.sample) for g in r1.generations] == [(p, s) for p in PROMPTS for s in range(3)]
    assert [g.continuation for g in r1.generations] == [g.continuation for g in r2.generations]
    assert r1.seconds >= r1.think_seconds > 0


@pytest.mark.parametrize("plan_every", [3, "sentence"])
def test_multi_round_replanning(core, plan_every):
    cfg = GenerationConfig(steps=2, max_new_tokens=9, seed=0, plan_every=plan_every)
    result = generate(core, PROMPTS, cfg)
    for g in result.generations:
        if plan_every == 3:
            assert len(g.plans) == len(g.steps_used) >= 1
            assert len(g.plans) <= 3
    assert max(len(g.token_ids) for g in result.generations) <= 9


def test_replanning_matches_a_fresh_prefix(core):
    """After a round, the cached text prefix equals running prompt + segment from scratch."""
    from starctl.generation import _Batch, replan_prefix, think, write

    cfg = GenerationConfig(steps=2, max_new_tokens=4, seed=0, plan_every=4)
    ids = [core.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        batch = _Batch(core, ids)
        plan, _ = think(core, batch, cfg, [], g)
        text_len = batch.mask.shape[1]
        segments = write(core, batch, plan, cfg, 4, g)
        replan_prefix(core, batch, text_len, segments)
        z = torch.randn(2, core.config.latent_dim, generator=torch.Generator().manual_seed(3))
        logsnr = torch.zeros(2)
        v_cached = core.denoise(z, logsnr, batch.cache, batch.mask)
        fresh = _Batch(core, [i + s for i, s in zip(ids, segments)])
        v_fresh = core.denoise(z, logsnr, fresh.cache, fresh.mask)
    torch.testing.assert_close(v_cached, v_fresh, atol=1e-4, rtol=1e-4)


def test_plain_generation(core):
    r = generate_plain(core, PROMPTS, GenerationConfig(max_new_tokens=5, num_samples=2))
    assert len(r.generations) == 4 and r.new_tokens > 0


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = GenerationConfig(top_p=0.7, repetition_penalty=1.0)
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, torch.zeros(1, 4, dtype=torch.bool), cfg, g)) for _ in range(200)}
    assert draws == {0, 1}


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 2.0]])
    seen = torch.tensor([[True, False]])
    cfg = GenerationConfig(top_p=1.0, repetition_penalty=100.0)
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_next_token(logits, seen, cfg, g)) for _ in range(50)]
    assert draws.count(1) > 35  # p = e^2 / (e^2 + e^0.02) = 0.88


def test_bad_generation_input(core):
    with pytest.raises(StarctlError, match="empty prompt"):
        generate(core, ["  "], GenerationConfig(steps=1))
    with pytest.raises(StarctlError, match="steps must be >= 1"):
        generate(core, PROMPTS, GenerationConfig(steps=0))
    with pytest.raises(StarctlError, match="exceeds the backbone's context"):
        generate(core, ["word " * 400], GenerationConfig(steps=1))
    with pytest.raises(StarctlError, match="plan-every"):
        parse_plan_every("often")
    assert parse_plan_every("sentence") == "sentence" and parse_plan_every("8") == 8


def test_nucleus_shortcut_matches_a_full_sort():
    """sample_next_token looks for the nucleus among the top NUCLEUS_CANDIDATES tokens first; the
    draws must be those of the plain full-sort implementation (same generator state)."""
    def full_sort(logits, seen, cfg, generator):
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits) / cfg.temperature
        probs = torch.softmax(logits, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= cfg.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        scale = (0.3, 3.0, 8.0)[trial % 3]  # 0.3: flat, the shortcut falls back to a full sort
        logits = torch.randn(4, 12000, generator=g) * scale
        seen = torch.rand(4, 12000, generator=g) < 0.02
        cfg = GenerationConfig(top_p=(0.9, 0.5)[trial % 2], temperature=(1.0, 0.7)[trial % 2])
        new = sample_next_token(logits, seen, cfg, torch.Generator().manual_seed(trial))
        assert torch.equal(new, full_sort(logits, seen, cfg, torch.Generator().manual_seed(trial)))
