"""The STAR-LDM core: backbone LM + soft-prompt generator + score head over a frozen encoder's
latent space.

Sequence layout, for a batch of left-padded prefixes of length P:

    [prefix tokens (P)][K plan slots][continuation tokens (C)]

The plan slots hold soft-prompt vectors (backbone embedding space) made from the noisy plan
z_t by the generator. One backbone pass serves both halves of the model:
  * the LM reads the continuation conditioned on prefix and plan (decoder p(text | plan));
  * the score head reads the backbone's last hidden states at the K slots (which causally see
    the prefix and the noisy plan) plus the slot vectors, and predicts v (the denoiser).

Soft-prompt generator. Besides the paper's transformer (Linear(d -> K*w), FiLM transformer,
Linear(w -> backbone width)), the generator has an optional VOCABULARY route: a linear map from
the plan to logits over a subset of the backbone's vocabulary, turned into K distributions by a
differentiable top-K (each slot softly picks the most likely word not yet picked), whose
probability-weighted token embeddings are the slot vectors; the transformer then adds a
zero-initialised residual. The LM already reads real words, so a plan that lands on its
embedding table is read from the first step (DESIGN.md, "Measured risk").
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import StarctlError
from .latent import LatentSpace
from .layers import FiLMTransformer, TimeEmbedding, zero_init
from .schedule import alpha_sigma

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BACKBONE_MODES = ("frozen", "lora", "full")


@dataclass
class StarConfig:
    backbone: str = "smollm2-135m"
    encoder: str = "minilm-l6"
    latent_dim: int = 384
    latent_mean: float = 0.0
    latent_std: float = 1.0
    num_slots: int = 8
    width: int = 256                 # generator / score-head transformer width
    generator_depth: int = 2
    head_depth: int = 2
    num_heads: int = 4
    dropout: float = 0.0
    vocab_size: int = 0              # vocabulary route over this many token ids (0 = off)
    vocab_hard: bool = True          # slots are the top-K words (straight-through gradient)
    null_prob: float = 0.1           # classifier-free dropout of the backbone states in the head
    backbone_mode: str = "frozen"    # frozen | lora | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        if self.backbone_mode not in BACKBONE_MODES:
            raise StarctlError(f"backbone_mode must be one of {', '.join(BACKBONE_MODES)}, got {self.backbone_mode!r}")

    @property
    def latent_space(self) -> LatentSpace:
        return LatentSpace(self.encoder, self.latent_dim, self.latent_mean, self.latent_std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StarConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"starctl_version"}
        if unknown:
            raise StarctlError(f"unknown core config keys: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in d.items() if k in known})


def soft_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) logits -> (B, k, V) distributions: slot j softly picks the j-th most likely token.

    After each pick p_j the remaining mass is discounted by (1 - p_j) in log space, so a word
    already taken is unlikely to be taken again. With sharp logits this tends to hard top-k.
    """
    log_keep = torch.zeros_like(logits)
    picks = []
    for _ in range(k):
        p = torch.softmax(logits + log_keep, dim=-1)  # (B, V)
        picks.append(p)
        log_keep = log_keep + torch.log1p(-p.clamp(max=1 - 1e-4))
    return torch.stack(picks, dim=1)


class SoftPromptGenerator(nn.Module):
    """(z_t (B, d), alpha^2 (B,)) -> K soft-prompt vectors (B, K, H) in the backbone's embedding space."""

    def __init__(self, config: StarConfig, hidden_size: int):
        super().__init__()
        c = config
        self.num_slots, self.width = c.num_slots, c.width
        self.time = TimeEmbedding(c.width)
        self.inp = nn.Linear(c.latent_dim, c.num_slots * c.width)
        self.pos = nn.Parameter(torch.randn(c.num_slots, c.width) * 0.02)
        self.transformer = FiLMTransformer(c.width, c.generator_depth, c.num_heads, c.dropout)
        self.out = nn.Linear(c.width, hidden_size)
        self.vocab_map = None
        if c.vocab_size > 0:
            self.vocab_map = nn.Linear(c.latent_dim, c.vocab_size)
            self.hard = c.vocab_hard
            self.register_buffer("vocab_ids", torch.zeros(c.vocab_size, dtype=torch.long))
            zero_init(self.out)  # the transformer starts as a zero residual on the vocabulary route

    def vocab_distributions(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, K, V) word choices of the K slots.

        Hard mode: slot j is exactly the j-th most likely word (one-hot), so the LM reads real
        token embeddings; the gradient is the soft top-K's (straight-through estimator).
        """
        logits = self.vocab_map(z)  # (B, V)
        soft = soft_top_k(logits, self.num_slots)  # (B, K, V)
        if not self.hard:
            return soft
        top = logits.topk(self.num_slots, dim=-1).indices  # (B, K), best first
        hard = torch.zeros_like(soft).scatter_(-1, top[..., None], 1.0)
        return hard + soft - soft.detach()

    def forward(self, z: torch.Tensor, alpha2: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        # z (B, d), alpha2 (B,), token_embeddings (vocab, H): the backbone's input embedding table
        B = z.shape[0]
        time = self.time(alpha2)  # (B, W)
        h = self.inp(z).view(B, self.num_slots, self.width) + self.pos  # (B, K, W)
        slots = self.out(self.transformer(h, time))  # (B, K, H)
        if self.vocab_map is not None:
            table = token_embeddings[self.vocab_ids]  # (V, H)
            slots = slots + self.vocab_distributions(z).to(table.dtype) @ table  # (B, K, H)
        return slots


class ScoreHead(nn.Module):
    """(backbone states at the slots (B, K, H), slot vectors (B, K, H), alpha^2) -> v (B, d)."""

    def __init__(self, config: StarConfig, hidden_size: int):
        super().__init__()
        c = config
        self.time = TimeEmbedding(c.width)
        self.inp = nn.Linear(2 * hidden_size, c.width)
        self.pos = nn.Parameter(torch.randn(c.num_slots, c.width) * 0.02)
        self.transformer = FiLMTransformer(c.width, c.head_depth, c.num_heads, c.dropout)
        self.out = nn.Linear(c.num_slots * c.width, c.latent_dim)
        # Classifier-free "null": replaces the backbone states when the head must not see the prefix.
        self.null_states = nn.Parameter(torch.zeros(c.num_slots, hidden_size))

    def forward(self, states: torch.Tensor, slots: torch.Tensor, alpha2: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        # states, slots (B, K, H); drop (B,) bool: use the null instead of the states
        if drop is not None:
            states = torch.where(drop[:, None, None], self.null_states.to(states.dtype), states)
        h = self.inp(torch.cat([states, slots], dim=-1).float()) + self.pos  # (B, K, W)
        h = self.transformer(h, self.time(alpha2))
        return self.out(h.flatten(1))  # (B, d)


def decoder_body(backbone: nn.Module) -> nn.Module:
    """The transformer of a causal LM without its output head (returns last_hidden_state)."""
    body = backbone.get_decoder() if hasattr(backbone, "get_decoder") else None
    if body is None or body is backbone:
        body = getattr(backbone, backbone.base_model_prefix)
    return body


@functools.lru_cache(maxsize=64)
def _cache_kwarg_name(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwarg(module: nn.Module, cache) -> dict:
    """transformers 5.x renamed `past_key_values` to `cache`; pass whichever the model takes.
    (The answer is cached per forward function: inspect.signature costs ~0.1 ms per pass.)"""
    if cache is None:
        return {}
    forward = module.forward
    try:
        name = _cache_kwarg_name(getattr(forward, "__func__", forward))
    except TypeError:  # an unhashable callable
        name = _cache_kwarg_name.__wrapped__(forward)
    return {name: cache}


def crop_cache(cache, length: int) -> None:
    """Cut a transformers Cache back to its first `length` positions (negative crop = remove n)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def position_ids_from_mask(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Positions that skip padding: (B, L) 0/1 mask -> (B, L) long, starting at `offset`."""
    pos = mask.long().cumsum(-1) - 1 + (offset[:, None] if torch.is_tensor(offset) else offset)
    return pos.clamp(min=0)


class StarCore(nn.Module):
    """Backbone + soft-prompt generator + score head. The encoder lives outside (see latent.py)."""

    def __init__(self, config: StarConfig, backbone: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        if config.backbone_mode == "lora":
            backbone = self._wrap_lora(backbone, config)
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        self.hidden_size = hidden
        self.generator = SoftPromptGenerator(config, hidden)
        self.score_head = ScoreHead(config, hidden)
        self.set_backbone_trainable()

    # --- construction ---------------------------------------------------------------------

    @staticmethod
    def _wrap_lora(backbone, config):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=list(config.lora_targets))
        return get_peft_model(backbone, lora)

    def set_backbone_trainable(self) -> None:
        mode = self.config.backbone_mode
        for name, p in self.backbone.named_parameters():
            p.requires_grad = mode == "full" or (mode == "lora" and "lora_" in name)

    @property
    def latent_space(self) -> LatentSpace:
        return self.config.latent_space

    @property
    def lm(self) -> nn.Module:
        """The plain causal LM (under the LoRA wrapper when there is one)."""
        return self.backbone

    def token_embeddings(self) -> torch.Tensor:
        return self.backbone.get_input_embeddings().weight

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(ids)

    def body(self) -> nn.Module:
        return decoder_body(self.backbone)

    def lm_head(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.score_head.out.weight.device

    # --- the two halves ----------------------------------------------------------------

    def soft_prompt(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """Noisy plan z (B, d) at log-SNR (B,) -> slot vectors (B, K, H) in the backbone's dtype."""
        alpha2 = torch.sigmoid(logsnr)
        slots = self.generator(z.float(), alpha2, self.token_embeddings())
        return slots.to(self.token_embeddings().dtype)

    def run_body(self, embeds, mask, position_ids, cache=None):
        """Last hidden states (B, L, H) of the backbone over input embeddings; `cache` (a
        transformers Cache holding earlier positions) is extended in place when given."""
        body = self.body()
        out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                   use_cache=cache is not None, **cache_kwarg(body, cache))
        return out.last_hidden_state

    # --- training ------------------------------------------------------------------------

    def _read_text(self, prefix_ids, prefix_mask, cont_ids, cont_mask, slots):
        """One backbone pass over [prefix][slots][continuation] (slots (B, K, H), or None for
        [prefix][continuation]): returns the last hidden states (B, L, H) and the summed
        continuation NLL per example (B,). Position P+K-1+i predicts continuation token i
        (without slots, the last prefix token predicts the first continuation token)."""
        B, P = prefix_ids.shape
        parts, masks = [self.embed_tokens(prefix_ids)], [prefix_mask]
        K = 0
        if slots is not None:
            K = slots.shape[1]
            parts.append(slots)
            masks.append(torch.ones(B, K, dtype=prefix_mask.dtype, device=prefix_mask.device))
        parts.append(self.embed_tokens(cont_ids))
        masks.append(cont_mask)
        mask = torch.cat(masks, dim=1)  # (B, P+K+C)
        hidden = self.run_body(torch.cat(parts, dim=1), mask, position_ids_from_mask(mask))  # (B, L, H)
        C = cont_ids.shape[1]
        logits = self.lm_head()(hidden[:, P + K - 1: P + K - 1 + C]).float()  # (B, C, V)
        ce = F.cross_entropy(logits.transpose(1, 2), cont_ids, reduction="none")  # (B, C)
        return hidden, (ce * cont_mask.float()).sum(1)

    def training_losses(self, prefix_ids, prefix_mask, cont_ids, cont_mask, plan, logsnr, noise,
                        drop=None) -> dict[str, torch.Tensor]:
        """Per-example loss terms for one batch.

        prefix_ids/mask (B, P) LEFT-padded; cont_ids/mask (B, C) RIGHT-padded; plan x (B, d)
        normalised latent; logsnr, noise: one noise level and eps per example, shared by the LM
        and the diffusion terms (the LM learns to decode from a noisy plan).
        Returns per-example tensors: `nll_sum` (summed CE over continuation tokens),
        `ntokens` and `v_mse` (mean over d).
        """
        P = prefix_ids.shape[1]
        K = self.config.num_slots
        alpha, sigma = alpha_sigma(logsnr)  # (B,)
        z_t = alpha[:, None] * plan + sigma[:, None] * noise  # (B, d)
        slots = self.soft_prompt(z_t, logsnr)  # (B, K, H)
        hidden, nll_sum = self._read_text(prefix_ids, prefix_mask, cont_ids, cont_mask, slots)

        # Denoiser: v-prediction from the states at the slots.
        v_pred = self.score_head(hidden[:, P:P + K], slots, torch.sigmoid(logsnr), drop)
        v_target = alpha[:, None] * noise - sigma[:, None] * plan
        v_mse = (v_pred - v_target).pow(2).mean(-1)
        return {"nll_sum": nll_sum, "ntokens": cont_mask.float().sum(1), "v_mse": v_mse}

    @torch.no_grad()
    def continuation_nll(self, prefix_ids, prefix_mask, cont_ids, cont_mask, z, logsnr) -> torch.Tensor:
        """Summed continuation NLL per example (B,) given a plan z at log-SNR (B,).
        z=None means no plan slots at all (the backbone alone)."""
        slots = None if z is None else self.soft_prompt(z, logsnr)
        return self._read_text(prefix_ids, prefix_mask, cont_ids, cont_mask, slots)[1]

    # --- denoising on a prefix cache -------------------------------------------------------

    def denoise(self, z, logsnr, cache, prefix_mask, unconditional: bool = False) -> torch.Tensor:
        """v-prediction for plans z (B, d) after cached prefixes (the cache is left as it was).

        Only the K slot positions run through the backbone; the prefix is read from `cache`,
        which holds the keys/values of the left-padded prefixes (mask `prefix_mask` (B, P)).
        """
        B, P = prefix_mask.shape
        K = self.config.num_slots
        slots = self.soft_prompt(z, logsnr)  # (B, K, H)
        ones = torch.ones(B, K, dtype=prefix_mask.dtype, device=prefix_mask.device)
        mask = torch.cat([prefix_mask, ones], dim=1)
        positions = position_ids_from_mask(mask)[:, P:]
        states = self.run_body(slots, mask, positions, cache=cache)  # (B, K, H)
        crop_cache(cache, P)
        drop = torch.full((B,), unconditional, dtype=torch.bool, device=z.device)
        return self.score_head(states, slots, torch.sigmoid(logsnr), drop)

    # --- save / load -----------------------------------------------------------------------

    def trained_state_dict(self, keep_tied: bool = False) -> dict[str, torch.Tensor]:
        """The parameters this checkpoint owns: generator, head, and what of the backbone trained.

        A tensor tied to an earlier entry (a fully trained backbone's output embedding tied to
        its input embedding, as in GPT-2) is listed once, under its first name (the one
        `named_parameters` uses), unless `keep_tied`."""
        sd = {}
        for prefix, module in (("generator.", self.generator), ("score_head.", self.score_head)):
            for k, v in module.state_dict().items():
                sd[prefix + k] = v
        mode = self.config.backbone_mode
        if mode != "frozen":
            seen: set[tuple[int, tuple]] = set()
            for k, v in self.backbone.state_dict().items():
                if mode == "full" or "lora_" in k:
                    key = (v.data_ptr(), tuple(v.shape))
                    if key in seen and not keep_tied:
                        continue
                    seen.add(key)
                    sd["backbone." + k] = v
        return {k: v.detach().contiguous() for k, v in sd.items()}

    def load_trained_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        own = self.trained_state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(self.trained_state_dict(keep_tied=True)))
        if missing or unexpected:
            raise StarctlError(f"checkpoint does not match this core: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.generator.load_state_dict({k[10:]: v for k, v in sd.items() if k.startswith("generator.")})
        self.score_head.load_state_dict({k[11:]: v for k, v in sd.items() if k.startswith("score_head.")})
        bb = {k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}
        if bb:
            self.backbone.load_state_dict(bb, strict=False)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.trained_state_dict()
        save_file({k: v.cpu().contiguous() for k, v in sd.items()}, str(d / WEIGHTS_NAME))
        (d / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def build(cls, config: StarConfig, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> "StarCore":
        from .assets import load_backbone

        backbone, tokenizer = load_backbone(config.backbone, dtype=dtype)
        core = cls(config, backbone, tokenizer)
        return core.to(device)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "StarCore":
        config, sd = read_checkpoint(directory)
        core = cls.build(config, device="cpu", dtype=dtype)
        core.load_trained_state_dict(sd)
        return core.to(device).eval()


def read_checkpoint(directory: str | Path) -> tuple[StarConfig, dict[str, torch.Tensor]]:
    """Read config.json + model.safetensors with clear errors for a missing or corrupt checkpoint."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise StarctlError(f"core checkpoint not found: {d} is not a folder")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise StarctlError(f"core checkpoint {d} is missing {p.name}")
    try:
        config = StarConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise StarctlError(f"corrupt core config {cfg_path}: {e}") from None
    try:
        sd = load_file(str(w_path))
    except Exception as e:  # safetensors raises several error types for a damaged file
        raise StarctlError(f"corrupt core weights {w_path}: {e}") from None
    return config, sd
