"""Steering: `--steer positive=0.8` -> classifier guidance inside the plan sampler.

A steer is LABEL=STRENGTH with strength in [-1, 1] (negative steers away from the label). It
becomes a guidance scale s = strength * head.config.max_scale (a per-head calibrated number,
stored with the head), and every denoising step adds

    eps~ = eps^ - sum_terms s * sigma_t * grad_z log p(label | z_t)

(classifier guidance written on the noise prediction; the sampler then re-derives
x0 = (z_t - sigma_t eps~) / alpha_t). Gradients go through the heads only, on a detached copy
of z_t, batched over samples; each head runs once per step whatever the number of its labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch

from .attributes import AttributeInfo, find_label, list_attributes, load_head
from .errors import StarctlError
from .heads import AttributeHead
from .latent import LatentSpace
from .sampler import Guidance

__all__ = [
    "SteerTerm",
    "attribute_guidance",
    "parse_steer",
    "parse_steer_specs",
    "parse_steers",
    "plan_probabilities",
    "resolve_steering",
    "steering_terms",
]

_EXAMPLE = "e.g. positive=0.8"


def parse_steer(spec: str, attributes: Sequence[AttributeInfo] | None = None) -> tuple[str, float]:
    """'positive=0.8' -> ('positive', 0.8). The label may be qualified: 'sentiment:positive=0.8'.

    StarctlError (one line) for: no '=' or an empty side, a strength that is not a finite
    number, a strength outside [-1, 1], an unknown label (the message lists the valid ones).
    `attributes`: the registry listing to check labels against (default: list_attributes()).
    """
    text = spec.strip()
    label, eq, value = text.partition("=")
    label, value = label.strip(), value.strip()
    if not eq or not label or not value:
        raise StarctlError(f"malformed steer '{spec}': write LABEL=STRENGTH, {_EXAMPLE}")
    try:
        strength = float(value)
    except ValueError:
        raise StarctlError(f"steer '{spec}': strength '{value}' is not a number ({_EXAMPLE})") from None
    if not math.isfinite(strength):
        raise StarctlError(f"steer '{spec}': strength must be a finite number in [-1, 1]")
    if not -1.0 <= strength <= 1.0:
        raise StarctlError(f"steer '{spec}': strength {value} is outside [-1, 1] "
                           "(1 = full strength, negative steers away)")
    find_label(label, attributes)
    return label, strength


def parse_steers(specs: Iterable[str], attributes: Sequence[AttributeInfo] | None = None) -> list[tuple[str, float]]:
    """Several steers; each spec may also hold comma-separated steers ('positive=0.8,sport=0.5').

    On top of `parse_steer`'s errors: the same label twice, and two labels of one BINARY
    attribute at once (positive and negative: steer one of them, with a negative strength to
    steer away). Two labels of a multi-class attribute (sport=0.5, tech=0.5) are fine.
    """
    infos = list_attributes(None) if attributes is None else list(attributes)
    binary = {i.name for i in infos if i.binary and i.problem is None}
    out: list[tuple[str, float]] = []
    seen: dict[tuple[str, int], str] = {}
    by_attr: dict[str, str] = {}
    for spec in specs:
        for part in spec.split(","):
            if not part.strip():
                if spec.strip():
                    raise StarctlError(f"malformed steer '{spec}': empty item between commas")
                raise StarctlError(f"malformed steer '{spec}': write LABEL=STRENGTH, {_EXAMPLE}")
            label, strength = parse_steer(part, infos)
            attr, idx = find_label(label, infos)
            if (attr, idx) in seen:
                raise StarctlError(f"label '{label}' is steered twice ({seen[(attr, idx)]} and "
                                   f"{part.strip()}): give each label once")
            if attr in binary and attr in by_attr:
                raise StarctlError(f"'{by_attr[attr]}' and '{part.strip()}' are both labels of the binary "
                                   f"attribute '{attr}': steer one of them (a negative strength steers away)")
            seen[(attr, idx)] = part.strip()
            by_attr.setdefault(attr, part.strip())
            out.append((label, strength))
    return out


def parse_steer_specs(specs: Iterable[str], attributes: Sequence[AttributeInfo] | None = None) -> dict[str, float]:
    """`parse_steers` as a dict label -> strength (for the CLI's repeatable --steer)."""
    return dict(parse_steers(specs, attributes))


@dataclass(frozen=True)
class SteerTerm:
    """One guidance term: push the plan towards `label` of `head` with guidance scale `scale`
    (negative: away from it). `attribute`: the registry name (default: the head's name)."""

    head: AttributeHead
    label: str
    scale: float
    attribute: str = ""

    def __post_init__(self):
        if not self.attribute:
            object.__setattr__(self, "attribute", self.head.name)

    @property
    def index(self) -> int:
        return self.head.config.label_index(self.label)


SteerSpec = Union[Mapping[str, float], Sequence[str], Sequence[tuple[str, float]]]


def _spec_strings(steer: SteerSpec) -> list[str]:
    if isinstance(steer, Mapping):
        return [f"{label}={float(v)!r}" for label, v in steer.items()]
    return [s if isinstance(s, str) else f"{s[0]}={float(s[1])!r}" for s in steer]


def resolve_steering(steer: SteerSpec, head_for: Callable[[str], AttributeHead],
                     attributes: Sequence[AttributeInfo] | None = None) -> list[SteerTerm]:
    """Steers -> guidance terms. `steer`: {label: strength}, ['positive=0.8', ...] or
    [(label, strength), ...], validated as by `parse_steers`. `head_for(attribute name)` gives
    the head to use (e.g. a cached `load_head(name, core.latent_space)`, which refuses heads of
    another latent space). scale = strength * head.config.max_scale; strength-0 terms dropped."""
    infos = list_attributes(None) if attributes is None else list(attributes)
    parsed = parse_steers(_spec_strings(steer), infos)
    terms = []
    for label, strength in parsed:
        attr, _ = find_label(label, infos)
        head = head_for(attr)
        plain = label.partition(":")[2] if ":" in label else label
        head.config.label_index(plain)  # a head whose labels differ from the definition's
        if strength != 0.0:
            terms.append(SteerTerm(head, plain, strength * head.config.max_scale, attr))
    return terms


def steering_terms(steer: SteerSpec, latent_space: LatentSpace, map_location: str = "cpu") -> list[SteerTerm]:
    """`resolve_steering` with heads loaded from the registry for `latent_space` (once each)."""
    infos = list_attributes(latent_space)
    cache: dict[str, AttributeHead] = {}

    def head_for(attr: str) -> AttributeHead:
        if attr not in cache:
            cache[attr] = load_head(attr, latent_space, map_location)
        return cache[attr]

    return resolve_steering(steer, head_for, infos)


def _as_terms(heads_and_targets: Iterable[SteerTerm | tuple]) -> list[SteerTerm]:
    terms = []
    for t in heads_and_targets:
        if not isinstance(t, SteerTerm):
            head, label, scale = t
            if isinstance(label, int):
                if not 0 <= label < len(head.labels):
                    raise StarctlError(f"head '{head.name}' has no label index {label}")
                label = head.labels[label]
            t = SteerTerm(head, str(label), float(scale))
        t.head.config.label_index(t.label)  # StarctlError for an unknown label
        terms.append(t)
    return terms


def attribute_guidance(heads_and_targets: Iterable[SteerTerm | tuple]) -> Guidance:
    """A sampler Guidance from terms (SteerTerm, or (head, label or label index, scale)).

    guidance(z_t (B, D), logsnr (B,), eps_hat (B, D)) -> eps_hat - sigma_t * grad_z S, where
    S = sum over terms of scale * log p(label | z_t, alpha_t^2), summed over the batch (samples
    are independent, so its gradient is every sample's own). Heads are put in eval mode.
    """
    terms = _as_terms(heads_and_targets)
    # Group terms by head: one forward/backward per head per step.
    groups: list[tuple[AttributeHead, torch.Tensor]] = []
    for t in terms:
        for k, (h, _) in enumerate(groups):
            if h is t.head:
                groups[k][1][t.index] += t.scale
                break
        else:
            w = torch.zeros(len(t.head.labels), dtype=torch.float64)
            w[t.index] = t.scale
            groups.append((t.head, w))
    for h, _ in groups:
        h.eval()

    def guidance(z: torch.Tensor, logsnr: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        if not groups:
            return eps_hat
        alpha2 = torch.sigmoid(logsnr)                                                # (B,)
        sigma = torch.sigmoid(-logsnr).sqrt()                                         # (B,)
        grad = torch.zeros_like(eps_hat)                                              # (B, D)
        with torch.enable_grad():
            for head, weights in groups:
                p = next(head.parameters())
                zz = z.detach().to(device=p.device, dtype=p.dtype).clone().requires_grad_(True)
                logp = head.log_probs(zz, alpha2.to(device=p.device, dtype=p.dtype))  # (B, L)
                score = (logp * weights.to(device=p.device, dtype=p.dtype)).sum()
                (g,) = torch.autograd.grad(score, zz)                                 # (B, D)
                grad = grad + g.to(device=eps_hat.device, dtype=eps_hat.dtype)
        return eps_hat - sigma.to(eps_hat.dtype)[:, None] * grad

    return guidance


@torch.no_grad()
def _probabilities(head: AttributeHead, plan: torch.Tensor) -> torch.Tensor:
    p = next(head.parameters())
    was_training = head.training
    head.eval()
    try:
        ones = torch.ones(plan.shape[0], device=p.device, dtype=p.dtype)
        return torch.softmax(head(plan.to(device=p.device, dtype=p.dtype), ones), -1).float().cpu()  # (B, L)
    finally:
        head.train(was_training)


def plan_probabilities(heads: Mapping[str, AttributeHead] | Sequence[AttributeHead],
                       plan: torch.Tensor) -> list[dict]:
    """Label probabilities of clean plans (alpha^2 = 1), per sample. plan: (B, d) latents.

    heads as a dict {attribute: head} -> B dicts {attribute: {label: p}};
    heads as a list -> B flat dicts {label: p} (a label two heads share is written
    'attribute:label' for both).
    """
    if isinstance(heads, Mapping):
        out: list[dict] = [{} for _ in range(plan.shape[0])]
        for attr, h in heads.items():
            probs = _probabilities(h, plan)
            for b in range(plan.shape[0]):
                out[b][attr] = {lab: float(probs[b, j]) for j, lab in enumerate(h.labels)}
        return out
    count: dict[str, int] = {}
    for h in heads:
        for lab in h.labels:
            count[lab] = count.get(lab, 0) + 1
    flat: list[dict] = [{} for _ in range(plan.shape[0])]
    for h in heads:
        probs = _probabilities(h, plan)
        for b in range(plan.shape[0]):
            for j, lab in enumerate(h.labels):
                flat[b][lab if count[lab] == 1 else f"{h.name}:{lab}"] = float(probs[b, j])
    return flat
