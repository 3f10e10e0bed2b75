"""Named text sources (starctl.corpora): built-ins, local files and their errors, splits."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from starctl import assets, corpora
from starctl.corpora import load_labelled, load_texts, split_documents
from starctl.errors import StarctlError


def _have_vader_sdist() -> bool:
    try:
        assets.sdist_file("vaderSentiment", "3.3.2")
        return True
    except StarctlError:
        return False


needs_vader = pytest.mark.skipif(
    not _have_vader_sdist(), reason="vaderSentiment sdist not downloaded (run ./install.sh)"
)


@pytest.fixture
def hub_down(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(assets, "_probe_hub", lambda endpoint: f"cannot reach {endpoint}: test")


# ----- built-in training text ---------------------------------------------------------------


def test_wiki():
    texts = load_texts("wiki")
    assert 100 <= len(texts) <= 110
    assert 2_500_000 < sum(map(len, texts)) < 3_500_000
    assert min(map(len, texts)) >= corpora.MIN_WIKI_CHARS
    joined = "\n".join(texts)
    assert "#REDIRECT" not in joined and "'''" not in joined and "[[" not in joined
    assert load_texts("wiki", limit=3) == texts[:3]


def test_lee():
    texts = load_texts("lee")
    assert len(texts) == 300
    assert all(t.strip() == t and t for t in texts)


def test_bbc():
    texts = load_texts("bbc")
    assert len(texts) == 2225
    assert 4_500_000 < sum(map(len, texts)) < 5_500_000
    assert any("£" in t for t in texts)  # the one cp1252 file decodes
    # classes interleaved: the first five documents come from five different folders
    labelled = dict((t, lab) for t, lab in load_labelled("bbc-topic"))
    assert len({labelled[t] for t in load_texts("bbc", limit=5)}) == 5


def test_rotten_tomatoes_texts():
    texts = load_texts("rotten-tomatoes")
    assert 13_000 < len(texts) < 14_000
    assert len(set(texts)) == len(texts)


@needs_vader
def test_vader_texts():
    texts = load_texts("vader")
    assert 23_000 < len(texts) < 24_000
    assert not any("&amp;" in t for t in texts)


def test_limit_and_split_arguments():
    assert len(load_texts("lee", limit=7)) == 7
    assert load_texts("lee", limit=0) == []
    assert len(load_texts("lee", split="train")) == 300
    with pytest.raises(StarctlError, match="single split"):
        load_texts("lee", split="test")
    with pytest.raises(StarctlError, match="limit"):
        load_texts("lee", limit=-1)


def test_unknown_corpus_lists_builtins(hub_down):
    with pytest.raises(StarctlError) as e:
        load_texts("wikii")
    msg = str(e.value)
    assert "unknown corpus 'wikii'" in msg and "\n" not in msg
    for name in corpora.BUILTIN_TEXTS:
        assert name in msg
    with pytest.raises(StarctlError, match="unknown labelled source 'someone/sst9'.*bbc-topic"):
        load_labelled("someone/sst9")


# ----- built-in labelled data ---------------------------------------------------------------


def test_rotten_tomatoes_labelled():
    rows = load_labelled("rotten-tomatoes")
    c = Counter(label for _, label in rows)
    assert set(c) == {"positive", "negative"}
    assert 7_000 < c["positive"] < 7_500 and 5_000 < c["negative"] < 5_500
    assert all(isinstance(t, str) and t for t, _ in rows)


@needs_vader
def test_vader_labelled():
    rows = load_labelled("vader-sentiment")
    c = Counter(label for _, label in rows)
    assert set(c) == {"positive", "negative"}
    assert 7_500 < c["positive"] < 9_000 and 6_500 < c["negative"] < 7_500
    strict = load_labelled("vader-sentiment", vader_threshold=2.5)
    assert 0 < len(strict) < len(rows)
    with pytest.raises(StarctlError, match="vader_threshold"):
        load_labelled("vader-sentiment", vader_threshold=-1)


def test_bbc_topic_labelled():
    rows = load_labelled("bbc-topic")
    c = Counter(label for _, label in rows)
    assert set(c) == {"business", "entertainment", "politics", "sport", "tech"}
    assert sum(c.values()) == 2225 and min(c.values()) > 350


# ----- local files --------------------------------------------------------------------------


def test_txt_blocks_and_lines(tmp_path):
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("First doc\nstill first.\n\n\nSecond doc.\n   \nThird.\n")
    assert load_texts(str(blocks)) == ["First doc\nstill first.", "Second doc.", "Third."]
    lines = tmp_path / "lines.txt"
    lines.write_text("\none\ntwo\r\nthree\n\n")
    assert load_texts(str(lines)) == ["one", "two", "three"]


def test_csv_labelled_and_texts(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text('text,label,extra\n"Great, really great",pos,1\n"two\nlines",neg,2\nplain,neg,3\n')
    assert load_labelled(str(f)) == [("Great, really great", "pos"), ("two\nlines", "neg"), ("plain", "neg")]
    assert load_texts(str(f)) == ["Great, really great", "two\nlines", "plain"]
    g = tmp_path / "custom.tsv"
    g.write_text("review\tstars\nfine\t5\n")
    assert load_labelled(str(g), text_col="review", label_col="stars") == [("fine", "5")]


def test_csv_missing_column(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("sentence,label\nhi,pos\n")
    msg = r"data\.csv line 1: no column 'text' \(columns: sentence, label\)"
    with pytest.raises(StarctlError, match=msg):
        load_labelled(str(f))


def test_csv_empty_text_names_physical_line(tmp_path):
    f = tmp_path / "file.csv"
    # line 1 header; lines 2-3 one quoted two-line record; line 4 blank; lines 5-6 ok; line 7 empty
    f.write_text('text,label\n"a\nb",pos\n\nc,neg\nd,pos\n,neg\ne,pos\n')
    with pytest.raises(StarctlError, match=r"^file\.csv line 7: empty text$"):
        load_labelled(str(f))
    assert load_texts(str(f)) == ["a\nb", "c", "d", "e"]  # training text skips empty rows


def test_csv_empty_label_and_field_count(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("text,label\nok,pos\nno label,\n")
    with pytest.raises(StarctlError, match=r"x\.csv line 3: empty label"):
        load_labelled(str(f))
    f.write_text("text,label\nok,pos\ntoo,many,fields\n")
    with pytest.raises(StarctlError, match=r"x\.csv line 3: 3 fields, the header has 2"):
        load_labelled(str(f))


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg", "id": 3}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_labelled(str(f)) == [("good", "pos"), ("bad", "neg")]
    assert load_texts(str(f), limit=1) == ["good"]
    f.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n{"text": "c", lab\n')
    with pytest.raises(StarctlError, match=r"d\.jsonl line 4: not valid JSON"):
        load_labelled(str(f))
    f.write_text('{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n')
    with pytest.raises(StarctlError, match=r"d\.jsonl line 2: no field 'text' \(fields: txt, label\)"):
        load_labelled(str(f))
    f.write_text('{"text": "a", "label": 1}\n{"text": "  ", "label": 0}\n')
    with pytest.raises(StarctlError, match=r"d\.jsonl line 2: empty text"):
        load_labelled(str(f))
    f.write_text('["text", "label"]\n')
    with pytest.raises(StarctlError, match=r"d\.jsonl line 1: expected a JSON object"):
        load_labelled(str(f))


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    f = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["one", "two"], "label": [1, 0]}).to_parquet(f)
    assert load_labelled(str(f)) == [("one", "1"), ("two", "0")]
    assert load_texts(str(f)) == ["one", "two"]
    with pytest.raises(StarctlError, match=r"d\.parquet: no column 'y' \(columns: text, label\)"):
        load_labelled(str(f), label_col="y")
    pd.DataFrame({"text": ["one", None], "label": ["a", "b"]}).to_parquet(f)
    with pytest.raises(StarctlError, match=r"d\.parquet row 2: empty text"):
        load_labelled(str(f))


def test_local_file_errors(tmp_path):
    with pytest.raises(StarctlError, match="does not exist"):
        load_texts(str(tmp_path / "missing.csv"))
    with pytest.raises(StarctlError, match="does not exist"):
        load_labelled("data/missing.jsonl")
    odd = tmp_path / "x.xlsx"
    odd.write_text("")
    with pytest.raises(StarctlError, match="unsupported file type"):
        load_texts(str(odd))
    txt = tmp_path / "x.txt"
    txt.write_text("a\n")
    with pytest.raises(StarctlError, match="no labels"):
        load_labelled(str(txt))
    with pytest.raises(StarctlError, match="is a folder"):
        load_texts(str(tmp_path))
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(StarctlError, match="empty file"):
        load_labelled(str(empty))


# ----- split_documents ----------------------------------------------------------------------


def test_split_documents_deterministic_and_disjoint():
    docs = [f"document number {i}" for i in range(200)]
    train, held = split_documents(docs, 0.1, seed=1)
    assert len(held) == 20 and len(train) == 180
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(docs)
    assert (train, held) == split_documents(docs, 0.1, seed=1)
    assert train == [d for d in docs if d in set(train)]  # input order kept
    assert split_documents(docs, 0.1, seed=2)[1] != held
    # the split depends on the documents, not on their order
    assert sorted(split_documents(docs[::-1], 0.1, seed=1)[1]) == sorted(held)


def test_split_documents_edge_cases():
    docs = ["a", "b", "a", "c", "d"]
    train, held = split_documents(docs, 0.3, seed=0)
    assert set(train).isdisjoint(held)  # duplicates land on the same side
    assert len(train) + len(held) == 5
    assert split_documents(["x", "y"], 0.01, seed=0)[1] != []  # at least one held out
    assert split_documents(["x", "y"], 0.99, seed=0)[0] != []  # never all
    assert split_documents(["only"], 0.5, seed=0) == (["only"], [])
    assert split_documents(docs, 0.0, seed=0) == (docs, [])
    pairs = [("t1", "pos"), ("t2", "neg"), ("t3", "pos"), ("t4", "neg")]
    tr, he = split_documents(pairs, 0.5, seed=0)
    assert len(tr) == len(he) == 2 and set(tr).isdisjoint(he)
    with pytest.raises(StarctlError, match="heldout_fraction"):
        split_documents(docs, 1.0, seed=0)
