"""Tests of starctl.heads: the head model, its files, and train_head on synthetic latents and on
a tiny sentence encoder."""

from __future__ import annotations

import json

import pytest
import torch

from starctl.errors import StarctlError
from starctl.heads import (EVAL_ALPHA2, AttributeHead, HeadConfig, encode_cached, split_heldout,
                           train_head)
from starctl.latent import LatentSpace
from tiny import DOCS

SPACE = LatentSpace("fake-encoder", 8, 0.5, 2.0)


@pytest.fixture(autouse=True)
def one_thread():
    # Small MLPs: one thread is far faster than two on a busy 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def separable(n: int = 600, dim: int = 8, seed: int = 0, margin: float = 2.5):
    """RAW embeddings of two classes on either side of a hyperplane, 'margin' apart (in latent
    units after SPACE's normalisation), and their labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)                                              # latents
    y = torch.arange(n) % 2
    x[:, 0] = (y * 2 - 1) * (margin / 2) + 0.3 * torch.randn(n, generator=g)
    raw = SPACE.denormalise(x)
    labels = ["pos" if v else "neg" for v in y.tolist()]
    return raw, labels


def small_config(**kw) -> HeadConfig:
    return HeadConfig(name="toy", labels=["neg", "pos"], latent=SPACE, width=32, depth=2, **kw)


# --- config and model ------------------------------------------------------------------------

def test_config_json_round_trip():
    cfg = small_config(heldout_accuracy={"1.0": 0.9}, data="toy data", label_provenance="by hand",
                       training={"epochs": 3})
    back = HeadConfig.from_json(cfg.to_json())
    assert back == cfg
    assert isinstance(back.latent, LatentSpace) and back.latent == SPACE
    assert json.loads(cfg.to_json())["latent"] == {"encoder": "fake-encoder", "dim": 8, "mean": 0.5, "std": 2.0}
    assert back.binary and back.max_scale == 4.0


def test_config_rejects_bad_labels_and_future_format():
    with pytest.raises(StarctlError, match="at least 2 labels"):
        HeadConfig(name="x", labels=["a"], latent=SPACE)
    with pytest.raises(StarctlError, match="duplicate"):
        HeadConfig(name="x", labels=["a", "a"], latent=SPACE)
    d = small_config().to_dict()
    d["format_version"] = 99
    with pytest.raises(StarctlError, match="upgrade"):
        HeadConfig.from_dict(d)


def test_head_shapes_and_scalar_alpha2():
    torch.manual_seed(0)
    head = AttributeHead(small_config()).eval()
    z = torch.randn(5, 8)
    out = head(z, torch.full((5,), 0.5))
    assert out.shape == (5, 2)
    assert torch.allclose(head(z, torch.tensor(0.5)), out)
    assert torch.allclose(head.log_probs(z, torch.tensor(0.5)).exp().sum(-1), torch.ones(5))


# --- files -------------------------------------------------------------------------------------

def test_save_load_round_trip_identical_logits(tmp_path):
    torch.manual_seed(0)
    head = AttributeHead(small_config(max_scale=2.5)).eval()
    folder = head.save_pretrained(tmp_path / "head")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = AttributeHead.from_pretrained(folder)
    assert not loaded.training and loaded.config == head.config
    z, a = torch.randn(7, 8), torch.rand(7)
    assert torch.equal(loaded(z, a), head(z, a))
    # safetensors, never pickle: the file starts with a little-endian header length + JSON
    raw = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + n])["__metadata__"]["starctl"] == "attribute-head"


def test_save_replaces_existing_head(tmp_path):
    torch.manual_seed(0)
    AttributeHead(small_config()).save_pretrained(tmp_path / "head")
    torch.manual_seed(1)
    second = AttributeHead(small_config(max_scale=1.0)).eval()
    second.save_pretrained(tmp_path / "head")
    loaded = AttributeHead.from_pretrained(tmp_path / "head")
    assert loaded.config.max_scale == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["head"]  # no temp folders left


def test_failed_save_leaves_nothing_and_keeps_old_head(tmp_path, monkeypatch):
    import safetensors.torch

    torch.manual_seed(0)
    head = AttributeHead(small_config())
    head.save_pretrained(tmp_path / "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        head.save_pretrained(tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        head.save_pretrained(tmp_path / "made" / "for" / "head")   # folders it made are removed
    with pytest.raises(OSError):
        AttributeHead(small_config(max_scale=9.0)).save_pretrained(tmp_path / "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert AttributeHead.from_pretrained(tmp_path / "old").config.max_scale == 4.0


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(StarctlError, match="does not exist"):
        AttributeHead.from_pretrained(tmp_path / "nope")
    torch.manual_seed(0)
    folder = AttributeHead(small_config()).save_pretrained(tmp_path / "h")
    weights = (folder / "model.safetensors").read_bytes()

    (folder / "model.safetensors").unlink()
    with pytest.raises(StarctlError, match="no model.safetensors"):
        AttributeHead.from_pretrained(folder)

    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 3)
    with pytest.raises(StarctlError, match="unreadable weights"):
        AttributeHead.from_pretrained(folder)

    (folder / "model.safetensors").write_bytes(weights)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text("{not json")
    with pytest.raises(StarctlError, match="not a valid head config"):
        AttributeHead.from_pretrained(folder)

    (folder / "config.json").write_text(json.dumps(dict(cfg, width=16)))
    with pytest.raises(StarctlError, match="do not match"):
        AttributeHead.from_pretrained(folder)

    (folder / "config.json").unlink()
    with pytest.raises(StarctlError, match="no config.json"):
        AttributeHead.from_pretrained(folder)


# --- training on synthetic latents -------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    raw, labels = separable()
    texts = [f"text {i}" for i in range(len(labels))]
    return train_head(texts, labels, SPACE, None, embeddings=raw, name="toy", epochs=6,
                      batch_size=64, width=32, depth=2, lr=3e-3, seed=0)


def test_head_learns_separable_task(trained):
    head, report = trained
    assert head.labels == ["neg", "pos"] and not head.training
    assert set(report.head_accuracy) == set(EVAL_ALPHA2) == set(report.probe_accuracy)
    assert report.head_accuracy[1.0] > 0.9
    assert report.head_accuracy[0.5] > 0.65          # chance is 0.5
    assert report.head_accuracy[0.8] >= report.head_accuracy[0.05]
    assert report.probe_accuracy[1.0] > 0.9          # the baseline solves the clean task too
    assert report.n_train + report.n_heldout == 600 and 40 <= report.n_heldout <= 80
    assert report.class_counts == {"neg": 300, "pos": 300}
    assert head.config.heldout_accuracy["1.0"] == round(report.head_accuracy[1.0], 4)
    assert head.config.training["n_train"] == report.n_train
    assert "alpha^2" in report.table()


def test_trained_head_separates_fresh_samples_and_uses_the_normalisation(trained):
    head, _ = trained
    raw, labels = separable(n=200, seed=5)
    x = SPACE.normalise(raw)
    with torch.no_grad():
        pred = head(x, torch.ones(200)).argmax(-1)
    truth = torch.tensor([lab == "pos" for lab in labels]).long()
    assert (pred == truth).float().mean() > 0.9


def test_training_is_deterministic():
    raw, labels = separable(n=100)
    texts = [f"t{i}" for i in range(100)]
    kw = dict(embeddings=raw, epochs=1, batch_size=32, width=16, depth=1, probe=False, seed=3)
    h1, _ = train_head(texts, labels, SPACE, None, **kw)
    h2, _ = train_head(texts, labels, SPACE, None, **kw)
    for a, b in zip(h1.state_dict().values(), h2.state_dict().values()):
        assert torch.equal(a, b)


def test_label_order_and_groups():
    raw, labels = separable(n=60)
    texts = [f"t{i}" for i in range(60)]
    groups = [f"doc{i // 6}" for i in range(60)]                # 10 documents of 6 examples
    head, report = train_head(texts, labels, SPACE, None, embeddings=raw, label_order=["pos", "neg", "other"],
                              groups=groups, epochs=1, width=16, depth=1, probe=False, heldout_fraction=0.2)
    assert head.labels == ["pos", "neg", "other"]
    train, held = split_heldout(labels, groups, 0.2, 0)
    assert not {groups[i] for i in train} & {groups[i] for i in held}
    assert {labels[i] for i in held} == {"pos", "neg"}


def test_split_heldout_is_stratified_by_group():
    labels = ["a"] * 10 + ["b"] * 10
    groups = [f"g{i}" for i in range(20)]
    train, held = split_heldout(labels, groups, 0.2, seed=0)
    assert sorted(train + held) == list(range(20))
    assert sum(labels[i] == "a" for i in held) == 2 and sum(labels[i] == "b" for i in held) == 2


@pytest.mark.parametrize("texts, labels, match", [
    ([], [], "no texts"),
    (["a", " ", "c"], ["x", "y", "x"], "text 2 is empty"),
    (["a", "b"], ["x"], "2 texts but 1 labels"),
    ([f"t{i}" for i in range(10)], ["x"] * 10, "one class only: every example is labelled 'x'"),
    ([f"t{i}" for i in range(12)], ["x"] * 10 + ["y"] * 2, "too few examples for 'y' \\(2\\)"),
])
def test_validation_errors(texts, labels, match):
    with pytest.raises(StarctlError, match=match):
        train_head(texts, labels, SPACE, None, embeddings=torch.zeros(len(texts), 8))


def test_label_outside_label_order_refused():
    raw, labels = separable(n=20)
    with pytest.raises(StarctlError, match="not among the attribute's labels"):
        train_head([f"t{i}" for i in range(20)], labels, SPACE, None, embeddings=raw, label_order=["pos", "x"])


def test_progress_can_abort_training():
    raw, labels = separable(n=100)
    seen = []

    def progress(stage, done, total):
        seen.append(stage)
        if stage == "train" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_head([f"t{i}" for i in range(100)], labels, SPACE, None, embeddings=raw, epochs=3,
                   batch_size=16, width=16, depth=1, progress=progress)
    assert seen == ["train", "train"]


# --- a real (tiny) sentence encoder ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_encoder(tiny_encoder_dir):
    from starctl.assets import load_encoder

    return load_encoder(str(tiny_encoder_dir))


def tiny_data():
    texts, labels = [], []
    for i, doc in enumerate(DOCS):
        label = "film" if any(w in doc for w in ("movie", "film", "singer")) else "other"
        texts.append(f"{doc} ({i})")
        labels.append(label)
    return texts, labels


def test_train_with_tiny_encoder_and_embedding_cache(tiny_encoder, tmp_path):
    texts, labels = tiny_data()
    space = LatentSpace("tiny", 16, 0.0, 0.25)
    cache = tmp_path / "emb.safetensors"
    kw = dict(epochs=1, batch_size=8, width=16, depth=1, min_per_class=2, cache=cache, heldout_fraction=0.3)
    head, r1 = train_head(texts, labels, space, tiny_encoder, **kw)
    assert cache.is_file() and not r1.encoded_from_cache
    _, r2 = train_head(texts, labels, space, tiny_encoder, **kw)
    assert r2.encoded_from_cache
    emb, hit = encode_cached(tiny_encoder, texts, "tiny", cache)
    assert hit and emb.shape == (len(texts), 16)
    # other texts, or another encoder name: recomputed, not reused
    emb2, hit2 = encode_cached(tiny_encoder, texts[:-1], "tiny", cache)
    assert not hit2 and emb2.shape[0] == len(texts) - 1
    _, hit3 = encode_cached(tiny_encoder, texts[:-1], "other", cache)
    assert not hit3
    assert torch.allclose(emb[:-1], emb2, atol=1e-5)
    assert head.latent_space == space


def test_encoder_width_must_match_latent_space(tiny_encoder):
    texts, labels = tiny_data()
    with pytest.raises(StarctlError, match="16-d embeddings but the latent space"):
        train_head(texts, labels, LatentSpace("tiny", 8), tiny_encoder, min_per_class=2)
