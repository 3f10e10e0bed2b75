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

Data parallel (`accelerate launch ... starctl train`): every process builds the same core and
data, the loss module is wrapped for DDP (gloo on CPUs, NCCL on GPUs; bf16 autocast where CUDA
supports it) and each process takes its slice of each step's GLOBAL batch of `batch_size`
examples (`batch_size / num_processes` each). Noise levels, noise and classifier-free drops are
drawn for the global batch on every process from the same generator and sliced, and the loss is
normalised by global counts, so the averaged gradient is the one-process gradient of the same
global batch: an N-process run follows the one-process loss trajectory to float tolerance
(tests/test_distributed.py). Only the main process evaluates, logs and writes checkpoints; all
resume from the same checkpoint and step. With one process the loop is the single-process
trainer, step for step (same RNG draws, same checkpoint files).
"""

from __future__ import annotations

import contextlib
import hashlib
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
from .latent import encode_texts, measure_statistics
from .model import StarConfig, StarCore
from .schedule import CosineSchedule, sigmoid_v_weight
from .vocab import bag_targets, choose_vocabulary, fit_bow_map, recall_at_k


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: ["wiki", "bbc", "rotten-tomatoes", "lee"])  # str; dict when streaming
    heldout_fraction: float = 0.05
    chunk_tokens: int = 64
    min_prefix_tokens: int = 8
    min_cont_tokens: int = 8
    max_chunks: int | None = None
    eval_chunks: int = 256
    # Streaming (see streaming.py): sources read with datasets' streaming=True, chunked on the
    # fly; plans encoded per step by each process for its slice. Off: everything in memory.
    streaming: bool = False
    text_col: str = "text"            # text column of streamed sources
    shuffle_window: int = 4096        # streamed chunks are shuffled within windows of this many
    sample_chunks: int = 2048         # streamed chunks encoded up front: latent statistics, vocabulary fit
    encoded: str | None = None        # folder of `starctl encode` (precomputed chunks and plans)


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
    micro_batch_size: int | None = None  # per process; smaller than batch_size/processes: accumulate
    mixed_precision: str = "auto"     # auto: bf16 on CUDA with bf16 support, else no; or no / bf16 / fp16
    debug_log: bool = False           # debug/rank<k>.jsonl: data each process read per step, EMA fingerprints

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


def corpus_documents(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """In-memory mode: (training, held-out) documents of the recipe's sources, each list shuffled."""
    from .corpora import load_texts, split_documents

    c = cfg.data
    docs: list[str] = []
    for source in c.sources:
        if not isinstance(source, str):
            raise StarctlError(f"source {source!r}: a dict source needs data.streaming=true")
        docs.extend(load_texts(source))
    train_docs, held_docs = split_documents(docs, c.heldout_fraction, seed=cfg.seed)
    # Mix the sources, so that a chunk budget (max_chunks, eval_chunks) samples all of them.
    random.Random(cfg.seed).shuffle(train_docs)
    random.Random(cfg.seed + 1).shuffle(held_docs)
    return train_docs, held_docs


def chunk_stream(cfg: TrainConfig, tokenizer, side: str):
    """Streaming mode: the recipe's chunk stream of one side ("train": window-shuffled; "heldout":
    in stream order)."""
    from .streaming import ChunkStream

    c = cfg.data
    return ChunkStream(c.sources, tokenizer, chunk_tokens=c.chunk_tokens, min_prefix_tokens=c.min_prefix_tokens,
                       min_cont_tokens=c.min_cont_tokens, seed=cfg.seed, heldout_fraction=c.heldout_fraction,
                       side=side, window=c.shuffle_window if side == "train" else 1, text_col=c.text_col)


def make_accelerator(cfg: TrainConfig):
    """The run's `accelerate.Accelerator`: CPU (gloo between processes) unless CUDA is used (NCCL),
    bf16 autocast when `mixed_precision` is auto and the GPU supports bf16.

    DDP gets find_unused_parameters=True: which parameters take part in the loss depends on the
    configuration (backbone frozen / LoRA / full, generator trained or not), and a parameter
    that gets no gradient on one process would otherwise stall the gradient all-reduce."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = cfg.device.startswith("cpu") or not torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    if mp not in ("no", "bf16", "fp16"):
        raise StarctlError(f"mixed_precision must be auto, no, bf16 or fp16, got {cfg.mixed_precision!r}")
    # device_placement=False: the trainer puts the core on its device itself (an explicit
    # single-process device such as cuda:1 stays where the recipe says).
    return Accelerator(cpu=cpu, mixed_precision=mp, device_placement=False,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


class LossModule(torch.nn.Module):
    """`StarCore.training_losses` as a forward(): DDP synchronises gradients of what runs
    through its wrapper's forward, and bf16 autocast is applied there too."""

    def __init__(self, core: StarCore):
        super().__init__()
        self.core = core

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.core.training_losses(*args, **kwargs)


def global_batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The example indices of step `step`'s global batch: a fresh permutation per epoch, indexed
    by step (wrapping into the next epoch's order at the end of one)."""
    epoch, offset = divmod(step * batch_size, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    idx = perm[offset:offset + batch_size].tolist()
    if len(idx) < batch_size:  # wrap into the next epoch's order
        nxt = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch + 1))
        idx += nxt[:batch_size - len(idx)].tolist()
    return idx


def ema_fingerprint(shadow: dict[str, torch.Tensor]) -> str:
    """sha1 of the EMA tensors' bytes (sorted by name): equal on every process of a run."""
    h = hashlib.sha1()
    for k in sorted(shadow):
        h.update(k.encode())
        h.update(shadow[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


STREAM_STATE = "stream.json"  # in checkpoint/, streaming runs only


class Trainer:
    """Owns one run folder. `run()` trains from scratch or resumes, and writes final/.

    Under `accelerate launch` every process runs `run()`; see the module docstring."""

    def __init__(self, cfg: TrainConfig, console=None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoint"
        self.console = console
        self.device = pick_device(cfg.device)
        self.accelerator = None

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, msg: str) -> None:
        if self.console is not None and self.is_main:
            self.console.print(msg)

    # --- data -------------------------------------------------------------------------------

    def prepare_data(self, core: StarCore, encoder) -> tuple[PlanExamples, PlanExamples]:
        c = self.cfg.data
        if c.encoded:
            from .encode import load_encoded

            train, held = load_encoded(c.encoded, self.cfg)
            self.log(f"[bold]data[/]: {len(train)} training and {len(held)} held-out chunks from {c.encoded}")
            if len(train) < self.cfg.batch_size or len(held) == 0:
                raise StarctlError(f"not enough chunks in {c.encoded}: {len(train)} training, {len(held)} held-out")
            return train, held
        train_docs, held_docs = corpus_documents(self.cfg)
        tag = {"sources": c.sources, "encoder": self.cfg.core.encoder, "backbone": self.cfg.core.backbone,
               "heldout": c.heldout_fraction}
        cache = self.out.parent / "plan-cache" if self.out.parent != self.out else None
        common = dict(chunk_tokens=c.chunk_tokens, min_prefix_tokens=c.min_prefix_tokens,
                      min_cont_tokens=c.min_cont_tokens, cache_dir=cache,
                      progress=self.console is not None and self.is_main)
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

    def chunk_stream(self, tokenizer, side: str):
        return chunk_stream(self.cfg, tokenizer, side)

    def prepare_stream(self, core: StarCore, encoder):
        """Streaming mode: (training ChunkStream, a sample of its first chunks encoded (for the
        latent statistics and the vocabulary fit), the held-out chunks encoded)."""
        c = self.cfg.data
        if c.heldout_fraction <= 0:
            raise StarctlError("streaming needs heldout_fraction > 0 (held-out documents are chosen by hash)")
        tok = core.tokenizer
        progress = self.console is not None and self.is_main

        def encoded(stream, count: int) -> PlanExamples:
            prefixes, conts = stream.take(0, count)
            return PlanExamples(prefixes, conts, encode_texts(encoder, [tok.decode(x) for x in conts], progress=progress))

        sample = encoded(self.chunk_stream(tok, "train"), c.sample_chunks)
        held = encoded(self.chunk_stream(tok, "heldout"), c.eval_chunks)
        self.log(f"[bold]data[/]: streaming {len(c.sources)} source(s); {len(sample)} sample chunks encoded, "
                 f"{len(held)} held-out chunks")
        return self.chunk_stream(tok, "train"), sample, held

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

    def save_checkpoint(self, core: StarCore, ema: EMA, opt, step: int, rng_state, extra: dict | None = None) -> None:
        """Write checkpoint/ atomically. `extra`: more JSON files (name -> object), e.g. the
        stream position of a streaming run; none in memory mode."""
        tmp = self.out / "checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        core.save_pretrained(tmp)
        save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "rng": rng_state}, tmp / "trainer.pt")
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj) + "\n")
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

    def debug_path(self) -> Path:
        return self.out / "debug" / f"rank{self.accelerator.process_index}.jsonl"

    def write_debug(self, record: dict) -> None:
        path = self.debug_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_debug(self, step: int) -> None:
        """On resume: drop the records of steps after the checkpoint (their work was lost)."""
        path = self.debug_path()
        if path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError):  # a line cut short by the kill
                    pass
            path.write_text("".join(line + "\n" for line in keep))

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> Path:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from .assets import load_encoder

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        acc = self.accelerator = make_accelerator(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        world, rank = acc.num_processes, acc.process_index
        if world > 1 or acc.device.type != self.device.type:
            self.device = acc.device
        if acc.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise StarctlError(f"the trainer runs data parallel (DDP) only, not {acc.distributed_type.value}: "
                               "EMA and checkpoints need whole parameters on every process (recipes/README.md)")
        if cfg.batch_size % world:
            raise StarctlError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by the "
                               f"{world} processes")
        local_bs = cfg.batch_size // world
        micro = cfg.micro_batch_size or local_bs
        if micro < local_bs and local_bs % micro:
            raise StarctlError(f"micro_batch_size {micro} does not divide the per-process batch {local_bs}")
        lo, hi = rank * local_bs, (rank + 1) * local_bs
        streaming = cfg.data.streaming and not cfg.data.encoded
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        resuming = (self.ckpt_dir / "state.json").is_file()
        if resuming:
            saved = json.loads((self.ckpt_dir / "config.json").read_text())
            cfg.core = StarConfig.from_dict(saved)  # latent statistics and vocabulary from the run
        if self.is_main:
            (self.out / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

        dtype = torch.float32
        # first: a bad encoder name fails before the backbone loads (precomputed plans need none)
        encoder = None if cfg.data.encoded else load_encoder(cfg.core.encoder)
        core = StarCore.build(cfg.core, device="cpu", dtype=dtype)
        stream = None
        if streaming:
            encoder.to(self.device)
            stream, train, held = self.prepare_stream(core, encoder)
        else:
            with acc.main_process_first():  # the main process fills the plan cache, the others read it
                train, held = self.prepare_data(core, encoder)
            del encoder
            encoder = None
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
            ema.shadow = {k: v.to(self.device) for k, v in load_file(str(self.ckpt_dir / "ema.safetensors")).items()}
            state = torch.load(self.ckpt_dir / "trainer.pt", weights_only=True, map_location="cpu")
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            step = json.loads((self.ckpt_dir / "state.json").read_text())["step"]
            if stream is not None and (self.ckpt_dir / STREAM_STATE).is_file():
                stream.load_state_dict(json.loads((self.ckpt_dir / STREAM_STATE).read_text()))
            if cfg.debug_log:
                self.truncate_debug(step)
            self.log(f"[bold]resuming[/] {self.out} at step {step}")
        elif self.is_main:
            pg = measure_plan_gain(core, held, held_latents, cfg.eval_alpha2)
            self.write_metrics({"step": 0, "plan_gain": pg.gain, "nll_true": pg.nll_true,
                                "nll_shuffled": pg.nll_shuffled, "nll_noise": pg.nll_noise, **info})
            self.log(f"step 0: plan gain {pg.gain:+.4f} (true {pg.nll_true:.4f}, shuffled {pg.nll_shuffled:.4f})")

        # DDP wrapper (world > 1) / autocast (mixed precision); a no-op on one CPU process.
        model, opt_step = acc.prepare(LossModule(core), opt)

        schedule = CosineSchedule(shift=cfg.train_logsnr_shift)
        pad = core.tokenizer.pad_token_id
        n = len(train)
        B = cfg.batch_size
        started = time.time()
        core.train()
        if encoder is not None:
            encoder.eval()
        last_gain = float("nan")
        show = self.console is not None and self.is_main
        with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      disable=not show, console=self.console) as progress:
            task = progress.add_task("train", total=cfg.steps, completed=step, stats="")
            while step < cfg.steps:
                # This process's slice [lo, hi) of the step's global batch (deterministic by step).
                if stream is None:
                    idx = global_batch_indices(step, B, n, cfg.seed)[lo:hi]
                    prefixes = [train.prefixes[i] for i in idx]
                    conts = [train.continuations[i] for i in idx]
                    x = latents[idx].to(self.device)
                else:
                    idx = list(range(step * B + lo, step * B + hi))  # positions in the chunk stream
                    prefixes, conts = stream.take(step * B + lo, local_bs)
                    with torch.no_grad():
                        emb = encode_texts(encoder, [core.tokenizer.decode(c) for c in conts])
                    x = space.normalise(emb).to(self.device)
                p_ids, p_mask, c_ids, c_mask = (t.to(self.device) for t in collate(prefixes, conts, pad))
                # Noise for the GLOBAL batch, from the same generator on every process, then sliced:
                # the N-process run sees the noise of the one-process run.
                logsnr = schedule.sample_logsnr(B)
                noise = torch.randn(B, x.shape[1], dtype=x.dtype)
                drop = torch.rand(B) < cfg.core.null_prob
                logsnr, noise, drop = (t[lo:hi].to(self.device) for t in (logsnr, noise, drop))
                weight = sigmoid_v_weight(logsnr, cfg.sigmoid_bias) / schedule.density(logsnr)
                factor = lr_factor(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
                if micro >= local_bs:  # the whole per-process batch in one pass
                    terms = model(p_ids, p_mask, c_ids, c_mask, x, logsnr, noise, drop)
                    if world == 1:
                        ce = terms["nll_sum"].sum() / terms["ntokens"].sum()
                    else:
                        # Token-weighted CE over the GLOBAL batch: this process's share, scaled so
                        # that DDP's gradient average is the gradient of the global mean.
                        ntokens = acc.reduce(terms["ntokens"].sum().detach(), "sum")
                        ce = terms["nll_sum"].sum() * world / ntokens
                    diffusion = (weight * terms["v_mse"]).mean()
                    loss = ce + cfg.diffusion_weight * diffusion
                    v_mse = terms["v_mse"].detach().mean()
                    opt_step.zero_grad(set_to_none=True)
                    acc.backward(loss)
                else:  # gradient accumulation over micro-batches, normalised by global counts
                    ntokens = c_mask.sum().float()
                    if world > 1:
                        ntokens = acc.reduce(ntokens, "sum")
                    opt_step.zero_grad(set_to_none=True)
                    parts = []
                    for j in range(0, local_bs, micro):
                        sl = slice(j, j + micro)
                        last = j + micro >= local_bs
                        with model.no_sync() if world > 1 and not last else contextlib.nullcontext():
                            t = model(p_ids[sl], p_mask[sl], c_ids[sl], c_mask[sl], x[sl], logsnr[sl], noise[sl],
                                      drop[sl])
                            ce_part = t["nll_sum"].sum() * world / ntokens
                            diff_part = (weight[sl] * t["v_mse"]).sum() * world / B
                            acc.backward(ce_part + cfg.diffusion_weight * diff_part)
                        parts.append(torch.stack([ce_part.detach(), diff_part.detach(),
                                                  t["v_mse"].detach().sum() * world / B]))
                    ce, diffusion, v_mse = torch.stack(parts).sum(0)
                    loss = ce + cfg.diffusion_weight * diffusion
                acc.unscale_gradients()  # fp16 only; DDP has averaged the gradients by now
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
                opt_step.step()
                ema.update(params, step)
                step += 1

                stats = torch.stack([loss.detach(), ce.detach(), diffusion.detach(), v_mse])
                if world > 1:
                    stats = acc.reduce(stats, "mean")  # the global batch's values
                loss_v, ce_v, diff_v, vmse_v = (float(v) for v in stats)
                record = {"step": step, "loss": loss_v, "ce": ce_v, "diffusion": diff_v, "v_mse": vmse_v,
                          "lr_factor": factor}
                out_of_time = cfg.max_minutes is not None and (time.time() - started) / 60 > cfg.max_minutes
                if cfg.max_minutes is not None and world > 1:  # the main process's clock decides for all
                    flag = torch.tensor([float(out_of_time and self.is_main)], device=self.device)
                    out_of_time = bool(acc.reduce(flag, "sum").item() > 0)
                if self.is_main and (step % cfg.eval_every == 0 or step == cfg.steps or out_of_time):
                    with swapped_weights(core, ema.shadow):
                        pg = measure_plan_gain(core, held, held_latents, cfg.eval_alpha2)
                    last_gain = pg.gain
                    record.update(plan_gain=pg.gain, nll_true=pg.nll_true, nll_shuffled=pg.nll_shuffled,
                                  nll_noise=pg.nll_noise)
                    self.log(f"step {step}: plan gain {pg.gain:+.4f} (true {pg.nll_true:.4f}, "
                             f"shuffled {pg.nll_shuffled:.4f}, noise {pg.nll_noise:.4f})")
                if self.is_main:
                    self.write_metrics(record)
                progress.update(task, completed=step,
                                stats=f"ce {ce_v:.3f} diff {diff_v:.3f} gain {last_gain:+.3f}")
                checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time
                if cfg.debug_log:
                    debug = {"step": step, "rank": rank, "world": world, "indices": idx, "loss": loss_v,
                             "seconds": round(time.time() - started, 4), "tokens": int(p_mask.sum() + c_mask.sum())}
                    if checkpoint:
                        debug["ema"] = ema_fingerprint(ema.shadow)
                    self.write_debug(debug)
                if checkpoint:
                    if self.is_main:
                        extra = {STREAM_STATE: stream.state_dict()} if stream is not None else None
                        if extra is None:
                            self.save_checkpoint(core, ema, opt, step, torch.get_rng_state())
                        else:
                            self.save_checkpoint(core, ema, opt, step, torch.get_rng_state(), extra=extra)
                    acc.wait_for_everyone()
                if out_of_time:
                    self.log(f"[yellow]time budget of {cfg.max_minutes} min spent at step {step}[/]")
                    break

        final = self.out / "final"
        if self.is_main:
            with swapped_weights(core, ema.shadow):
                core.save_pretrained(final)
            self.log(f"[bold green]saved[/] {final}")
        acc.wait_for_everyone()
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
