"""Attribute heads: small noise-conditioned classifiers over plans.

A head is f(z_t, alpha^2) -> logits over its labels, where z_t = alpha x + sigma eps is a noisy
plan in the core's latent space (x = normalised sentence embedding). It sees nothing but
latents, noise levels and the latent-space fingerprint it was trained in (no backbone), so it
trains in minutes on a CPU and plugs into the sampler as gradient guidance (see steering.py).

    z_t (B, d) -> Linear(d -> w) -> 4 x [residual FiLM GLU block, FiLM by the time embedding of
    1000 alpha^2] -> LayerNorm -> Linear(w -> n_labels)

Training (`train_head`): every text is encoded ONCE (optionally cached in a safetensors file),
normalised with the latent space's scalar statistics, and noised afresh in every batch.

Noise levels in training: logSNR ~ the core's truncated cosine TRAINING schedule
(`schedule.TRAIN_SCHEDULE`, t ~ U[0, 1]) rather than alpha^2 ~ U[0, 1]. Why:
  * it is the distribution the denoiser itself is trained on, so the head is fitted where the
    core's plans live;
  * in alpha^2 it is the arcsine law (density 1 / (pi sqrt(a (1 - a)))): it puts ~14% of the
    examples at alpha^2 > 0.95 (uniform alpha^2: 5%), where the reported probabilities
    (alpha^2 = 1), the decoder's re-noised plan (0.95) and the last, decisive guidance steps
    are; the mass it also puts near alpha^2 = 0 costs little (the head learns the prior there).

The baseline is the predecessor DGLM's: a logistic-regression probe fitted on CLEAN latents,
evaluated on the same noisy held-out latents as the head.

Files: `save_pretrained(dir)` writes config.json + model.safetensors (no pickle), atomically:
into a temporary sibling folder renamed into place, so a failed save never leaves half a head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import StarctlError
from .latent import LatentSpace, encode_texts, encoder_dim
from .layers import FiLMGLUBlock, TimeEmbedding
from .schedule import TRAIN_SCHEDULE, alpha_sigma

__all__ = [
    "EVAL_ALPHA2",
    "MIN_PER_CLASS",
    "AttributeHead",
    "HeadConfig",
    "HeadReport",
    "Progress",
    "encode_cached",
    "split_heldout",
    "train_head",
    "write_head_atomically",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
EVAL_ALPHA2 = (1.0, 0.95, 0.8, 0.5, 0.2, 0.05)
MIN_PER_CLASS = 5
DEFAULT_MAX_SCALE = 4.0

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "encode", "train" (done/total in batches) or
"evaluate". May raise to abort training (nothing is written then)."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class HeadConfig:
    """Everything needed to rebuild a head, plus what it was trained on and how well it does.

    `latent`: the latent-space fingerprint (encoder, dim, mean, std) the head was trained in.
    `max_scale`: guidance scale at steering strength 1 (scale = strength * max_scale); a
        per-head number to calibrate with real generations (default until then: 4.0).
    `heldout_accuracy` / `probe_accuracy`: held-out accuracy of the head / of the clean-latent
        logistic-regression baseline, keyed by alpha^2 written as a string ("1.0", "0.95", ...).
    """

    name: str
    labels: list[str]
    latent: LatentSpace
    width: int = 256
    depth: int = 4
    dropout: float = 0.1
    max_scale: float = DEFAULT_MAX_SCALE
    heldout_accuracy: dict[str, float] = field(default_factory=dict)
    probe_accuracy: dict[str, float] = field(default_factory=dict)
    data: str = ""
    label_provenance: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if isinstance(self.latent, dict):
            self.latent = LatentSpace.from_dict(self.latent)
        self.labels = [str(x) for x in self.labels]
        if len(self.labels) < 2:
            raise StarctlError(f"head '{self.name}': needs at least 2 labels, got {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise StarctlError(f"head '{self.name}': duplicate labels in {self.labels}")

    @property
    def binary(self) -> bool:
        return len(self.labels) == 2

    @property
    def latent_space(self) -> LatentSpace:
        return self.latent

    def label_index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise StarctlError(
                f"head '{self.name}' has no label '{label}': valid labels are {', '.join(self.labels)}"
            ) from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latent"] = self.latent.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("name", "labels", "latent") if k not in d]
        if missing:
            raise StarctlError(f"head config lacks {', '.join(missing)}")
        version = int(d.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise StarctlError(
                f"head config has format_version {version}; this starctl reads up to "
                f"{FORMAT_VERSION}: upgrade starctl"
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "HeadConfig":
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class AttributeHead(nn.Module):
    """f(z_t (B, d), alpha^2 (B,)) -> logits (B, n_labels)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        d, w = config.latent.dim, config.width
        self.inp = nn.Linear(d, w)
        self.time = TimeEmbedding(w)
        self.blocks = nn.ModuleList(FiLMGLUBlock(w, config.dropout) for _ in range(config.depth))
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, len(config.labels))

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def latent_space(self) -> LatentSpace:
        return self.config.latent

    def forward(self, z: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
        # z (B, d), alpha2 (B,) or a scalar
        alpha2 = torch.as_tensor(alpha2, dtype=z.dtype, device=z.device)
        if alpha2.ndim == 0:
            alpha2 = alpha2.expand(z.shape[0])
        time = self.time(alpha2)                                                      # (B, w)
        h = self.inp(z)                                                               # (B, w)
        for block in self.blocks:
            h = block(h, time)                                                        # (B, w)
        return self.out(self.norm(h))                                                 # (B, L)

    def log_probs(self, z: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self(z, alpha2), dim=-1)                             # (B, L)

    # ----- files ----------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors into `folder`, replacing it atomically."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        config_text = self.config.to_json()

        def build(tmp: Path) -> None:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "starctl": "attribute-head"})
            (tmp / CONFIG_NAME).write_text(config_text)
            os.chmod(tmp / WEIGHTS_NAME, 0o644)  # safetensors writes 0600; a head is shareable

        return write_head_atomically(Path(folder), build)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> "AttributeHead":
        """Load a head saved by `save_pretrained`. StarctlError for a missing or corrupt file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not folder.is_dir():
            raise StarctlError(f"head folder '{folder}' does not exist")
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise StarctlError(f"head folder '{folder}' has no {p.name}")
        try:
            config = HeadConfig.from_json(cfg_path.read_text())
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise StarctlError(f"{cfg_path}: not a valid head config ({_first_line(e)})") from e
        except StarctlError as e:
            raise StarctlError(f"{cfg_path}: {e}") from e
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise StarctlError(f"{weights_path}: unreadable weights ({_first_line(e)})") from e
        head = cls(config)
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise StarctlError(f"{weights_path}: weights do not match {CONFIG_NAME} ({_first_line(e)})") from e
        head.eval()
        return head.to(map_location)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def write_head_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Make `final` a complete folder: `build(tmp)` fills a temporary sibling folder, which is
    then renamed into place (an existing `final` is swapped out and deleted). If `build` raises,
    `final` is untouched and the temporary folder removed."""
    final = final.expanduser()
    parent = final.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # to remove on failure
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
    ok = False
    try:
        os.chmod(tmp, 0o755)
        build(tmp)
        if final.exists():
            if not final.is_dir():
                raise StarctlError(f"'{final}' exists and is not a folder")
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
            os.rename(final, old / "head")
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(old / "head", final)  # put the old head back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        ok = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for p in created:  # innermost first; only folders this call made, and only if empty
                try:
                    p.rmdir()
                except OSError:
                    break
    return final


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class HeadReport:
    """What `train_head` measured. Accuracies are keyed by alpha^2 (floats of EVAL_ALPHA2)."""

    labels: list[str]
    class_counts: dict[str, int]          # all examples, per label
    n_train: int
    n_heldout: int
    head_accuracy: dict[float, float]
    probe_accuracy: dict[float, float]    # LogisticRegression on clean latents (baseline)
    majority_accuracy: float              # always predicting the held-out majority class
    epochs: int
    final_loss: float
    seconds_encode: float
    seconds_train: float
    encoded_from_cache: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head_accuracy"] = {str(k): v for k, v in self.head_accuracy.items()}
        d["probe_accuracy"] = {str(k): v for k, v in self.probe_accuracy.items()}
        return d

    def table(self) -> str:
        """A small plain-text table: alpha^2, head accuracy, probe accuracy."""
        lines = [f"{'alpha^2':>8}  {'head':>6}  {'probe':>6}"]
        for a in self.head_accuracy:
            p = self.probe_accuracy.get(a, float("nan"))
            lines.append(f"{a:>8.2f}  {self.head_accuracy[a]:>6.3f}  {p:>6.3f}")
        lines.append(f"(held-out n={self.n_heldout}; majority class {self.majority_accuracy:.3f})")
        return "\n".join(lines)


def _texts_key(encoder_name: str, texts: Sequence[str]) -> str:
    h = hashlib.sha256(encoder_name.encode())
    for t in texts:
        h.update(b"\0")
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def encode_cached(encoder, texts: Sequence[str], encoder_name: str, cache: str | os.PathLike | None = None,
                  batch_size: int = 64, progress: Progress | None = None) -> tuple[torch.Tensor, bool]:
    """(raw embeddings (N, D) float32, whether they came from `cache`).

    `cache`: an optional safetensors file holding the RAW (unnormalised) embeddings, keyed by a
    hash of the encoder name and the exact list of texts (in its metadata). A file made for
    other texts or another encoder is recomputed and overwritten; raw embeddings do not depend
    on the latent statistics, so a cache survives re-measured statistics.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    key = _texts_key(encoder_name, texts)
    path = Path(cache).expanduser() if cache is not None else None
    if path is not None and path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") == key:
                emb = load_file(str(path))["embeddings"]
                if emb.shape[0] == len(texts):
                    return emb.float(), True
        except (SafetensorError, OSError, KeyError, ValueError):
            pass  # unreadable cache: recompute
    chunks = []
    step = max(batch_size * 4, 256)
    total = len(texts)
    for start in range(0, total, step):
        chunks.append(encode_texts(encoder, list(texts[start:start + step]), batch_size=batch_size))
        if progress is not None:
            progress("encode", min(start + step, total), total)
    emb = torch.cat(chunks) if chunks else torch.empty(0, encoder_dim(encoder))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        save_file({"embeddings": emb.contiguous()}, str(tmp),
                  metadata={"key": key, "encoder": encoder_name, "n": str(len(texts))})
        os.replace(tmp, path)
    return emb, False


def split_heldout(labels: Sequence[str], groups: Sequence[str], heldout_fraction: float,
                  seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), stratified by label and split by GROUP.

    Within each label the distinct groups are ordered by sha1(seed, group) and the first
    round(fraction * n_groups) (at least 1, never all) are held out, so examples of one group
    (e.g. passages of one document, or duplicates of one text) never sit on both sides.
    A group held out under one label is removed from the training side of every label.
    """
    by_label: dict[str, dict[str, None]] = {}  # label -> its distinct groups (ordered set)
    for lab, g in zip(labels, groups):
        by_label.setdefault(lab, {})[g] = None
    held: set[str] = set()
    for gs in by_label.values():
        ordered = sorted(gs, key=lambda g: hashlib.sha1(f"{seed}\0{g}".encode("utf-8", "surrogatepass")).digest())
        k = round(heldout_fraction * len(ordered))
        if heldout_fraction > 0 and len(ordered) >= 2:
            k = min(max(k, 1), len(ordered) - 1)
        held.update(ordered[:k])
    train = [i for i, g in enumerate(groups) if g not in held]
    heldout = [i for i, g in enumerate(groups) if g in held]
    return train, heldout


def _validate(texts: Sequence[str], labels: Sequence[str], groups: Sequence[str] | None,
              min_per_class: int, heldout_fraction: float) -> list[str]:
    if len(texts) == 0:
        raise StarctlError("no texts to train on")
    if len(texts) != len(labels):
        raise StarctlError(f"{len(texts)} texts but {len(labels)} labels")
    if groups is not None and len(groups) != len(texts):
        raise StarctlError(f"{len(texts)} texts but {len(groups)} groups")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise StarctlError(f"text {i + 1} is empty")
    for i, lab in enumerate(labels):
        if not str(lab).strip():
            raise StarctlError(f"label of text {i + 1} is empty")
    if not 0.0 < heldout_fraction < 1.0:
        raise StarctlError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    counts: dict[str, int] = {}
    for lab in labels:
        counts[str(lab)] = counts.get(str(lab), 0) + 1
    if len(counts) < 2:
        (only, n), = counts.items()
        raise StarctlError(f"one class only: every example is labelled '{only}' ({n} examples); "
                           "a head needs at least 2 labels")
    small = {k: v for k, v in counts.items() if v < min_per_class}
    if small:
        listed = ", ".join(f"'{k}' ({v})" for k, v in sorted(small.items(), key=lambda kv: kv[1]))
        raise StarctlError(f"too few examples for {listed}: each label needs at least "
                           f"{min_per_class} (to train and to hold some out)")
    return sorted(counts)


@torch.no_grad()
def _head_accuracy(head: AttributeHead, x: torch.Tensor, y: torch.Tensor, alpha2: float,
                   noise: torch.Tensor) -> float:
    z = x if alpha2 >= 1.0 else math.sqrt(alpha2) * x + math.sqrt(1.0 - alpha2) * noise
    pred = torch.cat([head(zb, torch.full((zb.shape[0],), alpha2)).argmax(-1) for zb in z.split(1024)])
    return float((pred == y).float().mean())


def train_head(
    texts: Sequence[str],
    labels: Sequence[str],
    latent_space: LatentSpace,
    encoder,
    *,
    name: str = "attribute",
    label_order: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    width: int = 256,
    depth: int = 4,
    dropout: float = 0.1,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    min_per_class: int = MIN_PER_CLASS,
    cache: str | os.PathLike | None = None,
    embeddings: torch.Tensor | None = None,
    probe: bool = True,
    data: str = "",
    label_provenance: str = "",
    progress: Progress | None = None,
    num_threads: int | None = None,
) -> tuple[AttributeHead, HeadReport]:
    """Train a head on labelled texts; returns (head in eval mode, report).

    texts, labels: the examples (labels are strings). `label_order`: the head's label order
        (default: sorted); it must contain every label present.
    latent_space: the core's latent space; the head records it as its fingerprint.
    encoder: the core's sentence encoder (a SentenceTransformer with `.encode`); its width must
        be latent_space.dim. Texts are encoded once (`cache`: optional safetensors file of raw
        embeddings, see `encode_cached`); `embeddings` (N, d) RAW embeddings skip the encoder.
    groups: optional group key per example (e.g. the source document of a passage): held-out
        examples share no group with training ones. Default: the text itself.
    Training: AdamW, cosine-decayed lr, class-balanced cross-entropy, a fresh noise level per
        example per batch with logSNR from the cosine training schedule (see module docstring).
    Report: held-out accuracy at alpha^2 in EVAL_ALPHA2 for the head and for a logistic-regression
        probe fitted on clean training latents (`probe=False` skips it), on the same noise.
    num_threads: torch threads while training (restored after). The head is small: on a CPU
        that other processes keep busy, 1 thread is many times faster than 2 (measured: 2 ms vs
        300 ms per step of a width-64 head on a 2-core machine shared with a training run).
    StarctlError: no texts, an empty text or label, one class only, fewer than `min_per_class`
        examples of a label, a label missing from `label_order`, an encoder of the wrong width.
    """
    with _torch_threads(num_threads):
        return _train_head(texts, labels, latent_space, encoder, name=name, label_order=label_order,
                           groups=groups, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, width=width, depth=depth, dropout=dropout,
                           seed=seed, heldout_fraction=heldout_fraction, min_per_class=min_per_class,
                           cache=cache, embeddings=embeddings, probe=probe, data=data,
                           label_provenance=label_provenance, progress=progress)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_head(texts, labels, latent_space, encoder, *, name, label_order, groups, epochs, batch_size,
                lr, weight_decay, width, depth, dropout, seed, heldout_fraction, min_per_class, cache,
                embeddings, probe, data, label_provenance, progress) -> tuple[AttributeHead, HeadReport]:
    texts = list(texts)
    labels = [str(x) for x in labels]
    present = _validate(texts, labels, groups, min_per_class, heldout_fraction)
    if label_order is None:
        label_order = present
    else:
        label_order = [str(x) for x in label_order]
        extra = [lab for lab in present if lab not in label_order]
        if extra:
            raise StarctlError(f"labels {', '.join(extra)} are not among the attribute's labels "
                               f"({', '.join(label_order)})")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise StarctlError("epochs and batch_size must be >= 1 and lr > 0")
    groups = list(texts) if groups is None else [str(g) for g in groups]

    # 1. Encode once.
    t0 = time.time()
    from_cache = False
    if embeddings is None:
        dim = encoder_dim(encoder)
        if dim != latent_space.dim:
            raise StarctlError(f"encoder gives {dim}-d embeddings but the latent space "
                               f"({latent_space.encoder}) is {latent_space.dim}-d")
        embeddings, from_cache = encode_cached(encoder, texts, latent_space.encoder, cache, progress=progress)
    if embeddings.shape != (len(texts), latent_space.dim):
        raise StarctlError(f"embeddings have shape {tuple(embeddings.shape)}, expected "
                           f"({len(texts)}, {latent_space.dim})")
    x_all = latent_space.normalise(embeddings.float())                                # (N, d)
    seconds_encode = time.time() - t0

    index = {lab: i for i, lab in enumerate(label_order)}
    y_all = torch.tensor([index[lab] for lab in labels])                              # (N,)
    train_idx, held_idx = split_heldout(labels, groups, heldout_fraction, seed)
    if not train_idx or not held_idx:
        raise StarctlError("not enough distinct examples to hold some out")
    train_labels = {labels[i] for i in train_idx}
    if len(train_labels) < len(present):
        lost = sorted(set(present) - train_labels)
        raise StarctlError(f"no training examples left for {', '.join(lost)} after holding out: "
                           "give more distinct examples")
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    x_ho, y_ho = x_all[held_idx], y_all[held_idx]

    # 2. Train.
    t1 = time.time()
    torch.manual_seed(seed)
    config = HeadConfig(name=name, labels=list(label_order), latent=latent_space, width=width,
                        depth=depth, dropout=dropout, data=data, label_provenance=label_provenance)
    head = AttributeHead(config)
    counts = torch.bincount(y_tr, minlength=len(label_order)).float()                # (L,)
    weight = torch.where(counts > 0, counts.sum() / (len(label_order) * counts.clamp(min=1)), 0.0)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_tr.shape[0]
    per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, min(100, total_steps // 10)))
        * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    gen = torch.Generator().manual_seed(seed)
    head.train()
    step, final_loss, ema = 0, float("nan"), None
    for _epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            x, y = x_tr[idx], y_tr[idx]                                               # (b, d), (b,)
            logsnr = TRAIN_SCHEDULE.sample_logsnr(x.shape[0], generator=gen)         # (b,)
            alpha, sigma = alpha_sigma(logsnr)                                        # (b,) each
            z = alpha[:, None] * x + sigma[:, None] * torch.randn(x.shape, generator=gen)
            loss = loss_fn(head(z, alpha**2), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if progress is not None:
                progress("train", step, total_steps)
    final_loss = float(ema) if ema is not None else final_loss
    opt.zero_grad(set_to_none=True)  # hand back a head without stale gradients
    head.eval()
    seconds_train = time.time() - t1

    # 3. Evaluate head and probe on the same noisy held-out latents.
    eval_gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(x_ho.shape, generator=eval_gen)                              # (H, d)
    head_acc = {a: _head_accuracy(head, x_ho, y_ho, a, noise) for a in EVAL_ALPHA2}
    probe_acc: dict[float, float] = {}
    if probe:
        probe_acc = _probe_accuracy(x_tr, y_tr, x_ho, y_ho, noise, seed)
    if progress is not None:
        progress("evaluate", 1, 1)
    majority = float(torch.bincount(y_ho, minlength=len(label_order)).max()) / len(y_ho)
    all_counts = {lab: int(sum(1 for x in labels if x == lab)) for lab in label_order}
    report = HeadReport(
        labels=list(label_order), class_counts=all_counts, n_train=len(train_idx),
        n_heldout=len(held_idx), head_accuracy=head_acc, probe_accuracy=probe_acc,
        majority_accuracy=majority, epochs=epochs, final_loss=final_loss,
        seconds_encode=round(seconds_encode, 2), seconds_train=round(seconds_train, 2),
        encoded_from_cache=from_cache,
    )
    config.heldout_accuracy = {str(a): round(v, 4) for a, v in head_acc.items()}
    config.probe_accuracy = {str(a): round(v, 4) for a, v in probe_acc.items()}
    config.training = {
        "n_train": len(train_idx), "n_heldout": len(held_idx), "class_counts": all_counts,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "seed": seed, "heldout_fraction": heldout_fraction, "final_loss": round(final_loss, 4),
        "noise": "logSNR from the truncated cosine training schedule (t ~ U[0, 1])",
        "loss": "class-balanced cross-entropy",
        "majority_accuracy": round(majority, 4),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return head, report


def _probe_accuracy(x_tr, y_tr, x_ho, y_ho, noise, seed) -> dict[float, float]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit(x_tr.numpy(), y_tr.numpy())
    out = {}
    for a in EVAL_ALPHA2:
        z = x_ho if a >= 1.0 else math.sqrt(a) * x_ho + math.sqrt(1.0 - a) * noise
        out[a] = float((torch.as_tensor(clf.predict(z.numpy())) == y_ho).float().mean())
    return out
