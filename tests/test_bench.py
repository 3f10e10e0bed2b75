"""`starctl bench` machinery on the tiny core: files, headline figures, separate reference timing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from starctl.bench import (
    HEADLINE_CACHED,
    HEADLINE_STEERED,
    BenchGrid,
    PeakMemory,
    adaptive_thinking_eval,
    exact_length_prompts,
    headlines,
    profile_generation,
    run_bench,
)
from starctl.errors import StarctlError
from starctl.generation import GenerationConfig
from starctl.model import StarCore
from tiny import DOCS


@pytest.fixture(scope="module")
def core(tiny_core_dir):
    return StarCore.from_pretrained(tiny_core_dir)


@pytest.fixture(scope="module")
def bench(core, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    grid = BenchGrid(prompt_lengths=(8, 16), steps=(2, 3), batches=(1, 2), new_tokens=4, repeats=2, cheap_s=0.5)
    logs: list[str] = []
    result = run_bench(core=core, out_dir=out, grid=grid, texts=DOCS, threads=1, log=logs.append)
    return result, out, logs, grid


def test_bench_writes_files_and_headlines(bench):
    result, out, logs, grid = bench
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert json.loads((out / "bench.json").read_text())["rows"] == result["rows"]
    for key in ("steered_over_plain", "cached_speedup_512"):
        assert math.isfinite(result[key]) and result[key] > 0
        assert key in (out / "bench.md").read_text()
    # The grid lacks the headline configurations: the nearest measured ones are used and named.
    assert result["headline_configs"]["steered_over_plain"] == {"prompt_tokens": 16, "steps": 3, "batch": 2,
                                                                "new_tokens_per_row": 4}
    assert result["headline_configs"]["cached_speedup_512"] == {"prompt_tokens": 16, "steps": 3, "batch": 2}
    assert result["threads"] == 1
    assert len(result["rows"]) == len(grid.jobs()) == 2 * 2 * (2 + 5 * 2)
    # No trained head fits the tiny core's latent space: random heads, and the output says so.
    assert result["steering_source"].startswith("RANDOM heads")
    assert any("RANDOM heads" in line for line in logs)


def test_rows_are_sane(bench):
    result, *_ = bench
    rows = result["rows"]
    for r in rows:
        assert r["wall_s"] > 0 and r["peak_mem_mb"] > 0 and r["mem_rise_mb"] >= 0
        if r["method"] in ("plain-hf", "plain-loop", "star", "star-steer1", "star-steer3"):
            assert r["new_tokens"] > 0 and r["tokens_per_s"] > 0
    plain_hf = [r for r in rows if r["method"] == "plain-hf"]
    # transformers generate writes exactly new_tokens per row
    assert all(r["new_tokens"] == 4 * r["batch"] for r in plain_hf)
    star = [r for r in rows if r["method"] == "star"]
    assert all(0 < r["think_share"] < 1 and 0 < r["write_share"] < 1 for r in star)


def test_reference_thinking_is_measured_separately(bench):
    result, *_ = bench
    rows = result["rows"]
    key = lambda r: (r["prompt_tokens"], r["steps"], r["batch"])  # noqa: E731
    cached = {key(r): r for r in rows if r["method"] == "think-cached"}
    reference = {key(r): r for r in rows if r["method"] == "think-reference"}
    assert cached and set(cached) == set(reference)
    for k in cached:
        # the cached way encodes the prefix once; the reference way has no cache to build
        assert cached[k]["prefix_s"] > 0 and reference[k]["prefix_s"] == 0
        assert reference[k]["think_s"] > 0 and reference[k]["wall_s_runs"] != cached[k]["wall_s_runs"]
        assert reference[k]["steps_used"] == cached[k]["steps_used"] == k[1]
    h = result["headline_configs"]["cached_speedup_512"]
    k = (h["prompt_tokens"], h["steps"], h["batch"])
    assert result["cached_speedup_512"] == pytest.approx(reference[k]["wall_s"] / cached[k]["wall_s"])


def test_quick_grid_yields_both_headlines():
    """The quick grid holds the exact steered headline and a 512-token cached/reference pair."""
    rows = [{"method": m, "prompt_tokens": L, "steps": s, "batch": b, "wall_s": 1.0 + i, "think_s": 0.5 + i,
             "new_tokens_per_row": 64} for i, (m, L, s, b) in enumerate(BenchGrid.quick().jobs())]
    out, configs = headlines(rows)
    assert set(out) >= {"steered_over_plain", "cached_speedup_512"}
    assert {k: configs["steered_over_plain"][k] for k in HEADLINE_STEERED} == HEADLINE_STEERED
    assert configs["cached_speedup_512"]["prompt_tokens"] == HEADLINE_CACHED["prompt_tokens"]
    assert configs["cached_speedup_512"]["steps"] == HEADLINE_CACHED["steps"]
    # the full grid holds both headline configurations exactly
    full = BenchGrid.full().jobs()
    assert ("star-steer1", 128, 20, 8) in full and ("plain-hf", 128, None, 8) in full
    assert ("think-reference", 512, 20, 8) in full and ("think-cached", 512, 20, 8) in full


def test_exact_length_prompts(core):
    prompts = exact_length_prompts(core.tokenizer, DOCS, 12, 3)
    assert len(prompts) == 3
    assert all(len(core.tokenizer(p, add_special_tokens=False)["input_ids"]) == 12 for p in prompts)
    with pytest.raises(StarctlError, match="could not build"):
        exact_length_prompts(core.tokenizer, DOCS[:2], 500, 2)


def test_peak_memory_sees_an_allocation():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
        del x
    assert mem.rise >= 48 * 2**20 and mem.peak >= mem.rise and mem.method


def test_profile_generation(core):
    prompts = ["The movie was", "Stocks fell sharply"]
    cfg = GenerationConfig(steps=2, max_new_tokens=3)
    text = profile_generation(core, prompts, cfg, kind="cprofile", top=10)
    assert text.startswith("generate:") and "function calls" in text
    assert "Name" in profile_generation(core, prompts, cfg, kind="torch", top=5)
    with pytest.raises(StarctlError, match="unknown profiler"):
        profile_generation(core, prompts, cfg, kind="perf")


def test_adaptive_thinking_eval(core, tmp_path):
    from starctl.data import PlanExamples

    tok = core.tokenizer
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in DOCS[:6]]
    ex = PlanExamples([i[:4] for i in ids], [i[4:] or i[:2] for i in ids],
                      torch.randn(6, core.config.latent_dim, generator=torch.Generator().manual_seed(0)))
    result = adaptive_thinking_eval(core, (1e6, 1e-9), steps=6, examples=ex, out_dir=tmp_path, batch_size=4,
                                    log=lambda m: None)
    full, loose, tight = result["rows"]
    assert full["tolerance"] is None and full["mean_steps"] == 6 and full["rel_dist_to_full"] == 0
    assert loose["mean_steps"] < 6 and loose["steps_saved"] > 0      # a huge tolerance stops early...
    assert tight["mean_steps"] == 6 and tight["rel_dist_to_full"] < 1e-5  # ...a tiny one never does
    assert all(math.isfinite(r["nll_prior"]) and -1 <= r["plan_cosine"] <= 1 for r in result["rows"])
    assert (tmp_path / "adaptive.json").is_file() and "steps saved" in (tmp_path / "adaptive.md").read_text()
