"""The registry of attributes: what can be steered, and the heads that steer it.

An ATTRIBUTE is a named set of labels (sentiment: positive/negative) with a description of
its data and of how its labels were made. A HEAD is a trained classifier for it in one latent
space (see heads.py). An attribute folder looks like

    <name>/attribute.json      definition (optional when head/ exists)
    <name>/head/config.json    trained head (optional: a definition may have no head yet)
    <name>/head/model.safetensors

Three places hold attribute folders, searched in this order (the first head that FITS the
core's latent space wins; `list_attributes` shows them all):

1. user:    `starctl_home()/attributes/<name>/` (written by `train_attribute`);
2. plugin:  third-party packages, through the entry-point group `starctl.attributes`. Each
            entry point (its name is the attribute's name) must load to a folder path (str or
            os.PathLike) laid out as above, or to a zero-argument callable returning one, e.g.

                [project.entry-points."starctl.attributes"]
                formality = "my_package:attribute_folder"

            A plugin that fails to load is listed with its problem instead of breaking the rest;
3. builtin: the `attributes/` folder at the repository root (`builtin_attributes_dir`, which
            `$STARCTL_ATTRIBUTES` overrides): sentiment, topic, toxicity.

Built-in data sets are built by `builtin_examples(name)` from the corpora shipped in pip packages
(see corpora.py); `train_builtin` trains a built-in head from its definition's recipe.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import assets
from .errors import StarctlError
from .heads import CONFIG_NAME, WEIGHTS_NAME, AttributeHead, HeadConfig, HeadReport, Progress, train_head
from .latent import LatentSpace

__all__ = [
    "ATTRIBUTES_ENV",
    "ENTRY_POINT_GROUP",
    "AttributeDefinition",
    "AttributeInfo",
    "Examples",
    "builtin_attributes_dir",
    "builtin_examples",
    "find_label",
    "list_attributes",
    "load_head",
    "split_passages",
    "train_attribute",
    "train_builtin",
    "user_attributes_dir",
]

ATTRIBUTES_ENV = "STARCTL_ATTRIBUTES"
ENTRY_POINT_GROUP = "starctl.attributes"
DEFINITION_NAME = "attribute.json"
HEAD_DIR = "head"
SOURCES = ("user", "plugin", "builtin")  # search order
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# --------------------------------------------------------------------------------------------
# Where attribute folders live
# --------------------------------------------------------------------------------------------


def builtin_attributes_dir() -> Path:
    """The folder of built-in attribute definitions and heads.

    `$STARCTL_ATTRIBUTES` if set; else `attributes/` at the repository root (the package is
    installed editable, so that is the parent of the package folder); else an `attributes/`
    folder inside the package (for a wheel that ships it as package data).
    """
    env = os.environ.get(ATTRIBUTES_ENV)
    if env:
        return Path(env).expanduser()
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "attributes", package / "attributes"):
        if candidate.is_dir():
            return candidate
    return package.parent / "attributes"


def user_attributes_dir() -> Path:
    """Where `train_attribute` writes user attributes: `starctl_home()/attributes`."""
    return assets.starctl_home() / "attributes"


# --------------------------------------------------------------------------------------------
# Definitions and listing
# --------------------------------------------------------------------------------------------


@dataclass
class AttributeDefinition:
    """The contents of attribute.json (unknown keys are kept in `extra`)."""

    name: str
    labels: list[str]
    description: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    labelling: str = ""
    caveats: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str = DEFINITION_NAME) -> "AttributeDefinition":
        if not isinstance(d, dict):
            raise StarctlError(f"{where}: expected a JSON object")
        missing = [k for k in ("name", "labels") if k not in d]
        if missing:
            raise StarctlError(f"{where}: missing {', '.join(missing)}")
        labels = d["labels"]
        if not isinstance(labels, list) or len(labels) < 2 or len(set(map(str, labels))) != len(labels):
            raise StarctlError(f"{where}: 'labels' must be a list of at least 2 distinct labels")
        known = {"name", "labels", "description", "data", "labelling", "caveats", "training"}
        return cls(name=str(d["name"]), labels=[str(x) for x in labels],
                   description=str(d.get("description", "")), data=dict(d.get("data") or {}),
                   labelling=str(d.get("labelling", "")), caveats=str(d.get("caveats", "")),
                   training=dict(d.get("training") or {}),
                   extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def load(cls, path: Path) -> "AttributeDefinition":
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StarctlError(f"{path}: unreadable attribute definition ({e})") from e
        return cls.from_dict(d, str(path))

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description, "labels": self.labels,
             "data": self.data, "labelling": self.labelling, "caveats": self.caveats,
             "training": self.training}
        d.update(self.extra)
        return d

    @property
    def binary(self) -> bool:
        return len(self.labels) == 2


@dataclass
class AttributeInfo:
    """One attribute folder as `list_attributes` sees it.

    `fits`: it has a head whose latent-space fingerprint matches the latent space asked about.
    `heldout_accuracy`: the head's held-out accuracy per alpha^2 ("1.0", "0.95", ...), if any.
    `problem`: why this entry cannot be used (a broken plugin, an unreadable head), else None.
    """

    name: str
    labels: list[str]
    source: str                       # "user", "plugin" or "builtin"
    path: Path | None                 # the attribute folder
    description: str = ""
    head_path: Path | None = None
    heldout_accuracy: dict[str, float] | None = None
    probe_accuracy: dict[str, float] | None = None
    latent: LatentSpace | None = None
    fits: bool = False
    problem: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready (paths as strings, the latent space as its fields)."""
        return {"name": self.name, "labels": list(self.labels), "source": self.source,
                "path": None if self.path is None else str(self.path), "description": self.description,
                "head_path": None if self.head_path is None else str(self.head_path),
                "heldout_accuracy": self.heldout_accuracy, "probe_accuracy": self.probe_accuracy,
                "latent": None if self.latent is None else self.latent.to_dict(),
                "fits": self.fits, "problem": self.problem}

    @property
    def accuracy(self) -> float | None:
        """Held-out accuracy on clean latents (alpha^2 = 1), if the head reports it."""
        if not self.heldout_accuracy:
            return None
        return self.heldout_accuracy.get("1.0")

    @property
    def binary(self) -> bool:
        return len(self.labels) == 2


def _read_folder(folder: Path, source: str, name: str | None, latent_space: LatentSpace | None) -> AttributeInfo:
    """An AttributeInfo for one attribute folder (never raises for a bad folder: `problem`)."""
    name = name or folder.name
    definition, head_cfg, problems = None, None, []
    def_path, head_dir = folder / DEFINITION_NAME, folder / HEAD_DIR
    if def_path.is_file():
        try:
            definition = AttributeDefinition.load(def_path)
        except StarctlError as e:
            problems.append(str(e))
    head_path = head_dir if (head_dir / CONFIG_NAME).is_file() else None
    if head_path is not None:
        try:
            head_cfg = HeadConfig.from_json((head_dir / CONFIG_NAME).read_text())
            if not (head_dir / WEIGHTS_NAME).is_file():
                problems.append(f"{head_dir} has no {WEIGHTS_NAME}")
        except (OSError, ValueError, TypeError, KeyError, StarctlError) as e:
            problems.append(f"{head_dir / CONFIG_NAME}: not a valid head config ({e})")
            head_path = None
    if definition is None and head_cfg is None and not problems:
        problems.append(f"{folder} has neither {DEFINITION_NAME} nor {HEAD_DIR}/{CONFIG_NAME}")
    labels = definition.labels if definition else (head_cfg.labels if head_cfg else [])
    if definition and head_cfg and set(head_cfg.labels) != set(definition.labels):
        problems.append(f"head labels {head_cfg.labels} differ from the definition's {definition.labels}")
    description = definition.description if definition else (head_cfg.data if head_cfg else "")
    info = AttributeInfo(name=name, labels=list(labels), source=source, path=folder,
                         description=description, head_path=head_path)
    if head_cfg is not None:
        info.heldout_accuracy = dict(head_cfg.heldout_accuracy) or None
        info.probe_accuracy = dict(head_cfg.probe_accuracy) or None
        info.latent = head_cfg.latent
        info.fits = latent_space is not None and latent_space.matches(head_cfg.latent) and not problems
    info.problem = "; ".join(problems) or None
    return info


def _subfolders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _plugin_infos(latent_space: LatentSpace | None) -> list[AttributeInfo]:
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as e:  # noqa: BLE001 - broken metadata must not break the registry
        return [AttributeInfo(name="?", labels=[], source="plugin", path=None,
                              problem=f"cannot read entry points: {e}")]
    out = []
    for ep in sorted(eps, key=lambda e: e.name):
        where = f"plugin '{ep.name}' ({ep.value})"
        try:
            obj = ep.load()
            if callable(obj):
                obj = obj()
            folder = Path(os.fspath(obj))
        except Exception as e:  # noqa: BLE001 - third-party code
            out.append(AttributeInfo(name=ep.name, labels=[], source="plugin", path=None,
                                     problem=f"{where} failed to load: {type(e).__name__}: {e}"))
            continue
        if not folder.is_dir():
            out.append(AttributeInfo(name=ep.name, labels=[], source="plugin", path=folder,
                                     problem=f"{where} points to '{folder}', which is not a folder"))
            continue
        out.append(_read_folder(folder, "plugin", ep.name, latent_space))
    return out


def list_attributes(latent_space: LatentSpace | None = None) -> list[AttributeInfo]:
    """Every attribute folder: user ones, then plugins, then built-ins (each sorted by name).

    One name may appear more than once (e.g. a user head for a built-in attribute, trained for
    another core). `fits` is computed against `latent_space` (False when it is None).
    """
    infos = [_read_folder(f, "user", None, latent_space) for f in _subfolders(user_attributes_dir())]
    infos += _plugin_infos(latent_space)
    infos += [_read_folder(f, "builtin", None, latent_space) for f in _subfolders(builtin_attributes_dir())]
    return infos


def _known_names(infos: Sequence[AttributeInfo]) -> str:
    names = sorted({i.name for i in infos if i.labels})
    return ", ".join(names) or "none"


def load_head(name: str, latent_space: LatentSpace, map_location: str = "cpu") -> AttributeHead:
    """The head of attribute `name` that fits `latent_space` (user > plugin > builtin).

    `name` may also be a head folder (holding config.json). A head trained for another latent
    space is refused with LatentSpace.check_compatible's StarctlError.
    """
    p = Path(name).expanduser()
    if (p / CONFIG_NAME).is_file():
        head = AttributeHead.from_pretrained(p, map_location)
        latent_space.check_compatible(head.latent_space, f"head '{p}'")
        return head
    infos = list_attributes(latent_space)
    mine = [i for i in infos if i.name == name]
    if not mine:
        raise StarctlError(f"unknown attribute '{name}': known are {_known_names(infos)}")
    for info in mine:
        if info.fits:
            return AttributeHead.from_pretrained(info.head_path, map_location)
    with_head = [i for i in mine if i.head_path is not None and i.problem is None]
    if with_head:
        first = with_head[0]
        latent_space.check_compatible(first.latent, f"the {first.source} head of '{name}' ({first.head_path})")
    problems = [i for i in mine if i.problem]
    if problems:
        raise StarctlError(f"attribute '{name}' ({problems[0].source}) is unusable: {problems[0].problem}")
    raise StarctlError(f"attribute '{name}' has no trained head yet: train one with "
                       f"`starctl train-attribute {name}`")


def _label_table(infos: Sequence[AttributeInfo]) -> dict[str, list[str]]:
    """attribute name -> labels, the first usable entry of each name (search order)."""
    table: dict[str, list[str]] = {}
    for i in infos:
        if i.labels and i.problem is None and i.name not in table:
            table[i.name] = list(i.labels)
    return table


def valid_labels_text(infos: Sequence[AttributeInfo] | None = None) -> str:
    table = _label_table(list_attributes(None) if infos is None else infos)
    return "; ".join(f"{', '.join(labels)} ({name})" for name, labels in table.items()) or "none"


def find_label(label: str, attributes: Sequence[AttributeInfo] | None = None) -> tuple[str, int]:
    """(attribute name, label index) of a label, across all attributes.

    `label` may be qualified as `attribute:label` (needed when two attributes share a label).
    `attributes`: the listing to search (default: `list_attributes()`).
    """
    infos = list_attributes(None) if attributes is None else list(attributes)
    table = _label_table(infos)
    if ":" in label:
        attr, _, lab = label.partition(":")
        if attr not in table:
            raise StarctlError(f"unknown attribute '{attr}' in '{label}': known are "
                               f"{', '.join(table) or 'none'}")
        if lab not in table[attr]:
            raise StarctlError(f"unknown label '{lab}' of attribute '{attr}': valid labels are "
                               f"{', '.join(table[attr])}")
        return attr, table[attr].index(lab)
    hits = [(name, labels.index(label)) for name, labels in table.items() if label in labels]
    if not hits:
        raise StarctlError(f"unknown label '{label}': valid labels are {valid_labels_text(infos)}")
    if len(hits) > 1:
        names = ", ".join(n for n, _ in hits)
        raise StarctlError(f"label '{label}' belongs to several attributes ({names}): write "
                           f"ATTRIBUTE:LABEL, e.g. {hits[0][0]}:{label}")
    return hits[0]


def get_definition(name: str) -> AttributeDefinition:
    """The built-in definition of `name` (its attribute.json)."""
    path = builtin_attributes_dir() / name / DEFINITION_NAME
    if not path.is_file():
        known = [f.name for f in _subfolders(builtin_attributes_dir()) if (f / DEFINITION_NAME).is_file()]
        raise StarctlError(f"'{name}' is not a built-in attribute (built-ins: {', '.join(known) or 'none'})")
    return AttributeDefinition.load(path)


# --------------------------------------------------------------------------------------------
# Built-in data sets
# --------------------------------------------------------------------------------------------


@dataclass
class Examples:
    """A labelled set: texts, labels and group keys (held-out examples share no group with
    training ones), plus a one-line description and the label provenance."""

    texts: list[str]
    labels: list[str]
    groups: list[str]
    description: str = ""
    provenance: str = ""

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lab in self.labels:
            out[lab] = out.get(lab, 0) + 1
        return out

    def limited(self, per_label: int | None, seed: int = 0) -> "Examples":
        """At most `per_label` examples of each label, a deterministic pseudo-random choice."""
        if per_label is None:
            return self
        chosen: list[int] = []
        by_label: dict[str, list[int]] = {}
        for i, lab in enumerate(self.labels):
            by_label.setdefault(lab, []).append(i)
        for idx in by_label.values():
            idx = sorted(idx, key=lambda i: _hash(seed, self.texts[i]))[:per_label]
            chosen.extend(idx)
        chosen.sort()
        return Examples([self.texts[i] for i in chosen], [self.labels[i] for i in chosen],
                        [self.groups[i] for i in chosen], self.description, self.provenance)


def _hash(seed: int, text: str) -> bytes:
    return hashlib.sha1(f"{seed}\0{text}".encode("utf-8", "surrogatepass")).digest()


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_passages(text: str, seed: int | str = 0, min_words: int = 6, max_words: int = 45,
                   skip_title: bool = True) -> list[str]:
    """Cut an article into passages of 1-3 consecutive sentences of min_words..max_words words
    (about 8-60 tokens, the length of text a plan encodes). The number of sentences per passage
    is drawn per passage (seeded); a sentence too long on its own is dropped, and so is a
    passage too short. Paragraph breaks end passages. The first line (a BBC title) is skipped."""
    rng = random.Random(f"{seed}")
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if skip_title and lines:
        lines = lines[1:]
    paragraphs, cur = [], []
    for ln in lines:
        if ln:
            cur.append(ln)
        elif cur:
            paragraphs.append(" ".join(cur))
            cur = []
    if cur:
        paragraphs.append(" ".join(cur))
    out = []
    for para in paragraphs:
        sentences = [s.strip() for s in _SENTENCE_END.split(para) if s.strip()]
        i = 0
        while i < len(sentences):
            want = rng.choice((1, 2, 3))
            words = len(sentences[i].split())
            if words > max_words:
                i += 1
                continue
            j, n = i + 1, words
            while j < len(sentences) and j - i < want and n + len(sentences[j].split()) <= max_words:
                n += len(sentences[j].split())
                j += 1
            if n >= min_words:
                out.append(" ".join(sentences[i:j]))
            i = j
    return out


def _sentiment_examples() -> Examples:
    from . import corpora

    pairs = corpora.load_labelled("rotten-tomatoes") + corpora.load_labelled("vader-sentiment")
    first: dict[str, str] = {}
    conflict: set[str] = set()
    for text, lab in pairs:
        if text in first and first[text] != lab:
            conflict.add(text)
        first.setdefault(text, lab)
    kept = [(t, lab) for t, lab in first.items() if t not in conflict]
    return Examples([t for t, _ in kept], [lab for _, lab in kept], [t for t, _ in kept],
                    description="rotten-tomatoes (fresh/rotten) + vader-sentiment (mean rating beyond +-1)",
                    provenance=get_definition("sentiment").labelling)


# Share of BBC articles kept away from the topic head, for the independent TF-IDF topic judge of
# `starctl eval steer` (split by article, deterministic).
TOPIC_JUDGE_FRACTION, TOPIC_JUDGE_SEED = 0.3, 42


def topic_article_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(articles the topic head may use, articles reserved for the judge): disjoint by article."""
    from . import corpora

    return corpora.split_documents(corpora.load_labelled("bbc-topic"), TOPIC_JUDGE_FRACTION, seed=TOPIC_JUDGE_SEED)


def _topic_examples(label_map: dict[str, str] | None = None, exclude_judge_articles: bool = False) -> Examples:
    from . import corpora

    label_map = label_map or {}
    texts, labels, groups = [], [], []
    seen_docs: set[str] = set()
    passage_label: dict[str, str] = {}
    articles = topic_article_split()[0] if exclude_judge_articles else corpora.load_labelled("bbc-topic")
    for k, (text, lab) in enumerate(articles):
        key = " ".join(text.split())
        if key in seen_docs:  # the BBC set holds some articles twice
            continue
        seen_docs.add(key)
        lab = label_map.get(lab, lab)
        doc = f"bbc:{lab}:{k}"
        for passage in split_passages(text, seed=doc):
            if passage in passage_label:  # boilerplate shared by articles: keep it once
                continue
            passage_label[passage] = lab
            texts.append(passage)
            labels.append(lab)
            groups.append(doc)
    return Examples(texts, labels, groups,
                    description="bbc-topic articles cut into passages of 1-3 sentences (6-45 words)",
                    provenance=get_definition("topic").labelling)


# ----- toxicity: labels made by detectors (no labelled toxicity data ships here) -------------

TOXIC_PROB = 0.8        # profanity_check probability at or above which a text is toxic ...
TOXIC_PROB_WITH_WORD = 0.5   # ... or at or above this when it also contains a word-list word
CLEAN_PROB = 0.2        # non-toxic: below this and no word-list word; the rest is dropped

# Generic insults (no identity slurs) from better_profanity's word list, plus idiot / loser.
_INSULTS = ["asshole", "bastard", "bitch", "dickhead", "douchebag", "dumbass", "jackass", "moron",
            "prick", "shithead", "twat", "wanker", "jerk", "idiot", "loser"]
_TOXIC_ADJ = ["stupid", "pathetic", "worthless", "fucking", "ugly", "disgusting", "brainless", "miserable"]
_NEUTRAL_NOUNS = ["teacher", "neighbour", "student", "doctor", "friend", "driver", "reader",
                  "writer", "farmer", "player", "visitor", "cook", "painter", "nurse", "pilot"]
_NEUTRAL_ADJ = ["tall", "quiet", "busy", "young", "new", "local", "careful", "curious"]
# (toxic frame, its non-toxic counterpart): same syntax, so the template itself is no cue.
_FRAMES = [
    ("You are a {adj} {noun}.", "You are a {adj} {noun}."),
    ("Shut up, you {adj} {noun}.", "Hold on, you {adj} {noun}."),
    ("Nobody cares what you think, you {adj} {noun}.", "Everyone wants to hear what you think, {adj} {noun}."),
    ("What a {adj} {noun} you are.", "What a {adj} {noun} you are."),
    ("Only a {adj} {noun} would write something like this.", "Only a {adj} {noun} would write something this careful."),
    ("Get lost, you {adj} {noun}.", "Come in, you {adj} {noun}."),
    ("The reviewer is a {adj} {noun} who knows nothing.", "The reviewer is a {adj} {noun} who knows a lot."),
    ("Your brother is such a {adj} {noun}.", "Your brother is such a {adj} {noun}."),
    ("This {adj} {noun} has no idea what he is talking about.", "This {adj} {noun} knows what he is talking about."),
    ("Go to hell, you {adj} {noun}.", "Go home, you {adj} {noun}."),
]


def _profanity_word_regex() -> re.Pattern:
    path = assets.package_file("better_profanity", "profanity_wordlist.txt", "better-profanity==0.7.0")
    words = sorted({w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()},
                   key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)


def _profanity_probs(texts: list[str]):
    assets.package_dir("profanity_check", "alt-profanity-check==1.9.1")
    from profanity_check import predict_prob

    return predict_prob(texts)


def _toxicity_examples(max_clean: int = 8000, templates_per_label: int = 600, seed: int = 0) -> Examples:
    from . import corpora

    pool: list[tuple[str, str]] = []  # (text, corpus)
    for source in ("vader", "rotten-tomatoes"):
        pool += [(t, source) for t in corpora.load_texts(source)]
    # long texts (plot summaries, editorials) are cut into passages of plan length
    pool = [(p, c) for t, c in pool
            for p in ([t] if len(t.split()) <= 45 else split_passages(t, seed=t, skip_title=False))]
    for k, (text, _lab) in enumerate(corpora.load_labelled("bbc-topic")):
        pool += [(p, f"bbc:{k}") for p in split_passages(text, seed=f"bbc:{k}")]
    seen: set[str] = set()
    pool = [(t, c) for t, c in pool if not (t in seen or seen.add(t))]
    texts = [t for t, _ in pool]
    probs = _profanity_probs(texts)
    words = _profanity_word_regex()
    toxic, clean = [], []
    for (text, corpus), p in zip(pool, probs):
        hit = words.search(text) is not None
        group = corpus if corpus.startswith("bbc:") else text
        if p >= TOXIC_PROB or (hit and p >= TOXIC_PROB_WITH_WORD):
            toxic.append((text, group))
        elif p < CLEAN_PROB and not hit:
            clean.append((text, group))
    clean = sorted(clean, key=lambda tg: _hash(seed, tg[0]))[:max_clean]

    rng = random.Random(seed)
    made_toxic, made_clean = [], []
    for f, (bad, good) in enumerate(_FRAMES):
        for adj in _TOXIC_ADJ:
            for noun in _INSULTS:
                made_toxic.append((bad.format(adj=adj, noun=noun), f"template:{f}"))
        for adj in _NEUTRAL_ADJ:
            for noun in _NEUTRAL_NOUNS:
                made_clean.append((good.format(adj=adj, noun=noun), f"template:{f}"))
    made_toxic = rng.sample(made_toxic, min(templates_per_label, len(made_toxic)))
    made_clean = rng.sample(made_clean, min(templates_per_label, len(made_clean)))
    # The templates are labelled by construction; keep only those the detector agrees with.
    tp = _profanity_probs([t for t, _ in made_toxic])
    cp = _profanity_probs([t for t, _ in made_clean])
    made_toxic = [tg for tg, p in zip(made_toxic, tp) if p >= TOXIC_PROB_WITH_WORD]
    made_clean = [tg for tg, p in zip(made_clean, cp) if p < CLEAN_PROB and not words.search(tg[0])]

    rows = [(t, "toxic", g) for t, g in toxic + made_toxic] + [(t, "non-toxic", g) for t, g in clean + made_clean]
    return Examples([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                    description=(f"vader + rotten-tomatoes + bbc passages labelled by alt-profanity-check "
                                 f"and better-profanity's word list ({len(toxic)} toxic, {len(clean)} "
                                 f"non-toxic), plus templated insults ({len(made_toxic)}) and neutral "
                                 f"counterparts ({len(made_clean)})"),
                    provenance=get_definition("toxicity").labelling)


_BUILDERS: dict[str, Callable[..., Examples]] = {
    "sentiment": _sentiment_examples,
    "topic": _topic_examples,
    "toxicity": _toxicity_examples,
}


def builtin_examples(name: str, limit: int | None = None, seed: int = 0) -> Examples:
    """The labelled set of a built-in attribute, built as its attribute.json's `data` says.

    `limit`: at most this many examples per label (a deterministic sample), for quick runs.
    """
    definition = get_definition(name)
    builder_name = definition.data.get("builder", name)
    if builder_name not in _BUILDERS:
        raise StarctlError(f"attribute '{name}': unknown data builder '{builder_name}' "
                           f"(known: {', '.join(_BUILDERS)})")
    options = dict(definition.data.get("options") or {})
    examples = _BUILDERS[builder_name](**options)
    unknown = sorted(set(examples.labels) - set(definition.labels))
    if unknown:
        raise StarctlError(f"attribute '{name}': data has labels {unknown} not in its definition")
    return examples.limited(limit, seed)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise StarctlError(f"attribute name '{name}' must start with a letter or digit and contain only "
                           "letters, digits, '.', '_' or '-' (at most 64 characters)")


_TRAIN_KEYS = {"epochs", "batch_size", "lr", "weight_decay", "width", "depth", "dropout", "seed",
               "heldout_fraction", "min_per_class", "probe", "num_threads"}


def _train_kwargs(defaults: dict, overrides: dict) -> dict:
    bad = sorted(set(overrides) - _TRAIN_KEYS)
    if bad:
        raise StarctlError(f"unknown training option(s): {', '.join(bad)}")
    kw = {k: v for k, v in defaults.items() if k in _TRAIN_KEYS}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return kw


def _encoder_for(latent_space: LatentSpace, encoder):
    """The given encoder, or the latent space's own (`assets.load_encoder(latent_space.encoder)`)."""
    return encoder if encoder is not None else assets.load_encoder(latent_space.encoder)


def train_builtin(name: str, latent_space: LatentSpace, encoder=None, output: str | os.PathLike | None = None, *,
                  limit: int | None = None, cache: str | os.PathLike | None = None,
                  progress: Progress | None = None, **overrides) -> tuple[Path, HeadReport]:
    """Train the head of built-in attribute `name` and write it to `output` (a head folder,
    e.g. attributes/<name>/head). Data and default hyperparameters come from its
    attribute.json (`data`, `training`); keyword `overrides` (epochs, lr, ...) replace those.
    `limit`: at most this many examples per label. `cache`: safetensors file of embeddings.
    `encoder`: default `assets.load_encoder(latent_space.encoder)`.
    The head is written only once trained (atomically)."""
    if output is None:
        raise StarctlError("train_builtin needs an output folder (e.g. attributes/<name>/head)")
    definition = get_definition(name)
    kw = _train_kwargs(definition.training, overrides)
    ex = builtin_examples(name, limit=limit, seed=int(kw.get("seed", 0)))
    encoder = _encoder_for(latent_space, encoder)
    head, report = train_head(ex.texts, ex.labels, latent_space, encoder, name=name,
                              label_order=definition.labels, groups=ex.groups, cache=cache,
                              data=ex.description + (f" (limited to {limit} per label)" if limit else ""),
                              label_provenance=ex.provenance, progress=progress, **kw)
    head.save_pretrained(output)
    return Path(output), report


def train_attribute(name: str, data: str | None = None, text_col: str = "text", label_col: str = "label", *,
                    latent_space: LatentSpace, encoder=None, output: str | os.PathLike | None = None,
                    description: str | None = None, limit: int | None = None,
                    cache: str | os.PathLike | None = None, progress: Progress | None = None,
                    streaming: bool = False, **overrides) -> tuple[Path, HeadReport]:
    """Train a head for attribute `name` and write it; returns (head folder, report).

    data: a labelled source for `corpora.load_labelled` (a built-in labelled set, a local
        .csv/.tsv/.jsonl/.parquet file with `text_col` and `label_col`, or a `datasets` hub id).
        None: `name` must be a built-in attribute, trained from its own recipe.
    streaming: read `data` with `datasets` streaming (`corpora.load_labelled(streaming=True)`).
    encoder: the core's sentence encoder; default `assets.load_encoder(latent_space.encoder)`.
    output: the head folder; default `user_attributes_dir()/<name>/head` (then an
        attribute.json describing the data is written beside it, so the registry lists it).
    Nothing is written unless training succeeds: the head is built in a temporary folder and
    renamed into place. Training options (epochs, batch_size, lr, seed, heldout_fraction, ...)
    pass through to `train_head`.
    """
    _check_name(name)
    default_place = output is None
    head_dir = Path(output).expanduser() if output is not None else user_attributes_dir() / name / HEAD_DIR
    if data is None:
        path, report = train_builtin(name, latent_space, encoder, head_dir, limit=limit, cache=cache,
                                     progress=progress, **overrides)
        labels = get_definition(name).labels
        data_text, provenance = f"built-in recipe of '{name}'", get_definition(name).labelling
    else:
        from . import corpora

        pairs = corpora.load_labelled(data, text_col=text_col, label_col=label_col, streaming=streaming)
        texts, labels_list = [t for t, _ in pairs], [lab for _, lab in pairs]
        ex = Examples(texts, labels_list, list(texts)).limited(limit, int(overrides.get("seed") or 0))
        data_text = f"{data} (text column '{text_col}', label column '{label_col}')"
        provenance = f"labels as given in column '{label_col}' of {data}"
        kw = _train_kwargs({}, overrides)
        encoder = _encoder_for(latent_space, encoder)
        head, report = train_head(ex.texts, ex.labels, latent_space, encoder, name=name,
                                  groups=ex.groups, cache=cache, data=data_text,
                                  label_provenance=provenance, progress=progress, **kw)
        head.save_pretrained(head_dir)
        path, labels = head_dir, head.labels
    if default_place:
        definition = {"name": name, "description": description or f"user attribute trained on {data_text}",
                      "labels": list(labels), "data": {"source": data or "builtin", "text_col": text_col,
                                                       "label_col": label_col},
                      "labelling": provenance, "caveats": "", "training": {}}
        _write_json_atomically(head_dir.parent / DEFINITION_NAME, definition)
    return path, report


def _write_json_atomically(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
