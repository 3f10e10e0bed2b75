"""Training the core: the weighted ELBO over chunks with random stop points.

loss = CE(continuation | prefix, noisy plan)                      (decoder likelihood)
     + lambda * E_lambda[ w(lambda) / p(lambda) * |v - v_hat|^2 ] (diffusion prior over plans)

with one noise level per example shared by both terms. w is the sigmoid weighting expressed
for v (schedule.sigmoid_v_weight) and p(lambda) the density of the sampled log-SNR, so the
Monte-Carlo estimate is importance-corrected for the training schedule (which may be shifted
towards low noise; the weighting keeps the objective the same).

A run lives in one folder: recipe.json, metrics.jsonl (loss terms and the plan gain),
checkpoint/ (trained weights, EMA, optimiser, RNG, step: an interrupted run resumes from it
with nothing lost) and final/ (the EMA weights as a loadable core).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .data import PlanExamples, build_plan_examples, collate
from .errors import StarctlError
from .latent import measure_statistics
from .model import StarConfig, StarCore
from .schedule import CosineSchedule, sigmoid_v_weight
from .vocab import bag_targets, choose_vocabulary, fit_bow_map, recall_at_k


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["wiki", "bbc", "rotten-tomatoes", "lee"])
    heldout_fraction: float = 0.05
    chunk_tokens: int = 64
    min_prefix_tokens: int = 8
    min_cont_tokens: int = 8
    max_chunks: int | None = None
    eval_chunks: int = 256


@dataclass
class TrainConfig:
    core: StarConfig = field(default_factory=StarConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "runs/core"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3                  # generator, score head
    backbone_lr: float = 1e-4         # LoRA or full fine-tune
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    decay_fraction: float = 0.2       # warmup-stable-decay: linear decay over the last fraction
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    diffusion_weight: float = 5.0     # lambda
    sigmoid_bias: float = 0.0
    train_logsnr_shift: float = 0.0   # shift of the training cosine schedule (0 = paper)
    vocab_skip: int = 100             # most frequent tokens left out of the vocabulary route
    vocab_fit_epochs: int = 3
    vocab_sharpen: float = 1.0        # multiply the fitted word logits (sharper slot picks)
    train_generator: bool = True      # False: the soft prompt stays the fitted vocabulary route
    eval_every: int = 100
    eval_alpha2: float = 0.95
    checkpoint_every: int = 50
    max_minutes: float | None = None  # wall-clock budget; the run finalises when it is spent
    seed: int = 0
    threads: int | None = None
    device: str = "auto"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["core"] = self.core.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise StarctlError(f"unknown recipe keys: {', '.join(sorted(unknown))}")
        core = StarConfig.from_dict(d.pop("core", {}))
        data_d = d.pop("data", {})
        unknown = set(data_d) - {f.name for f in fields(DataConfig)}
        if unknown:
            raise StarctlError(f"unknown recipe data keys: {', '.join(sorted(unknown))}")
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(core=core, data=DataConfig(**data_d), **d)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a recipe JSON and apply `key.sub=value` overrides (values parsed as JSON, else str)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise StarctlError(f"recipe not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StarctlError(f"cannot read recipe {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise StarctlError(f"recipe {p} is not valid JSON: line {e.lineno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise StarctlError(f"recipe {p} must hold a JSON object")
    d.pop("description", None)
    for item in overrides:
        if "=" not in item:
            raise StarctlError(f"override must look like key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    try:
        return TrainConfig.from_dict(d)
    except TypeError as e:
        raise StarctlError(f"recipe {p}: {e}") from None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant, linear decay to 0 over the last fraction."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step >= decay_start and cfg.decay_fraction > 0:
        return max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
    return 1.0


class EMA:
    """Exponential moving average of the trained parameters (float32 copies)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        # Warm-up of the decay (as in many EMA implementations): early averages stay short.
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in params.items():
            self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)


def trained_parameters(core: StarCore) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for everything the optimiser updates (names as in trained_state_dict)."""
    out = {}
    for prefix, module in (("generator.", core.generator), ("score_head.", core.score_head), ("backbone.", core.backbone)):
        for k, p in module.named_parameters():
            if p.requires_grad:
                out[prefix + k] = p
    return out


@dataclass
class PlanGain:
    nll_true: float
    nll_shuffled: float
    nll_noise: float

    @property
    def gain(self) -> float:
        return self.nll_shuffled - self.nll_true


@torch.no_grad()
def measure_plan_gain(core: StarCore, examples: PlanExamples, latents: torch.Tensor, alpha2: float = 0.95,
                      batch_size: int = 32, seed: int = 1234) -> PlanGain:
    """Held-out continuation NLL per token with the true plan, a shuffled plan (another example's)
    and pure noise, each noised to alpha^2 (fixed noise, so repeated calls are comparable)."""
    was_training = core.training
    core.eval()
    g = torch.Generator().manual_seed(seed)
    n = len(examples)
    noise = torch.randn(n, latents.shape[1], generator=g)
    shuffled = latents.roll(1, dims=0)
    a = math.sqrt(alpha2)
    s = math.sqrt(1 - alpha2)
    logsnr_value = math.log(alpha2 / (1 - alpha2))
    totals = {"true": 0.0, "shuffled": 0.0, "noise": 0.0}
    tokens = 0.0
    dev = core.device
    pad = core.tokenizer.pad_token_id
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        p_ids, p_mask, c_ids, c_mask = (t.to(dev) for t in collate(
            [examples.prefixes[i] for i in idx], [examples.continuations[i] for i in idx], pad))
        logsnr = torch.full((len(idx),), logsnr_value, device=dev)
        eps = noise[idx].to(dev)
        plans = {"true": a * latents[idx].to(dev) + s * eps, "shuffled": a * shuffled[idx].to(dev) + s * eps,
                 "noise": eps}
        for name, z in plans.items():
            totals[name] += float(core.continuation_nll(p_ids, p_mask, c_ids, c_mask, z, logsnr).sum())
        tokens += float(c_mask.sum())
    core.train(was_training)
    return PlanGain(totals["true"] / tokens, totals["shuffled"] / tokens, totals["noise"] / tokens)


class Trainer:
    """Owns one run folder. `run()` trains from scratch or resumes, and writes final/."""

    def __init__(self, cfg: TrainConfig, console=None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoint"
        self.console = console
        self.device = pick_device(cfg.device)

    def log(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    # --- data -------------------------------------------------------------------------------

    def prepare_data(self, core: StarCore, encoder) -> tuple[PlanExamples, PlanExamples]:
        from .corpora import load_texts, split_documents

        c = self.cfg.data
        docs: list[str] = []
        for source in c.sources:
            docs.extend(load_texts(source))
        train_docs, held_docs = split_documents(docs, c.heldout_fraction, seed=self.cfg.seed)
        # Mix the sources, so that a chunk budget (max_chunks, eval_chunks) samples all of them.
        random.Random(self.cfg.seed).shuffle(train_docs)
        random.Random(self.cfg.seed + 1).shuffle(held_docs)
        tag = {"sources": c.sources, "encoder": self.cfg.core.encoder, "backbone": self.cfg.core.backbone,
               "heldout": c.heldout_fraction}
        cache = self.out.parent / "plan-cache" if self.out.parent != self.out else None
        common = dict(chunk_tokens=c.chunk_tokens, min_prefix_tokens=c.min_prefix_tokens,
                      min_cont_tokens=c.min_cont_tokens, cache_dir=cache, progress=self.console is not None)
        self.log(f"[bold]data[/]: {len(train_docs)} training and {len(held_docs)} held-out documents")
        train = build_plan_examples(train_docs, core.tokenizer, encoder, seed=self.cfg.seed,
                                    max_chunks=c.max_chunks, cache_tag={**tag, "split": "train"}, **common)
        held = build_plan_examples(held_docs, core.tokenizer, encoder, seed=self.cfg.seed + 1,
                                   max_chunks=c.eval_chunks, cache_tag={**tag, "split": "heldout"}, **common)
        if len(train) < self.cfg.batch_size or len(held) == 0:
            raise StarctlError(f"not enough text: {len(train)} training and {len(held)} held-out chunks of "
                               f"{c.chunk_tokens} tokens")
        self.log(f"[bold]data[/]: {len(train)} training chunks, {len(held)} held-out chunks")
        return train, held

    def init_vocabulary(self, core: StarCore, train: PlanExamples, latents: torch.Tensor,
                        held: PlanExamples, held_latents: torch.Tensor) -> dict:
        gen = core.generator
        specials = set(core.tokenizer.all_special_ids)
        vocab_ids = choose_vocabulary(train.continuations, core.config.vocab_size, self.cfg.vocab_skip, specials)
        if len(vocab_ids) < core.config.vocab_size:
            raise StarctlError(f"the corpus has only {len(vocab_ids)} distinct usable tokens, "
                               f"fewer than vocab_size={core.config.vocab_size}")
        t0 = time.time()
        bags = bag_targets(train.continuations, vocab_ids)
        linear = fit_bow_map(latents, bags, len(vocab_ids), epochs=self.cfg.vocab_fit_epochs, seed=self.cfg.seed)
        recall = recall_at_k(linear, held_latents, bag_targets(held.continuations, vocab_ids))
        with torch.no_grad():
            gen.vocab_ids.copy_(vocab_ids)
            gen.vocab_map.weight.copy_(linear.weight * self.cfg.vocab_sharpen)
            gen.vocab_map.bias.copy_(linear.bias * self.cfg.vocab_sharpen)
        info = {"vocab_fit_seconds": round(time.time() - t0, 1), "vocab_recall_at_8": round(recall, 4)}
        self.log(f"[bold]vocabulary route[/]: fitted in {info['vocab_fit_seconds']} s, held-out recall@8 {recall:.3f}")
        return info

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, core: StarCore, ema: EMA, opt, step: int, rng_state) -> None:
        tmp = self.out / "checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        core.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "rng": rng_state}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
        if self.ckpt_dir.exists():
            old = self.out / "checkpoint.old"
            self.ckpt_dir.replace(old)
            tmp.replace(self.ckpt_dir)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            tmp.replace(self.ckpt_dir)

    def write_metrics(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> Path:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from .assets import load_encoder

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        resuming = (self.ckpt_dir / "state.json").is_file()
        if resuming:
            saved = json.loads((self.ckpt_dir / "config.json").read_text())
            cfg.core = StarConfig.from_dict(saved)  # latent statistics and vocabulary from the run
        (self.out / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

        dtype = torch.float32
        encoder = load_encoder(cfg.core.encoder)  # first: a bad encoder name fails before the backbone loads
        core = StarCore.build(cfg.core, device="cpu", dtype=dtype)
        train, held = self.prepare_data(core, encoder)
        del encoder
        if not resuming:
            mean, std = measure_statistics(train.embeddings)
            cfg.core.latent_mean, cfg.core.latent_std = mean, std
            core.config = cfg.core
        space = core.latent_space
        latents = space.normalise(train.embeddings)
        held_latents = space.normalise(held.embeddings)

        info = {}
        if cfg.core.vocab_size > 0 and not resuming:
            info = self.init_vocabulary(core, train, latents, held, held_latents)
        core.to(self.device)
        if not cfg.train_generator:
            core.generator.requires_grad_(False)

        params = trained_parameters(core)
        groups = [{"params": [p for k, p in params.items() if not k.startswith("backbone.")], "lr": cfg.lr},
                  {"params": [p for k, p in params.items() if k.startswith("backbone.")], "lr": cfg.backbone_lr}]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
        ema = EMA({k: p for k, p in params.items()}, cfg.ema_decay)
        step = 0
        if resuming:
            core.load_trained_state_dict(load_file(str(self.ckpt_dir / "model.safetensors")))
            ema.shadow = load_file(str(self.ckpt_dir / "ema.safetensors"))
            state = torch.load(self.ckpt_dir / "trainer.pt", weights_only=True)
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            step = json.loads((self.ckpt_dir / "state.json").read_text())["step"]
            self.log(f"[bold]resuming[/] {self.out} at step {step}")
        else:
            pg = measure_plan_gain(core, held, held_latents, cfg.eval_alpha2)
            self.write_metrics({"step": 0, "plan_gain": pg.gain, "nll_true": pg.nll_true,
                                "nll_shuffled": pg.nll_shuffled, "nll_noise": pg.nll_noise, **info})
            self.log(f"step 0: plan gain {pg.gain:+.4f} (true {pg.nll_true:.4f}, shuffled {pg.nll_shuffled:.4f})")

        schedule = CosineSchedule(shift=cfg.train_logsnr_shift)
        pad = core.tokenizer.pad_token_id
        n = len(train)
        started = time.time()
        core.train()
        last_gain = float("nan")
        with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      disable=self.console is None, console=self.console) as progress:
            task = progress.add_task("train", total=cfg.steps, completed=step, stats="")
            while step < cfg.steps:
                # Deterministic data order: a fresh permutation per epoch, indexed by step.
                epoch, offset = divmod(step * cfg.batch_size, n)
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
                idx = perm[offset:offset + cfg.batch_size].tolist()
                if len(idx) < cfg.batch_size:  # wrap into the next epoch's order
                    nxt = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 1))
                    idx += nxt[:cfg.batch_size - len(idx)].tolist()
                p_ids, p_mask, c_ids, c_mask = (t.to(self.device) for t in collate(
                    [train.prefixes[i] for i in idx], [train.continuations[i] for i in idx], pad))
                x = latents[idx].to(self.device)
                B = len(idx)
                logsnr = schedule.sample_logsnr(B, device=self.device)
                noise = torch.randn_like(x)
                drop = torch.rand(B, device=self.device) < cfg.core.null_prob
                terms = core.training_losses(p_ids, p_mask, c_ids, c_mask, x, logsnr, noise, drop)
                ce = terms["nll_sum"].sum() / terms["ntokens"].sum()
                weight = sigmoid_v_weight(logsnr, cfg.sigmoid_bias) / schedule.density(logsnr)
                diffusion = (weight * terms["v_mse"]).mean()
                loss = ce + cfg.diffusion_weight * diffusion

                factor = lr_factor(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
                opt.step()
                ema.update(params, step)
                step += 1

                record = {"step": step, "loss": float(loss), "ce": float(ce), "diffusion": float(diffusion),
                          "v_mse": float(terms["v_mse"].mean()), "lr_factor": factor}
                out_of_time = cfg.max_minutes is not None and (time.time() - started) / 60 > cfg.max_minutes
                if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
                    with swapped_weights(core, ema.shadow):
                        pg = measure_plan_gain(core, held, held_latents, cfg.eval_alpha2)
                    last_gain = pg.gain
                    record.update(plan_gain=pg.gain, nll_true=pg.nll_true, nll_shuffled=pg.nll_shuffled,
                                  nll_noise=pg.nll_noise)
                    self.log(f"step {step}: plan gain {pg.gain:+.4f} (true {pg.nll_true:.4f}, "
                             f"shuffled {pg.nll_shuffled:.4f}, noise {pg.nll_noise:.4f})")
                self.write_metrics(record)
                progress.update(task, completed=step,
                                stats=f"ce {float(ce):.3f} diff {float(diffusion):.3f} gain {last_gain:+.3f}")
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                    self.save_checkpoint(core, ema, opt, step, torch.get_rng_state())
                if out_of_time:
                    self.log(f"[yellow]time budget of {cfg.max_minutes} min spent at step {step}[/]")
                    break

        final = self.out / "final"
        with swapped_weights(core, ema.shadow):
            core.save_pretrained(final)
        self.log(f"[bold green]saved[/] {final}")
        return final


class swapped_weights:
    """Context manager: load the EMA weights into the core, restore the live ones afterwards."""

    def __init__(self, core: StarCore, shadow: dict[str, torch.Tensor]):
        self.core, self.shadow = core, shadow

    def __enter__(self):
        self.saved = {k: v.clone() for k, v in self.core.trained_state_dict().items()}
        sd = dict(self.saved)
        sd.update({k: v.to(self.saved[k].dtype) for k, v in self.shadow.items()})
        self.core.load_trained_state_dict(sd)
        return self.core

    def __exit__(self, *exc):
        self.core.load_trained_state_dict(self.saved)
        return False
