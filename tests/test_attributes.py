"""Tests of starctl.attributes: the registry (built-in, user, plugin), label lookup, training
user attributes without leaving partial heads, and the built-in recipes' plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from starctl import attributes
from starctl.attributes import (AttributeDefinition, Examples, builtin_attributes_dir, find_label,
                                list_attributes, load_head, split_passages, train_attribute,
                                train_builtin, user_attributes_dir)
from starctl.errors import StarctlError
from starctl.heads import AttributeHead, HeadConfig
from starctl.latent import LatentSpace
from tiny import DOCS

REPO_ATTRIBUTES = Path(__file__).resolve().parent.parent / "attributes"
SPACE = LatentSpace("tiny", 16, 0.0, 0.25)
OTHER = LatentSpace("tiny", 16, 0.1, 0.25)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Empty user home, no plugins, one thread."""
    monkeypatch.setenv("STARCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STARCTL_ATTRIBUTES", raising=False)
    monkeypatch.setattr(attributes.importlib.metadata, "entry_points", lambda group=None: [])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_encoder_dir):
    from starctl.assets import load_encoder

    return load_encoder(str(tiny_encoder_dir))


def make_head(folder: Path, labels=("positive", "negative"), space=SPACE, name="sentiment", seed=0) -> Path:
    torch.manual_seed(seed)
    cfg = HeadConfig(name=name, labels=list(labels), latent=space, width=16, depth=1,
                     heldout_accuracy={"1.0": 0.875})
    return AttributeHead(cfg).save_pretrained(folder)


def write_definition(folder: Path, name: str, labels) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "attribute.json").write_text(json.dumps({"name": name, "labels": list(labels)}))
    return folder


class FakeEntryPoint:
    def __init__(self, name, obj):
        self.name, self.value, self._obj = name, f"fake_plugin:{name}", obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


# --- where things are ------------------------------------------------------------------------

def test_builtin_definitions_ship_with_the_repo():
    assert builtin_attributes_dir().resolve() == REPO_ATTRIBUTES
    infos = {i.name: i for i in list_attributes(SPACE) if i.source == "builtin"}
    assert infos["sentiment"].labels == ["positive", "negative"]
    assert infos["topic"].labels == ["business", "entertainment", "politics", "sport", "tech"]
    assert infos["toxicity"].labels == ["toxic", "non-toxic"]
    for info in infos.values():
        assert info.problem is None and info.path.parent == REPO_ATTRIBUTES
        d = AttributeDefinition.load(info.path / "attribute.json")
        assert d.description and d.labelling and d.data.get("builder") and d.training
    toxicity = AttributeDefinition.load(REPO_ATTRIBUTES / "toxicity" / "attribute.json")
    assert "not toxicity in general" in toxicity.caveats and "alt-profanity-check" in toxicity.labelling


def test_env_var_overrides_builtin_folder(tmp_path, monkeypatch):
    write_definition(tmp_path / "builtin" / "formality", "formality", ["formal", "casual"])
    monkeypatch.setenv("STARCTL_ATTRIBUTES", str(tmp_path / "builtin"))
    assert builtin_attributes_dir() == tmp_path / "builtin"
    assert [(i.name, i.source) for i in list_attributes(SPACE)] == [("formality", "builtin")]
    assert user_attributes_dir() == tmp_path / "home" / "attributes"


# --- listing and loading ---------------------------------------------------------------------

def test_registry_lists_builtins_and_a_user_head(tmp_path):
    make_head(user_attributes_dir() / "mood" / "head", labels=("happy", "sad"), name="mood")
    infos = list_attributes(SPACE)
    assert [i.source for i in infos][:1] == ["user"]
    mood = infos[0]
    assert (mood.name, mood.labels, mood.fits, mood.accuracy) == ("mood", ["happy", "sad"], True, 0.875)
    assert mood.head_path == user_attributes_dir() / "mood" / "head"
    assert {i.name for i in infos if i.source == "builtin"} >= {"sentiment", "topic", "toxicity"}
    assert not list_attributes(OTHER)[0].fits
    assert not list_attributes(None)[0].fits
    head = load_head("mood", SPACE)
    assert head.labels == ["happy", "sad"] and not head.training


def test_load_head_refuses_a_mismatched_fingerprint():
    make_head(user_attributes_dir() / "mood" / "head", labels=("happy", "sad"), name="mood")
    with pytest.raises(StarctlError, match="another latent space") as e:
        load_head("mood", OTHER)
    assert "\n" not in str(e.value)
    folder = user_attributes_dir() / "mood" / "head"
    with pytest.raises(StarctlError, match="another latent space"):
        load_head(str(folder), OTHER)
    assert load_head(str(folder), SPACE).labels == ["happy", "sad"]


def test_load_head_errors_for_unknown_and_untrained(tmp_path, monkeypatch):
    with pytest.raises(StarctlError, match="unknown attribute 'nope': known are .*sentiment"):
        load_head("nope", SPACE)
    root = tmp_path / "builtin"
    write_definition(root / "toxicity", "toxicity", ["toxic", "non-toxic"])  # a definition without a head
    monkeypatch.setenv("STARCTL_ATTRIBUTES", str(root))
    with pytest.raises(StarctlError, match="no trained head yet.*train-attribute toxicity"):
        load_head("toxicity", SPACE)


def test_first_fitting_head_wins(tmp_path, monkeypatch):
    root = tmp_path / "builtin"
    write_definition(root / "sentiment", "sentiment", ["positive", "negative"])
    make_head(root / "sentiment" / "head", space=SPACE, seed=1)
    monkeypatch.setenv("STARCTL_ATTRIBUTES", str(root))
    make_head(user_attributes_dir() / "sentiment" / "head", space=OTHER, seed=2)  # for another core
    infos = [(i.source, i.fits) for i in list_attributes(SPACE) if i.name == "sentiment"]
    assert infos == [("user", False), ("builtin", True)]
    assert load_head("sentiment", SPACE).latent_space == SPACE
    assert load_head("sentiment", OTHER).latent_space == OTHER


def test_corrupt_head_is_listed_with_its_problem():
    folder = make_head(user_attributes_dir() / "mood" / "head", labels=("happy", "sad"), name="mood")
    (folder / "config.json").write_text("{")
    (user_attributes_dir() / "mood" / "attribute.json").write_text(json.dumps({"name": "mood", "labels": ["happy", "sad"]}))
    info = next(i for i in list_attributes(SPACE) if i.name == "mood")
    assert not info.fits and "not a valid head config" in info.problem
    with pytest.raises(StarctlError, match="no trained head yet|unusable"):
        load_head("mood", SPACE)


# --- plugins -----------------------------------------------------------------------------------

def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    folder = write_definition(tmp_path / "pkg" / "formality", "formality", ["formal", "casual"])
    make_head(folder / "head", labels=("formal", "casual"), name="formality")
    calls = []

    def entry_points(group=None):
        calls.append(group)
        return [FakeEntryPoint("formality", lambda: str(folder)),          # a callable
                FakeEntryPoint("direct", folder),                           # a path
                FakeEntryPoint("broken", ImportError("no module named fake_plugin")),
                FakeEntryPoint("missing", tmp_path / "nowhere")]

    monkeypatch.setattr(attributes.importlib.metadata, "entry_points", entry_points)
    plugins = {i.name: i for i in list_attributes(SPACE) if i.source == "plugin"}
    assert calls == ["starctl.attributes"]
    assert plugins["formality"].fits and plugins["formality"].labels == ["formal", "casual"]
    assert plugins["direct"].fits
    assert "failed to load" in plugins["broken"].problem and not plugins["broken"].fits
    assert "not a folder" in plugins["missing"].problem
    assert load_head("formality", SPACE).labels == ["formal", "casual"]
    with pytest.raises(StarctlError, match="several attributes"):
        find_label("casual")
    assert find_label("formality:casual") == ("formality", 1)
    with pytest.raises(StarctlError, match="unusable"):
        load_head("broken", SPACE)


# --- labels ------------------------------------------------------------------------------------

def test_find_label():
    assert find_label("negative") == ("sentiment", 1)
    assert find_label("sport") == ("topic", 3)
    assert find_label("toxicity:non-toxic") == ("toxicity", 1)
    with pytest.raises(StarctlError) as e:
        find_label("postive")
    msg = str(e.value)
    assert "unknown label 'postive'" in msg and "positive, negative (sentiment)" in msg
    assert "business, entertainment, politics, sport, tech (topic)" in msg and "\n" not in msg
    with pytest.raises(StarctlError, match="unknown label 'x' of attribute 'topic'"):
        find_label("topic:x")
    with pytest.raises(StarctlError, match="unknown attribute 'mood'"):
        find_label("mood:happy")


def test_user_label_shared_with_builtin_is_ambiguous():
    make_head(user_attributes_dir() / "review" / "head", labels=("positive", "mixed"), name="review")
    with pytest.raises(StarctlError, match="several attributes \\(review, sentiment\\).*sentiment:positive|review:positive"):
        find_label("positive")
    assert find_label("review:positive") == ("review", 0)


# --- training user attributes --------------------------------------------------------------

def write_csv(path: Path, rows) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "tag"])
        w.writerows(rows)
    return path


def tiny_rows():
    return [(f"{doc} ({i})", "film" if any(w in doc for w in ("movie", "film", "singer")) else "other")
            for i, doc in enumerate(DOCS)]


def test_train_attribute_from_csv_writes_a_listed_user_head(tmp_path, tiny_encoder):
    data = write_csv(tmp_path / "data.csv", tiny_rows())
    path, report = train_attribute("genre", str(data), "sentence", "tag", latent_space=SPACE,
                                   encoder=tiny_encoder, epochs=1, batch_size=8, width=16, depth=1,
                                   min_per_class=2, heldout_fraction=0.3)
    assert path == user_attributes_dir() / "genre" / "head"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    definition = json.loads((path.parent / "attribute.json").read_text())
    assert definition["labels"] == ["film", "other"] and "data.csv" in definition["labelling"]
    info = next(i for i in list_attributes(SPACE) if i.name == "genre")
    assert info.source == "user" and info.fits and info.accuracy == round(report.head_accuracy[1.0], 4)
    head = load_head("genre", SPACE)
    assert "data.csv" in head.config.data and head.config.training["class_counts"] == report.class_counts


def test_train_attribute_to_explicit_output(tmp_path, tiny_encoder):
    data = write_csv(tmp_path / "data.csv", tiny_rows())
    out = tmp_path / "somewhere" / "myhead"
    path, _ = train_attribute("genre", str(data), "sentence", "tag", latent_space=SPACE, encoder=tiny_encoder,
                              output=out, epochs=1, width=16, depth=1, min_per_class=2, probe=False)
    assert path == out and (out / "model.safetensors").is_file()
    assert not user_attributes_dir().exists()        # nothing in the registry
    assert load_head(str(out), SPACE).labels == ["film", "other"]


def test_bad_data_file_error_names_the_line(tmp_path, tiny_encoder):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,tag\nfine text,a\n,b\nmore,a\n")
    with pytest.raises(StarctlError, match="bad.csv line 3: empty text"):
        train_attribute("genre", str(bad), "sentence", "tag", latent_space=SPACE, encoder=tiny_encoder)
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "a", "label": "x"}\n{"text": "b"\n')
    with pytest.raises(StarctlError, match="bad.jsonl line 2"):
        train_attribute("genre", str(jl), latent_space=SPACE, encoder=tiny_encoder)
    assert not user_attributes_dir().exists()


def test_no_partial_head_when_training_fails_midway(tmp_path, tiny_encoder):
    data = write_csv(tmp_path / "data.csv", tiny_rows())

    def fail_at_third_step(stage, done, total):
        if stage == "train" and done == 3:
            raise RuntimeError("interrupted")

    kw = dict(latent_space=SPACE, encoder=tiny_encoder, epochs=3, batch_size=4, width=16, depth=1,
              min_per_class=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        train_attribute("genre", str(data), "sentence", "tag", progress=fail_at_third_step, **kw)
    assert not (user_attributes_dir() / "genre").exists()
    # an existing head survives a failed re-training, and no temporary folder is left
    path, _ = train_attribute("genre", str(data), "sentence", "tag", **kw)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="interrupted"):
        train_attribute("genre", str(data), "sentence", "tag", progress=fail_at_third_step, seed=5, **kw)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["attribute.json", "head"]


def test_one_class_data_is_refused(tmp_path, tiny_encoder):
    data = write_csv(tmp_path / "one.csv", [(f"text {i}", "a") for i in range(10)])
    with pytest.raises(StarctlError, match="one class only"):
        train_attribute("genre", str(data), "sentence", "tag", latent_space=SPACE, encoder=tiny_encoder)


def test_bad_attribute_name_and_option(tmp_path, tiny_encoder):
    with pytest.raises(StarctlError, match="attribute name"):
        train_attribute("../evil", "x.csv", latent_space=SPACE, encoder=tiny_encoder)
    data = write_csv(tmp_path / "data.csv", tiny_rows())
    with pytest.raises(StarctlError, match="unknown training option"):
        train_attribute("genre", str(data), "sentence", "tag", latent_space=SPACE, encoder=tiny_encoder, epoch=3)


def test_train_attribute_without_data_needs_a_builtin(tiny_encoder):
    with pytest.raises(StarctlError, match="not a built-in attribute"):
        train_attribute("genre", latent_space=SPACE, encoder=tiny_encoder)


# --- built-in recipes -------------------------------------------------------------------------

def test_train_builtin_follows_the_definition(tmp_path, monkeypatch, tiny_encoder):
    root = tmp_path / "builtin"
    folder = write_definition(root / "genre", "genre", ["other", "film"])
    d = json.loads((folder / "attribute.json").read_text())
    d.update(data={"builder": "fake", "options": {"suffix": "!"}}, labelling="by keyword",
             training={"epochs": 1, "batch_size": 8, "width": 16, "depth": 1, "min_per_class": 2})
    (folder / "attribute.json").write_text(json.dumps(d))
    monkeypatch.setenv("STARCTL_ATTRIBUTES", str(root))
    rows = tiny_rows()

    def fake(suffix):
        return Examples([t + suffix for t, _ in rows], [lab for _, lab in rows], [t for t, _ in rows],
                        description="fake data", provenance="by keyword")

    monkeypatch.setitem(attributes._BUILDERS, "fake", fake)
    out, report = train_builtin("genre", SPACE, tiny_encoder, folder / "head", limit=10, heldout_fraction=0.3)
    head = load_head("genre", SPACE)
    assert head.labels == ["other", "film"]                     # the definition's order
    assert report.class_counts == {"other": 10, "film": 10}
    assert head.config.label_provenance == "by keyword" and "limited to 10" in head.config.data
    assert head.config.training["epochs"] == 1
    assert next(i for i in list_attributes(SPACE) if i.name == "genre").fits


def test_examples_limited_is_deterministic_and_balanced():
    ex = Examples([f"t{i}" for i in range(30)], ["a"] * 20 + ["b"] * 10, [f"t{i}" for i in range(30)])
    a, b = ex.limited(5, seed=1), ex.limited(5, seed=1)
    assert a.texts == b.texts and a.counts() == {"a": 5, "b": 5}
    assert ex.limited(None) is ex


def test_split_passages_lengths():
    article = ("Title line here\n\nThe bank raised rates on Monday. Markets fell. Analysts said the move was "
               "expected by most traders in London. A spokesman declined to comment.\n\n"
               + "Word " * 60 + "is a very long sentence. Short one here to end the article.")
    passages = split_passages(article, seed=0)
    assert passages and all(6 <= len(p.split()) <= 45 for p in passages)
    assert not any("Title line" in p for p in passages)
    assert not any(p.startswith("Word Word") for p in passages)       # too long alone: dropped
    assert split_passages(article, seed=0) == passages
