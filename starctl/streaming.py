"""Streaming corpora: documents read lazily with `datasets` (streaming=True), cut into chunks on
the fly, in a deterministic and resumable order.

A streamed source is one of
  * a `datasets` hub id (`"HuggingFaceFW/fineweb"`), split "train";
  * a local `.jsonl` / `.json` / `.parquet` / `.csv` file, or a glob of such shards
    (`"/data/shards/*.parquet"`), read with the matching `datasets` builder;
  * a dict with `path` (either of the above) and optional `name` (the hub config, e.g.
    "sample-10BT"), `split`, `data_files`, `text_col`.

Order. Sources are interleaved document by document (round robin; an exhausted source drops
out; when all are exhausted the stream starts again: a new epoch). Documents go to the
held-out side when their hash (`corpora.split_documents`' key) falls below `heldout_fraction`,
so the split needs no count of the corpus. Training documents are tokenised and cut into
`chunk_tokens` chunks (ragged tails dropped, as in memory) and the chunks are shuffled inside
WINDOWS of at least `window` chunks (whole documents per window; permutation seeded by
(seed, window number)), so neighbouring chunks of one document rarely share a batch.
Chunk number g (its position in that shuffled stream) has a stop point drawn from a generator
seeded by (seed, g), so a chunk's prefix/continuation split does not depend on how it was
reached.

Resuming. `ChunkStream.state_dict()` is the state of the documents at the start of the current
window (`datasets`' own `IterableDataset.state_dict()` per source) plus the window's number
and first position: loading it rebuilds that window exactly and reading continues from there,
without re-reading the corpus before it. (A `datasets` shuffle buffer would break that
exactness, so sources are not shuffled by `datasets`; the window shuffle replaces it.)

Data-parallel training reads the SAME stream on every process (tokenising is cheap next to a
training step) and each process takes its slice of every global batch; only the slice is
encoded (see training.Trainer).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import torch

from .errors import StarctlError

STREAM_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def source_spec(source: str | dict, text_col: str = "text") -> dict:
    """Normalise a streamed source to {path, name, split, data_files, text_col}."""
    if isinstance(source, dict):
        unknown = set(source) - {"path", "name", "split", "data_files", "text_col"}
        if unknown or "path" not in source:
            raise StarctlError(f"a streamed source dict needs 'path' and may have name, split, data_files, "
                               f"text_col; got {sorted(source)}")
        spec = {"name": None, "split": "train", "data_files": None, "text_col": text_col, **source}
    else:
        spec = {"path": str(source), "name": None, "split": "train", "data_files": None, "text_col": text_col}
    return spec


def open_stream(source: str | dict, text_col: str = "text"):
    """A `datasets.IterableDataset` over a streamed source (see the module docstring)."""
    import datasets

    spec = source_spec(source, text_col)
    path = spec["path"]
    suffix = Path(path.replace("*", "x")).suffix.lower()
    local = Path(path).expanduser()
    is_glob = any(ch in path for ch in "*?[")
    kwargs: dict[str, Any] = {"split": spec["split"], "streaming": True}
    if spec["data_files"] is None and (local.is_file() or is_glob or suffix in STREAM_SUFFIXES):
        if suffix not in STREAM_SUFFIXES:
            raise StarctlError(f"{path}: streamed files must be {', '.join(STREAM_SUFFIXES)}")
        if not is_glob and not local.is_file():
            raise StarctlError(f"streamed file '{path}' does not exist")
        files = str(local) if not is_glob else path
        builder, kwargs["data_files"] = STREAM_SUFFIXES[suffix], files
    else:
        from .assets import hub_offline_reason

        builder = path
        if spec["name"] is not None:
            kwargs["name"] = spec["name"]
        if spec["data_files"] is not None:
            kwargs["data_files"] = spec["data_files"]
        reason = hub_offline_reason()  # streaming reads the hub as it goes: no cached copy helps
        if reason is not None:
            raise StarctlError(f"cannot stream hub dataset '{path}': {reason} (download its files and give "
                               "a local path or glob instead)")
    try:
        return datasets.load_dataset(builder, **kwargs)
    except Exception as e:  # hub errors, missing configs, unreadable shards
        from .assets import first_line

        raise StarctlError(f"cannot stream '{path}': {first_line(e)}") from e


def stream_rows(source: str | dict, columns: list[str]):
    """Yield dicts {column: value as str} of a streamed source; ClassLabel ints become names."""
    import datasets

    from .corpora import _cell

    ds = open_stream(source, columns[0])
    features = getattr(ds, "features", None) or {}
    missing = [c for c in columns if features and c not in features]
    if missing:
        raise StarctlError(f"streamed source '{source_spec(source)['path']}': no column "
                           f"{', '.join(repr(c) for c in missing)} (columns: {', '.join(features)})")
    for row in ds:
        out = {}
        for c in columns:
            if c not in row:
                raise StarctlError(f"streamed source '{source_spec(source)['path']}': a row has no column {c!r}")
            v, f = row[c], features.get(c)
            if isinstance(f, datasets.ClassLabel) and isinstance(v, int):
                v = f.int2str(v) if v >= 0 else None
            out[c] = _cell(v)
        yield out


class DocumentStream:
    """Texts of several streamed sources, interleaved one document at a time; resumable."""

    def __init__(self, sources: list, text_col: str = "text", state: dict | None = None):
        if not sources:
            raise StarctlError("no data sources")
        self.sources = list(sources)
        self.text_col = text_col
        self.load_state_dict(state)

    def _open(self) -> None:
        self.datasets = [open_stream(s, self.text_col) for s in self.sources]
        self.cols = [source_spec(s, self.text_col)["text_col"] for s in self.sources]
        self.iters = [iter(ds) for ds in self.datasets]
        # datasets reports a loaded state only once the first example is read: keep it until then
        self.loaded: list[dict | None] = [None] * len(self.sources)

    def load_state_dict(self, state: dict | None) -> None:
        self._open()
        self.epoch, self.turn, self.done = 0, 0, [False] * len(self.sources)
        if state:
            if len(state["sources"]) != len(self.sources):
                raise StarctlError("the stream state was saved for another list of sources")
            self.epoch, self.turn, self.done = state["epoch"], state["turn"], list(state["done"])
            for i, (ds, st) in enumerate(zip(self.datasets, state["sources"])):
                ds.load_state_dict(copy.deepcopy(st))
                self.loaded[i] = copy.deepcopy(st)
            self.iters = [iter(ds) for ds in self.datasets]

    def state_dict(self) -> dict:
        states = [copy.deepcopy(self.loaded[i] if self.loaded[i] is not None else ds.state_dict())
                  for i, ds in enumerate(self.datasets)]
        return {"epoch": self.epoch, "turn": self.turn, "done": list(self.done), "sources": states}

    def __iter__(self):
        return self

    def __next__(self) -> str:
        n = len(self.sources)
        reopened = False
        while True:
            if all(self.done):  # every source exhausted: a new epoch
                if reopened:
                    raise StarctlError("the streamed sources hold no documents")
                self._open()
                self.epoch, self.turn, self.done = self.epoch + 1, 0, [False] * n
                reopened = True
            i = self.turn
            self.turn = (i + 1) % n
            if self.done[i]:
                continue
            try:
                row = next(self.iters[i])
            except StopIteration:
                self.done[i] = True
                continue
            finally:
                self.loaded[i] = None
            col = self.cols[i]
            if col not in row:
                raise StarctlError(f"streamed source '{source_spec(self.sources[i])['path']}' has no column "
                                   f"'{col}' (columns: {', '.join(row)})")
            text = row[col]
            if isinstance(text, str) and text.strip():
                return text


def is_heldout(text: str, fraction: float, seed: int) -> bool:
    """The document-level held-out rule of streams: hash(seed, text) below `fraction`."""
    from .corpora import _split_key

    return int.from_bytes(_split_key(seed, text)[:8], "big") < fraction * 2 ** 64


class ChunkStream:
    """Chunks of one side (train or held-out) of a document stream, by global position.

    `get(position)` -> (prefix ids, continuation ids) of chunk number `position`. Positions are
    read forwards; asking for one before the current window restarts from the beginning.
    """

    def __init__(self, sources: list, tokenizer, *, chunk_tokens: int, min_prefix_tokens: int,
                 min_cont_tokens: int, seed: int, heldout_fraction: float, side: str = "train",
                 window: int = 4096, text_col: str = "text"):
        if side not in ("train", "heldout"):
            raise ValueError(side)
        if chunk_tokens < min_prefix_tokens + min_cont_tokens:
            raise StarctlError(f"chunk_tokens={chunk_tokens} is shorter than min_prefix_tokens + min_cont_tokens")
        self.sources, self.text_col = sources, text_col
        self.tokenizer = tokenizer
        self.chunk_tokens, self.min_prefix, self.min_cont = chunk_tokens, min_prefix_tokens, min_cont_tokens
        self.seed, self.fraction, self.side, self.window_size = seed, heldout_fraction, side, max(1, window)
        self.docs = DocumentStream(sources, text_col)
        self._start(index=0, start=0)

    def _start(self, index: int, start: int) -> None:
        self.window_index, self.next_start = index, start
        self.window = torch.zeros(0, self.chunk_tokens, dtype=torch.int32)
        self.window_start = start
        self.window_state = {"window": index, "start": start, "docs": self.docs.state_dict()}

    def state_dict(self) -> dict:
        """Enough to rebuild the current window (JSON-serialisable)."""
        return copy.deepcopy(self.window_state)

    def load_state_dict(self, state: dict) -> None:
        self.docs.load_state_dict(state["docs"])
        self._start(state["window"], state["start"])

    def _fill(self) -> None:
        self.window_state = {"window": self.window_index, "start": self.next_start, "docs": self.docs.state_dict()}
        chunks: list[list[int]] = []
        want_heldout = self.side == "heldout"
        useful_epoch = self.docs.epoch  # the epoch of the last document that gave chunks
        while len(chunks) < self.window_size:
            text = next(self.docs)
            got = []
            if is_heldout(text, self.fraction, self.seed) == want_heldout:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                got = [ids[s:s + self.chunk_tokens] for s in range(0, len(ids) - self.chunk_tokens + 1, self.chunk_tokens)]
            if got:
                chunks.extend(got)
                useful_epoch = self.docs.epoch
            elif self.docs.epoch >= useful_epoch + 2:  # a whole pass over the corpus gave nothing
                raise StarctlError(f"no {'held-out' if want_heldout else 'training'} document of the stream "
                                   f"is {self.chunk_tokens} tokens long (heldout_fraction {self.fraction})")
        order = list(range(len(chunks)))
        random.Random(f"{self.seed}:window:{self.side}:{self.window_index}").shuffle(order)
        # (n, chunk_tokens) int32: a window of 64k chunks of 128 tokens takes 32 MB, not 300 MB of lists
        self.window = torch.tensor([chunks[i] for i in order], dtype=torch.int32)
        self.window_start = self.next_start
        self.next_start += len(chunks)
        self.window_index += 1

    def get(self, position: int) -> tuple[list[int], list[int]]:
        if position < self.window_start:
            self.docs.load_state_dict(None)
            self._start(0, 0)
        while position >= self.window_start + len(self.window):
            self._fill()
        chunk = self.window[position - self.window_start].tolist()
        s = random.Random(f"{self.seed}:stop:{self.side}:{position}").randint(
            self.min_prefix, len(chunk) - self.min_cont)
        return chunk[:s], chunk[s:]

    def take(self, start: int, count: int) -> tuple[list[list[int]], list[list[int]]]:
        pairs = [self.get(p) for p in range(start, start + count)]
        return [p for p, _ in pairs], [c for _, c in pairs]
