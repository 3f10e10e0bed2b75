"""`starctl bench`: the speed of STAR-LDM side by side with plain decoding and the reference
algorithm, in ONE run, with the same prompts, decoding settings and number of new tokens.

Methods measured (one row per method x prompt length x denoising steps x batch size):

    plain-hf          the backbone alone through `transformers` `generate` (KV cache, do_sample,
                      top-p 0.9, repetition penalty 1.2, no top-k, LoRA adapters disabled,
                      exactly `new_tokens` tokens): what a user would otherwise run
    plain-loop        the backbone alone through our own sampling loop (`generate_plain`)
    star              STAR-LDM unsteered: prefix cache -> think -> write
    star-steer1       the same, steered by one attribute label
    star-steer3       the same, steered by three attribute labels (three heads)
    think-cached      thinking only, the cached way: prefix encoded once, then every denoising
                      step runs the K plan slots on top of its KV cache (prefix time included)
    think-reference   thinking only, the reference way: the whole prefix re-run at every
                      denoising step, one example at a time (GenerationConfig.reference_thinking)

Steering uses the trained heads that fit the core (through `Star.generate(steer=...)`); when no
head fits, it uses randomly initialised heads of the same size in the core's latent space, so
the COST of steering is still measured, and the output says so (`steering_source`).

Headline figures (also in the returned dict):

    steered_over_plain   wall time of star-steer1 (20 steps, batch 8, 128-token prompts, 64 new
                         tokens) / wall time of plain-hf on the same prompts
    cached_speedup_512   think-reference / think-cached time (20 steps, 512-token prompts, batch
                         8, or the largest batch measured for think-reference); the cached time
                         includes encoding the prefix once (`cached_speedup_512_think_only`
                         leaves it out)
    steered_over_plain_per_token   the same ratio per new token: our loop ends a row at EOS,
                         transformers is held to exactly 64, so a steered run that met EOS
                         wrote fewer tokens; `new_tokens` of each row says how many

Wall times are of the whole call (tokenisation, prefix, thinking, writing). With a busy machine
single runs can be inflated several-fold: rerun on an idle one (`wall_s_runs` lists the runs).

When the grid lacks a headline's exact configuration the nearest measured one is used and
written under `headline_configs`.

Timing: one warm-up of every method before the grid; each configuration is then run once, and
again up to `repeats` times while a run takes under `cheap_s` seconds (the median is reported).
Peak memory per row: on CUDA torch.cuda.max_memory_allocated (reset before each run); on a CPU
the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs before each run;
elsewhere psutil polled every 5 ms), both as the absolute peak and as the rise over the resident
size before the run.

Where does the time go? `profile_generation` (cProfile or torch.profiler) prints the hottest
functions of one generation; `python -m starctl.bench --profile` runs it on the default core.
"""

from __future__ import annotations

import cProfile
import io
import json
import math
import os
import platform
import pstats
import re
import statistics
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .errors import StarctlError
from .generation import (
    GenerationConfig,
    GenerationResult,
    _Batch,
    generate,
    generate_plain,
    plain_backbone,
    think,
)
from .model import StarCore
from .sampler import Guidance
from .schedule import alpha_sigma

METHODS = ("plain-hf", "plain-loop", "star", "star-steer1", "star-steer3", "think-cached", "think-reference")
PLAIN_METHODS = ("plain-hf", "plain-loop")
STAR_METHODS = ("star", "star-steer1", "star-steer3")
THINK_METHODS = ("think-cached", "think-reference")
DEFAULT_STEER_LABELS = ("positive", "sport", "non-toxic")   # sentiment, topic, toxicity
STEER_STRENGTH = 0.8
HEADLINE_STEERED = {"prompt_tokens": 128, "steps": 20, "batch": 8}
HEADLINE_CACHED = {"prompt_tokens": 512, "steps": 20, "batch": 8}


# --------------------------------------------------------------------------------------------
# What to measure
# --------------------------------------------------------------------------------------------


@dataclass
class BenchGrid:
    """The configurations measured: `jobs()` lists (method, prompt_tokens, steps, batch)."""

    prompt_lengths: tuple[int, ...] = (32, 128, 512)
    steps: tuple[int, ...] = (5, 10, 20)
    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 64
    methods: tuple[str, ...] = METHODS
    repeats: int = 3
    cheap_s: float = 3.0
    # explicit job list replacing the cartesian product (the quick grid uses one)
    only: tuple[tuple[str, int, int | None, int], ...] | None = None

    @classmethod
    def full(cls) -> "BenchGrid":
        return cls()

    @classmethod
    def quick(cls) -> "BenchGrid":
        """A subset that finishes in a few minutes on 2 CPU cores and still gives both headlines.
        (think-reference at 512 tokens runs with batch 1 only: batch 8 alone takes minutes.)"""
        return cls(prompt_lengths=(128, 512), steps=(20,), batches=(1, 8), repeats=1, only=(
            ("plain-hf", 128, None, 8),
            ("plain-loop", 128, None, 8),
            ("star", 128, 20, 8),
            ("star-steer1", 128, 20, 8),
            ("star-steer3", 128, 20, 8),
            ("think-cached", 512, 20, 1),
            ("think-reference", 512, 20, 1),
            ("think-cached", 512, 20, 8),
        ))

    def jobs(self) -> list[tuple[str, int, int | None, int]]:
        if self.only is not None:
            return list(self.only)
        out = []
        for length in self.prompt_lengths:
            for batch in self.batches:
                for method in self.methods:
                    if method in PLAIN_METHODS:
                        out.append((method, length, None, batch))
                    else:
                        out.extend((method, length, s, batch) for s in self.steps)
        return out


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def heldout_texts(source: str = "bbc") -> list[str]:
    """Documents of `source` held out by the training recipes' split (5%, seed 0), then the rest."""
    from .corpora import load_texts, split_documents

    docs = load_texts(source)
    train, held = split_documents(docs, 0.05, seed=0)
    return held + train


def exact_length_prompts(tokenizer, texts: Sequence[str], length: int, n: int) -> list[str]:
    """`n` prompts of exactly `length` tokens: document beginnings (documents shorter than that
    are joined to the next ones by a blank line), kept only when the cut text re-tokenises to
    exactly `length` tokens."""
    out: list[str] = []
    text = ""
    for doc in texts:
        doc = doc.strip()
        if not doc:
            continue
        text = f"{text}\n\n{doc}" if text else doc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            continue
        prompt = tokenizer.decode(ids[:length])
        text = ""
        if prompt.strip() and len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == length:
            out.append(prompt)
            if len(out) == n:
                return out
    raise StarctlError(f"could not build {n} prompts of exactly {length} tokens from {len(texts)} texts")


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _proc_status(field_name: str) -> int | None:
    """A /proc/self/status field in bytes (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def _current_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return _proc_status("VmRSS") or 0


class PeakMemory:
    """Context manager: peak memory of what runs inside it (bytes in .peak and .rise).

    CUDA: max_memory_allocated after reset_peak_memory_stats (rise: over memory_allocated
    before). CPU: VmHWM after resetting it through /proc/self/clear_refs (Linux); where that
    is impossible, psutil's RSS polled every 5 ms in a thread (rise: over the RSS before).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = ""
        self.peak = self.rise = 0
        self._poll: threading.Thread | None = None
        self._stop = threading.Event()
        self._polled = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.base = _current_rss()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        except OSError:
            self.method = "psutil RSS polled every 5 ms"
            self._polled = self.base
            self._poll = threading.Thread(target=self._run_poll, daemon=True)
            self._poll.start()
        return self

    def _run_poll(self):
        while not self._stop.wait(0.005):
            self._polled = max(self._polled, _current_rss())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._poll is not None:
            self._stop.set()
            self._poll.join()
            self.peak = max(self._polled, _current_rss())
        else:
            self.peak = _proc_status("VmHWM") or _current_rss()
        self.rise = max(0, self.peak - self.base)
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    wall_s: float
    think_s: float = 0.0
    write_s: float = 0.0
    prefix_s: float = 0.0
    new_tokens: int = 0
    steps_used: float | None = None


def _from_result(wall: float, r: GenerationResult) -> Timing:
    used = [s for g in r.generations for s in g.steps_used]
    return Timing(wall, r.think_seconds, r.write_seconds, max(0.0, r.seconds - r.think_seconds - r.write_seconds),
                  r.new_tokens, statistics.mean(used) if used else None)


def hf_generate(core: StarCore, prompts: list[str], cfg: GenerationConfig) -> torch.Tensor:
    """Plain backbone sampling through transformers `generate`: exactly cfg.max_new_tokens new
    tokens per prompt, same top-p / temperature / repetition penalty, no top-k, KV cache on."""
    tok = core.tokenizer
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(cfg.num_samples)]
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r)
        mask[i, P - len(r):] = 1
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    with plain_backbone(core), torch.no_grad():
        out = core.backbone.generate(
            input_ids=ids.to(core.device), attention_mask=mask.to(core.device), do_sample=True,
            top_p=cfg.top_p, top_k=0, temperature=cfg.temperature, repetition_penalty=cfg.repetition_penalty,
            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens, use_cache=True,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return out[:, P:]


def think_only(core: StarCore, prompts: list[str], cfg: GenerationConfig) -> Timing:
    """Thinking alone (no writing): one plan per prompt. The cached way includes encoding the
    prefix into its KV cache (reported as prefix_s); the reference way needs no cache."""
    token_lists = [core.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    g = torch.Generator().manual_seed(cfg.seed or 0)
    dev = core.device
    with torch.no_grad():
        if cfg.reference_thinking:  # think() reads only the texts and the batch size
            batch = types.SimpleNamespace(texts=token_lists, mask=torch.empty(len(token_lists), 0))
        _sync(dev)
        t0 = t1 = time.perf_counter()
        if not cfg.reference_thinking:
            batch = _Batch(core, token_lists)
            _sync(dev)
            t1 = time.perf_counter()
        _, used = think(core, batch, cfg, [], g)
        _sync(dev)
        t2 = time.perf_counter()
    return Timing(t2 - t0, think_s=t2 - t1, prefix_s=t1 - t0, steps_used=used)


def random_head_guidance(core: StarCore, labels: Sequence[str], strength: float = STEER_STRENGTH,
                         seed: int = 0) -> Guidance:
    """Guidance from randomly initialised attribute heads (one per label, default head size) in
    the core's latent space: meaningless steering, representative cost. eps~ = eps - s sigma grad."""
    from .heads import DEFAULT_MAX_SCALE, AttributeHead, HeadConfig

    torch.manual_seed(seed)
    heads = [AttributeHead(HeadConfig(name=f"random-{label}", labels=[label, "other"],
                                      latent=core.latent_space)).to(core.device).eval() for label in labels]
    scale = strength * DEFAULT_MAX_SCALE

    def guide(z: torch.Tensor, logsnr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        _, sigma = alpha_sigma(logsnr.float())
        with torch.enable_grad():
            zz = z.detach().float().clone().requires_grad_(True)
            alpha2 = torch.sigmoid(logsnr.float())
            total = sum(h.log_probs(zz, alpha2)[:, 0].sum() for h in heads)
            (grad,) = torch.autograd.grad(total, zz)
        return eps - (scale * sigma[:, None] * grad).to(eps.dtype)

    return guide


class Runner:
    """Runs one method on a set of prompts; knows how to steer (trained heads or random ones)."""

    def __init__(self, core: StarCore, steer_labels: Sequence[str], log: Callable[[str], None]):
        self.core = core
        self.labels = list(steer_labels)
        self.star = None
        self.steering_source = ""
        self._random: dict[int, list[Guidance]] = {}
        self._setup_steering(log)

    def _setup_steering(self, log) -> None:
        from .api import Star

        star = Star(self.core)
        try:
            star.generate(["Hello"], steer={label: STEER_STRENGTH for label in self.labels[:3]}, steps=1,
                          max_new_tokens=1)
        except (StarctlError, ImportError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.steering_source = (f"RANDOM heads (no trained head fits this core: {why}); steering cost only, "
                                    f"labels {', '.join(self.labels[:3])} are placeholders")
            log(f"steering: {self.steering_source}")
            return
        self.star = star
        self.steering_source = f"trained heads via Star.generate(steer=...): {', '.join(self.labels[:3])}"
        log(f"steering: {self.steering_source}")

    def guidance(self, n: int) -> list[Guidance]:
        if n not in self._random:
            self._random[n] = [random_head_guidance(self.core, self.labels[:n])]
        return self._random[n]

    def run(self, method: str, prompts: list[str], cfg: GenerationConfig) -> Timing:
        core, dev = self.core, self.core.device
        _sync(dev)
        t0 = time.perf_counter()
        if method == "plain-hf":
            out = hf_generate(core, prompts, cfg)
            _sync(dev)
            wall = time.perf_counter() - t0
            return Timing(wall, write_s=wall, new_tokens=int(out.numel()))
        if method == "plain-loop":
            r = generate_plain(core, prompts, cfg)
        elif method in STAR_METHODS:
            n = {"star": 0, "star-steer1": 1, "star-steer3": 3}[method]
            if n and self.star is not None:
                steer = {label: STEER_STRENGTH for label in self.labels[:n]}
                _, r = self.star.generate(prompts, steer=steer, **asdict(cfg))
            else:
                r = generate(core, prompts, cfg, self.guidance(n) if n else None)
        elif method in THINK_METHODS:
            return think_only(core, prompts, replace(cfg, reference_thinking=method == "think-reference"))
        else:
            raise StarctlError(f"unknown bench method {method!r}; known: {', '.join(METHODS)}")
        _sync(dev)
        return _from_result(time.perf_counter() - t0, r)


def _row(method, length, steps, batch, cfg, timings: list[Timing], mem: PeakMemory) -> dict:
    walls = [t.wall_s for t in timings]
    t = sorted(timings, key=lambda x: x.wall_s)[len(timings) // 2]  # the median run
    wall = statistics.median(walls)
    row = {
        "method": method, "prompt_tokens": length, "steps": steps, "batch": batch,
        "new_tokens_per_row": None if method in THINK_METHODS else cfg.max_new_tokens,
        "wall_s": wall, "wall_s_runs": walls, "think_s": t.think_s, "write_s": t.write_s, "prefix_s": t.prefix_s,
        "think_share": t.think_s / t.wall_s if t.wall_s else None,
        "write_share": t.write_s / t.wall_s if t.wall_s else None,
        "new_tokens": t.new_tokens,
        "tokens_per_s": t.new_tokens / t.wall_s if t.new_tokens and t.wall_s else None,
        "steps_used": t.steps_used,
        "peak_mem_mb": mem.peak / 2**20, "mem_rise_mb": mem.rise / 2**20,
    }
    return row


def measure(runner: Runner, method: str, prompts: list[str], cfg: GenerationConfig, repeats: int,
            cheap_s: float) -> tuple[list[Timing], PeakMemory]:
    """Run once under the memory meter, then repeat while cheap (up to `repeats` runs)."""
    with PeakMemory(runner.core.device) as mem:
        timings = [runner.run(method, prompts, cfg)]
    while len(timings) < repeats and sum(t.wall_s for t in timings) < cheap_s:
        timings.append(runner.run(method, prompts, cfg))
    return timings, mem


# --------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------


def _pick(rows: list[dict], method: str, target: dict) -> dict | None:
    """The row of `method` nearest to `target` (exact if measured): the largest batch not above
    the target's (else the smallest), then the nearest steps and prompt length."""
    mine = [r for r in rows if r["method"] == method]
    if not mine:
        return None

    def key(r):
        b_ok = r["batch"] <= target["batch"]
        s = r["steps"] if r["steps"] is not None else target["steps"]
        return (not b_ok, -r["batch"] if b_ok else r["batch"], abs(s - target["steps"]),
                abs(math.log(r["prompt_tokens"] / target["prompt_tokens"])))

    return min(mine, key=key)


def headlines(rows: list[dict]) -> tuple[dict, dict]:
    out, configs = {}, {}
    steer = _pick(rows, "star-steer1", HEADLINE_STEERED)
    if steer is not None:
        plain = [r for r in rows if r["method"] == "plain-hf" and r["prompt_tokens"] == steer["prompt_tokens"]
                 and r["batch"] == steer["batch"]]
        if plain:
            out["steered_over_plain"] = steer["wall_s"] / plain[0]["wall_s"]
            configs["steered_over_plain"] = {k: steer[k] for k in ("prompt_tokens", "steps", "batch",
                                                                   "new_tokens_per_row")}
            # Our loop ends a row at EOS; transformers is held to exactly new_tokens per row. When
            # the steered run wrote fewer tokens, the per-token ratio is the fairer one.
            if steer.get("new_tokens") and plain[0].get("new_tokens"):
                out["steered_over_plain_per_token"] = ((steer["wall_s"] / steer["new_tokens"])
                                                       / (plain[0]["wall_s"] / plain[0]["new_tokens"]))
    ref = _pick(rows, "think-reference", HEADLINE_CACHED)
    if ref is not None:
        cached = [r for r in rows if r["method"] == "think-cached" and
                  (r["prompt_tokens"], r["steps"], r["batch"]) == (ref["prompt_tokens"], ref["steps"], ref["batch"])]
        if cached:
            out["cached_speedup_512"] = ref["wall_s"] / cached[0]["wall_s"]
            out["cached_speedup_512_think_only"] = ref["think_s"] / max(cached[0]["think_s"], 1e-9)
            configs["cached_speedup_512"] = {k: ref[k] for k in ("prompt_tokens", "steps", "batch")}
    return out, configs


def _fmt(x, spec=".3g"):
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def markdown_table(result: dict) -> str:
    lines = [f"# starctl bench ({result['device']}, {result['threads']} threads, core {result['core']})", ""]
    for k in ("steered_over_plain", "steered_over_plain_per_token", "cached_speedup_512",
              "cached_speedup_512_think_only"):
        if k in result:
            lines.append(f"- **{k}**: {result[k]:.3g}"
                         + (f" at {result['headline_configs'][k]}" if k in result["headline_configs"] else ""))
    lines += [f"- steering: {result['steering_source']}",
              f"- memory: {result['memory_method']}; peak = the process's peak during the run, rise = over its "
              "size before the run (memory an earlier run freed and the allocator kept is reused, so the rise "
              "understates a cold run)", "",
              "| method | prompt | steps | batch | wall s | tokens/s | think % | write % | prefix s | peak MB | rise MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        pct = lambda x: "-" if x is None else f"{100 * x:.0f}"  # noqa: E731
        lines.append(f"| {r['method']} | {r['prompt_tokens']} | {_fmt(r['steps'])} | {r['batch']} | "
                     f"{r['wall_s']:.3g} | {_fmt(r['tokens_per_s'])} | {pct(r['think_share'])} | "
                     f"{pct(r['write_share'])} | {r['prefix_s']:.3g} | {r['peak_mem_mb']:.0f} | {r['mem_rise_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    # (a) full generation: wall time against prompt length, at the largest steps and batch
    big_b = max(r["batch"] for r in rows)
    steps = [r["steps"] for r in rows if r["steps"] is not None]
    big_s = max(steps) if steps else None
    ax = axes[0]
    for m in PLAIN_METHODS + STAR_METHODS:
        pts = sorted((r["prompt_tokens"], r["wall_s"]) for r in rows if r["method"] == m and r["batch"] == big_b
                     and (r["steps"] is None or r["steps"] == big_s))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("wall seconds")
    ax.set_title(f"generation, batch {big_b}, {big_s} steps", fontsize=9)
    ax.legend(fontsize=7)
    # (b) thinking only: cached vs reference against steps, per prompt length and batch (the
    # largest batch both were measured at, when there is one)
    ax = axes[1]
    think_rows = [r for r in rows if r["method"] in THINK_METHODS]
    batches = [{r["batch"] for r in think_rows if r["method"] == m} for m in THINK_METHODS]
    common = batches[0] & batches[1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = sorted({(r["prompt_tokens"], r["batch"]) for r in think_rows
                     if not common or r["batch"] == max(common)})
    for n, (length, b) in enumerate(series):
        for m, style, mark in (("think-cached", "-", "o"), ("think-reference", "--", "s")):
            pts = sorted((r["steps"], r["wall_s"]) for r in think_rows
                         if r["method"] == m and r["prompt_tokens"] == length and r["batch"] == b)
            if pts:
                ax.plot(*zip(*pts), style, marker=mark, color=colours[n % len(colours)],
                        label=f"{m[6:]} {length} tok, batch {b}")
    ax.set_yscale("log")
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("thinking seconds")
    ax.set_title("thinking: cached vs reference", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(core_path: str | Path | None = None, quick: bool = False, out_dir: Path = Path("runs/bench"),
              steer_labels: Sequence[str] = DEFAULT_STEER_LABELS, log: Callable[[str], None] = print, *,
              grid: BenchGrid | None = None, texts: Sequence[str] | None = None, threads: int | None = None,
              device: str = "auto", core: StarCore | None = None) -> dict:
    """Measure every job of `grid` (default: the full grid, or BenchGrid.quick() when `quick`)
    and write bench.json, bench.md and bench.png into `out_dir`. Returns the JSON's dict:
    settings, `rows` (one per measurement), `steered_over_plain`, `cached_speedup_512`.

    `texts`: documents to cut prompts from (default: held-out-first BBC News articles).
    `threads`: torch CPU threads (default: the CPUs this process may use). `core`: an already
    loaded core instead of `core_path`.
    """
    from .api import Star, default_core_path

    grid = grid or (BenchGrid.quick() if quick else BenchGrid.full())
    old_threads = torch.get_num_threads()
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    try:
        started = time.time()
        if core is None:
            core = Star.load(core_path, device=device).core
            core_name = str(core_path or default_core_path())
        else:
            core_name = "(given)"
        core.eval()
        dev = core.device
        jobs = grid.jobs()
        lengths = sorted({j[1] for j in jobs})
        max_batch = max(j[3] for j in jobs)
        source = list(texts) if texts is not None else heldout_texts()
        prompts = {L: exact_length_prompts(core.tokenizer, source, L, max_batch) for L in lengths}
        log(f"bench: {len(jobs)} measurements, prompt lengths {lengths}, device {dev}, {threads} threads")
        runner = Runner(core, steer_labels, log)
        base = GenerationConfig(max_new_tokens=grid.new_tokens, seed=0)

        # Warm-up: every method once, small (one-off costs: lazy init, kernels, allocator).
        warm_prompts = prompts[lengths[0]][:min(2, max_batch)]
        for method in dict.fromkeys(j[0] for j in jobs):
            runner.run(method, warm_prompts, replace(base, steps=2, max_new_tokens=min(4, grid.new_tokens)))

        rows = []
        memory_method = ""
        for n, (method, length, steps, batch) in enumerate(jobs, 1):
            cfg = replace(base, steps=steps or base.steps)
            timings, mem = measure(runner, method, prompts[length][:batch], cfg, grid.repeats, grid.cheap_s)
            row = _row(method, length, steps, batch, cfg, timings, mem)
            memory_method = mem.method
            rows.append(row)
            log(f"[{n}/{len(jobs)}] {method:15s} prompt {length:4d} steps {_fmt(steps):>3s} batch {batch}: "
                f"{row['wall_s']:.3f} s" + (f", {row['tokens_per_s']:.1f} tok/s" if row["tokens_per_s"] else "")
                + f", peak {row['peak_mem_mb']:.0f} MB")

        heads, configs = headlines(rows)
        result = {
            "core": core_name, "device": str(dev), "dtype": str(core.token_embeddings().dtype),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "quick": quick, "grid": asdict(grid), "new_tokens": grid.new_tokens,
            "decoding": {"top_p": base.top_p, "temperature": base.temperature,
                         "repetition_penalty": base.repetition_penalty, "spacing": base.spacing},
            "steering_source": runner.steering_source, "steer_labels": list(steer_labels)[:3],
            "memory_method": memory_method,
            **heads, "headline_configs": configs, "rows": rows, "seconds": round(time.time() - started, 1),
        }
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "bench.md").write_text(markdown_table(result))
        plot(result, out_dir / "bench.png")
        for k in ("steered_over_plain", "cached_speedup_512"):
            if k in result:
                log(f"{k}: {result[k]:.3g} at {configs[k]}")
        log(f"wrote {out_dir}/bench.json, bench.md, bench.png")
        return result
    finally:
        torch.set_num_threads(old_threads)


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------


def profile_generation(core: StarCore, prompts: list[str], cfg: GenerationConfig | None = None,
                       guidance: list[Guidance] | None = None, kind: str = "cprofile", top: int = 30,
                       sort: str = "tottime") -> str:
    """Where the time of one `generate` call goes, as text.

    kind="cprofile": Python-level functions sorted by `sort` ('tottime': own time, 'cumulative':
    with callees), which shows Python loops and overheads. kind="torch": torch.profiler's
    operator table (self CPU time, or CUDA time on a GPU), which shows the heavy kernels.
    A warm-up call runs first and is not profiled.
    """
    cfg = cfg or GenerationConfig()
    generate(core, prompts, replace(cfg, steps=2, max_new_tokens=2), guidance)
    if kind == "cprofile":
        prof = cProfile.Profile()
        prof.enable()
        result = generate(core, prompts, cfg, guidance)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(sort).print_stats(top)
        head = (f"generate: {result.seconds:.3f} s (think {result.think_seconds:.3f}, write "
                f"{result.write_seconds:.3f}), {result.new_tokens} tokens\n")
        return head + buf.getvalue()
    if kind == "torch":
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if core.device.type == "cuda" else [])
        with profile(activities=acts, record_shapes=False) as prof:
            result = generate(core, prompts, cfg, guidance)
        by = "self_cuda_time_total" if core.device.type == "cuda" else "self_cpu_time_total"
        return (f"generate: {result.seconds:.3f} s\n"
                + prof.key_averages().table(sort_by=by, row_limit=top))
    raise StarctlError(f"unknown profiler {kind!r}: use 'cprofile' or 'torch'")


DEFAULT_TOLERANCES = (0.1, 0.03, 0.01, 0.003)


@torch.no_grad()
def _plans_with_tolerance(core: StarCore, prefixes: list[list[int]], steps: int, tolerance: float | None,
                          seed: int, batch_size: int) -> tuple[torch.Tensor, list[int], float]:
    """Plans (N, d) sampled from each prefix, evaluations used per example, thinking seconds.
    Batch b uses the generator seed + b whatever the tolerance, so every tolerance starts from
    the same noise and the plans are comparable one to one."""
    cfg = GenerationConfig(steps=steps, tolerance=tolerance)
    plans, used, seconds = [], [], 0.0
    for b, start in enumerate(range(0, len(prefixes), batch_size)):
        rows = prefixes[start:start + batch_size]
        batch = _Batch(core, rows)
        g = torch.Generator().manual_seed(seed + b)
        _sync(core.device)
        t0 = time.perf_counter()
        plan, n = think(core, batch, cfg, [], g)
        _sync(core.device)
        seconds += time.perf_counter() - t0
        plans.append(plan.float().cpu())
        used += [n] * len(rows)
    return torch.cat(plans), used, seconds


def adaptive_thinking_eval(core: StarCore, tolerances: Sequence[float] = DEFAULT_TOLERANCES, steps: int = 20,
                           settings=None, examples=None, out_dir: Path | None = None, batch_size: int = 16,
                           log: Callable[[str], None] = print) -> dict:
    """Steps saved vs plan quality of adaptive thinking, on `starctl eval core`'s held-out chunks.

    For `steps` fixed steps (tolerance None) and each tolerance: mean denoiser evaluations per
    plan, thinking seconds, the plan's cosine to the true continuation's embedding (as in eval
    core), its relative distance to the fixed-steps plan from the same noise, and the
    continuation NLL given the sampled plan (eval core's nll_prior). A batch stops when all its
    plans have converged, so `batch_size` matters (1 = per-plan stopping).
    `settings`: an evaluation.EvalSettings (default: its quick settings); `examples`: a
    data.PlanExamples to use instead of building the held-out chunks.
    """
    from .evaluation import EvalSettings, continuation_nlls, heldout_examples, mean_cosine

    s = settings or EvalSettings.quick()
    if examples is None:
        from .assets import load_encoder

        encoder = load_encoder(core.config.encoder)
        examples = heldout_examples(core, encoder, s)
        del encoder
    ex, space = examples, core.latent_space
    raw = ex.embeddings
    nll_shuffled = continuation_nlls(core, ex, space.normalise(raw).roll(1, dims=0))
    rows, full = [], None
    for tol in (None, *tolerances):
        plans, used, seconds = _plans_with_tolerance(core, ex.prefixes, steps, tol, s.seed, batch_size)
        if full is None:
            full = plans
        mean_used = statistics.mean(used)
        row = {
            "tolerance": tol, "mean_steps": mean_used, "steps_saved": 1 - mean_used / steps,
            "think_s": seconds,
            "plan_cosine": mean_cosine(space.denormalise(plans), raw),
            "rel_dist_to_full": float(((plans - full).norm(dim=1) / full.norm(dim=1).clamp_min(1e-12)).mean()),
            "nll_prior": continuation_nlls(core, ex, plans),
        }
        rows.append(row)
        log(f"tolerance {tol}: {mean_used:.1f}/{steps} evaluations, {seconds:.2f} s thinking, cosine "
            f"{row['plan_cosine']:.4f}, distance to {steps}-step plan {row['rel_dist_to_full']:.4f}, "
            f"NLL {row['nll_prior']:.4f}")
    result = {"steps": steps, "batch_size": batch_size, "examples": len(ex), "nll_shuffled": nll_shuffled,
              "rows": rows}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "adaptive.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [f"# adaptive thinking ({len(ex)} held-out chunks, {steps} steps max, batch {batch_size})", "",
                 f"NLL with a shuffled plan (no information): {nll_shuffled:.4f}", "",
                 "| tolerance | mean steps | steps saved | think s | plan cosine | distance to full | NLL prior |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {_fmt(r['tolerance'], 'g')} | {r['mean_steps']:.1f} | {100 * r['steps_saved']:.0f}% | "
                         f"{r['think_s']:.2f} | {r['plan_cosine']:.4f} | {r['rel_dist_to_full']:.4f} | "
                         f"{r['nll_prior']:.4f} |")
        (out_dir / "adaptive.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - manual entry point
    import argparse

    ap = argparse.ArgumentParser(description="starctl bench (speed) or a generation profile")
    ap.add_argument("--core", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="default runs/bench (or runs/adaptive-thinking)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", choices=("cprofile", "torch"), default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=None, help="profile: 8 prompts; adaptive: batch 16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--adaptive", action="store_true", help="steps saved vs quality of adaptive thinking")
    ap.add_argument("--tolerances", default=",".join(map(str, DEFAULT_TOLERANCES)))
    ap.add_argument("--full-eval", action="store_true", help="with --adaptive: eval core's full settings")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.adaptive:
        from .api import Star
        from .evaluation import EvalSettings

        core = Star.load(args.core).core
        settings = EvalSettings() if args.full_eval else EvalSettings.quick()
        tols = [float(t) for t in args.tolerances.split(",") if t]
        adaptive_thinking_eval(core, tols, steps=args.steps, settings=settings,
                               out_dir=Path(args.out or "runs/adaptive-thinking"), batch_size=args.batch or 16)
        return
    if args.profile:
        from .api import Star

        core = Star.load(args.core).core
        prompts = exact_length_prompts(core.tokenizer, heldout_texts(), args.prompt_tokens, args.batch or 8)
        print(profile_generation(core, prompts, GenerationConfig(steps=args.steps), kind=args.profile))
        return
    run_bench(args.core, quick=args.quick, out_dir=Path(args.out or "runs/bench"), threads=args.threads)


if __name__ == "__main__":  # pragma: no cover
    main()
