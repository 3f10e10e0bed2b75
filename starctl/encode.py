"""`starctl encode`: precompute the plan embeddings of a recipe's chunks, sharded across processes.

The encoder is frozen, so a run's plans can be computed once, before training, by as many
processes as there are devices (`accelerate launch ... starctl encode`), and training then
loads no encoder at all (`data.encoded = <folder>`).

The chunks are exactly the ones the trainer would build from the same recipe:
  * in memory: the same documents, held-out split, shuffles, chunks and stop points
    (`data.max_chunks` training chunks, or `max_chunks` when given; `data.eval_chunks` held out);
  * streaming: the first `max_chunks` chunks of the training stream (required) and the first
    `data.eval_chunks` held-out chunks.
Process k of N encodes chunks k, k+N, k+2N, ... of each split and writes
`<split>-<k>-of-<N>.safetensors` with `index` (N_k,), `tokens` (N_k, chunk_tokens) int32,
`stop` (N_k,) (the prefix length) and `embeddings` (N_k, D) float32 (raw, not normalised);
the main process writes `meta.json` last, once every part is there. `load_encoded` checks that
the parts cover every chunk exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import PlanExamples, make_chunks, split_at_random_stops
from .errors import StarctlError

META = "meta.json"
SPLITS = ("train", "heldout")


def recipe_chunks(cfg, tokenizer, max_chunks: int | None = None) -> dict[str, tuple[list, list]]:
    """{"train": (prefixes, continuations), "heldout": (...)}: the recipe's chunks, as the
    trainer builds them (see the module docstring)."""
    c = cfg.data
    if c.streaming:
        from .training import chunk_stream

        if max_chunks is None:
            raise StarctlError("encoding a streamed corpus needs max_chunks (how many training chunks)")
        return {"train": chunk_stream(cfg, tokenizer, "train").take(0, max_chunks),
                "heldout": chunk_stream(cfg, tokenizer, "heldout").take(0, c.eval_chunks)}
    from .training import corpus_documents

    train_docs, held_docs = corpus_documents(cfg)
    out = {}
    for split, docs, limit, seed in (("train", train_docs, max_chunks or c.max_chunks, cfg.seed),
                                     ("heldout", held_docs, c.eval_chunks, cfg.seed + 1)):
        chunks = make_chunks(docs, tokenizer, c.chunk_tokens, limit)
        out[split] = split_at_random_stops(chunks, c.min_prefix_tokens, c.min_cont_tokens, seed)
    return out


def meta_for(cfg) -> dict:
    c = cfg.data
    return {"encoder": cfg.core.encoder, "backbone": cfg.core.backbone, "chunk_tokens": c.chunk_tokens,
            "min_prefix_tokens": c.min_prefix_tokens, "min_cont_tokens": c.min_cont_tokens, "seed": cfg.seed,
            "sources": c.sources, "streaming": c.streaming, "heldout_fraction": c.heldout_fraction}


def encode_corpus(cfg, output: str | Path, *, max_chunks: int | None = None, batch_size: int = 64,
                  log=None) -> Path:
    """Encode the recipe's chunks into `output` (see the module docstring); every process of an
    `accelerate launch` calls it. Returns the folder."""
    from accelerate import PartialState

    from .assets import load_encoder, load_tokenizer
    from .latent import encode_texts, encoder_dim

    cpu = cfg.device.startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    rank, world = state.process_index, state.num_processes
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(output)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / META).unlink(missing_ok=True)  # a folder without meta.json is unfinished
        for old in out.glob("*-of-*.safetensors"):
            old.unlink()
    state.wait_for_everyone()
    encoder = load_encoder(cfg.core.encoder, device=str(state.device) if not cpu else "cpu")
    tokenizer = load_tokenizer(cfg.core.backbone)
    chunks = recipe_chunks(cfg, tokenizer, max_chunks)
    counts = {}
    for split in SPLITS:
        prefixes, conts = chunks[split]
        counts[split] = len(prefixes)
        mine = list(range(rank, len(prefixes), world))
        texts = [tokenizer.decode(conts[i]) for i in mine]
        emb = encode_texts(encoder, texts, batch_size=batch_size)
        tokens = torch.tensor([prefixes[i] + conts[i] for i in mine], dtype=torch.int32).reshape(len(mine), -1)
        stop = torch.tensor([len(prefixes[i]) for i in mine], dtype=torch.int64)
        save_file({"index": torch.tensor(mine, dtype=torch.int64), "tokens": tokens, "stop": stop,
                   "embeddings": emb.float().contiguous()},
                  str(out / f"{split}-{rank:05d}-of-{world:05d}.safetensors"))
        if log is not None and state.is_main_process:
            log(f"{split}: {len(prefixes)} chunks, {len(mine)} encoded by process {rank} of {world}")
    state.wait_for_everyone()
    if state.is_main_process:
        meta = {**meta_for(cfg), "dim": encoder_dim(encoder), "counts": counts, "processes": world}
        (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    state.wait_for_everyone()
    return out


def load_encoded(folder: str | Path, cfg=None) -> tuple[PlanExamples, PlanExamples]:
    """(training, held-out) PlanExamples from an `encode` folder; with `cfg`, refuse a folder made
    for another encoder, tokenizer or chunking."""
    d = Path(folder)
    if not (d / META).is_file():
        raise StarctlError(f"{d} is not a finished `starctl encode` folder (no {META})")
    meta = json.loads((d / META).read_text())
    if cfg is not None:
        want = meta_for(cfg)
        for key in ("encoder", "backbone", "chunk_tokens"):
            if meta[key] != want[key]:
                raise StarctlError(f"{d} was encoded with {key}={meta[key]!r}, the recipe has {want[key]!r}")
    out = []
    for split in SPLITS:
        parts = sorted(d.glob(f"{split}-*-of-*.safetensors"))
        if not parts:
            raise StarctlError(f"{d}: no {split} parts")
        loaded = [load_file(str(p)) for p in parts]
        index = torch.cat([x["index"] for x in loaded])
        order = index.argsort()
        n = meta["counts"][split]
        if not torch.equal(index[order], torch.arange(n)):
            raise StarctlError(f"{d}: the {split} parts do not cover chunks 0..{n - 1} exactly once")
        tokens = torch.cat([x["tokens"] for x in loaded])[order]
        stop = torch.cat([x["stop"] for x in loaded])[order]
        emb = torch.cat([x["embeddings"] for x in loaded])[order]
        rows = tokens.tolist()
        stops = stop.tolist()
        out.append(PlanExamples([r[:s] for r, s in zip(rows, stops)], [r[s:] for r, s in zip(rows, stops)], emb))
    return out[0], out[1]
