"""The one library entry point the faces (CLI, demo, benchmarks) call.

    star = Star.load()                                   # the bundled default core
    out = star.generate(["The movie was"], steer={"positive": 0.8})

A `Star` holds a core and loads attribute heads on demand; it keeps no per-request state, so
one instance can serve concurrent requests (each call builds its own cache and sampler run).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import StarctlError
from .generation import GenerationConfig, GenerationResult, generate
from .model import StarCore


def default_core_path() -> Path:
    """The bundled default core (repo folder `cores/default`), or $STARCTL_CORE."""
    env = os.environ.get("STARCTL_CORE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "cores" / "default"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class SteeredGeneration:
    prompt: str
    sample: int
    continuation: str
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)  # attribute -> label -> p
    steps_used: list[int] = field(default_factory=list)


class Star:
    def __init__(self, core: StarCore):
        self.core = core
        self._heads: dict[str, object] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, core_path: str | Path | None = None, device: str = "auto") -> "Star":
        dev = pick_device(device)
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        path = Path(core_path) if core_path is not None else default_core_path()
        return cls(StarCore.from_pretrained(path, device=dev, dtype=dtype))

    @property
    def latent_space(self):
        return self.core.latent_space

    def head(self, attribute: str):
        """The attribute's head for this core (cached; refused if trained for another latent space)."""
        from .attributes import load_head

        with self._lock:
            if attribute not in self._heads:
                self._heads[attribute] = load_head(attribute, self.latent_space).to(self.core.device).eval()
            return self._heads[attribute]

    def generate(self, prompts: list[str] | str, steer: dict[str, float] | list[str] | None = None,
                 report: list[str] | None = None, **options) -> tuple[list[SteeredGeneration], GenerationResult]:
        """Generate continuations, steered by label strengths in [-1, 1] (e.g. {"positive": 0.8}).

        `report` names attributes whose probabilities for each final plan are returned besides the
        steered ones. Options are GenerationConfig fields.
        """
        from .steering import attribute_guidance, plan_probabilities, resolve_steering

        if isinstance(prompts, str):
            prompts = [prompts]
        try:
            cfg = GenerationConfig(**options)
        except TypeError as e:
            raise StarctlError(f"unknown generation option: {e}") from None
        terms = resolve_steering(steer or {}, self.head)
        guidance = [attribute_guidance(terms)] if terms else []
        result = generate(self.core, prompts, cfg, guidance)
        names = list(dict.fromkeys([t.attribute for t in terms] + list(report or [])))
        heads = {n: self.head(n) for n in names}
        outs = []
        for g in result.generations:
            plan = g.plans[-1][None].to(self.core.device)
            probs = plan_probabilities(heads, plan)[0] if heads else {}
            outs.append(SteeredGeneration(g.prompt, g.sample, g.continuation, probs, g.steps_used))
        return outs, result
