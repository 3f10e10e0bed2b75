"""The latent space of plans: a frozen sentence encoder plus scalar normalisation.

A plan is x = (e - mean) / std, where e is the encoder's embedding of the text to come and
mean, std are SCALARS measured over every coordinate of the training corpus's embeddings. The
triple (encoder name, dimension, statistics) is the latent space's identity: a head trained in
one latent space is meaningless in another, so every head carries this fingerprint and is
refused by a core whose fingerprint differs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .errors import StarctlError


@dataclass(frozen=True)
class LatentSpace:
    encoder: str
    dim: int
    mean: float = 0.0
    std: float = 1.0

    def normalise(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings - self.mean) / self.std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.std + self.mean

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatentSpace":
        return cls(encoder=d["encoder"], dim=int(d["dim"]), mean=float(d["mean"]), std=float(d["std"]))

    def matches(self, other: "LatentSpace", tol: float = 1e-6) -> bool:
        return (self.encoder == other.encoder and self.dim == other.dim
                and math.isclose(self.mean, other.mean, rel_tol=tol, abs_tol=tol)
                and math.isclose(self.std, other.std, rel_tol=tol, abs_tol=tol))

    def check_compatible(self, other: "LatentSpace", what: str) -> None:
        """Raise a StarctlError if `other` (the latent space `what` was trained in) differs."""
        if not self.matches(other):
            raise StarctlError(
                f"{what} was trained for another latent space (encoder {other.encoder}, dim "
                f"{other.dim}, mean {other.mean:.6g}, std {other.std:.6g}); this core uses encoder "
                f"{self.encoder}, dim {self.dim}, mean {self.mean:.6g}, std {self.std:.6g}"
            )


def encoder_dim(encoder) -> int:
    """Embedding width of a sentence-transformers model (the API was renamed in 6.x)."""
    getter = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(getter())


@torch.no_grad()
def encode_texts(encoder, texts: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Raw (unnormalised) embeddings of texts, (N, D) float32 on the CPU."""
    if not texts:
        return torch.empty(0, encoder_dim(encoder))
    emb = encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                         show_progress_bar=progress)
    return emb.float().cpu()


def measure_statistics(embeddings: torch.Tensor) -> tuple[float, float]:
    """Scalar mean and std over all coordinates of a corpus's embeddings (N, D)."""
    return float(embeddings.mean()), float(embeddings.std())
