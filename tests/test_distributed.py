"""Data-parallel training (accelerate launch, 2 CPU processes on gloo), streaming corpora,
precomputed plans, the paper recipe's dry run, and attribute heads from streamed sources.

Tolerance: a 2-process run of a global batch of 4 (2 examples per process) follows the
1-process run of the same global batch with a per-step loss difference below 1e-4 (absolute;
losses are ~10-40, measured differences ~1e-5): noise is drawn for the global batch on every
process and sliced, and the loss is normalised by global counts, so only the order of float
additions differs.

Every process runs with one thread (the suite shares the machine with long training runs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from starctl.errors import StarctlError
from starctl.training import Trainer, TrainConfig, global_batch_indices, load_recipe
from tiny import DOCS

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIG = REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"
PAPER = REPO / "recipes" / "paper-gpt2-large-st5-xl.json"
LOSS_TOLERANCE = 1e-4


# --- helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [e.get("PYTHONPATH")] if p])
    return e


def command(args: list[str], processes: int) -> list[str]:
    """`starctl ARGS` for one process, `accelerate launch ... starctl ARGS` for more."""
    if processes == 1:
        return [sys.executable, "-m", "starctl.cli", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
            "--num_processes", str(processes), "--main_process_port", str(free_port()),
            "-m", "starctl.cli", *args]


def run(args: list[str], processes: int, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(command(args, processes), capture_output=True, text=True, timeout=timeout, env=env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun starts its workers in sessions of their own, so
    a process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it, as a crash would, and wait until all are gone."""
    tree = process_tree(proc.pid)
    for pid in reversed(tree):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(alive(p) for p in tree) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in tree), "a training process survived the kill"


def tiny_dict(tmp_path, backbone, encoder, source, **over) -> dict:
    d = {
        "core": {"backbone": str(backbone), "encoder": str(encoder), "latent_dim": 16, "width": 32,
                 "num_heads": 2, "generator_depth": 1, "head_depth": 1, "vocab_size": 40, "num_slots": 4,
                 "backbone_mode": "lora"},
        "data": {"sources": [str(source)], "heldout_fraction": 0.2, "chunk_tokens": 16,
                 "min_prefix_tokens": 2, "min_cont_tokens": 4, "eval_chunks": 8},
        "output_dir": str(tmp_path / "run"), "steps": 8, "batch_size": 4, "lr": 3e-3,
        "warmup_steps": 1, "vocab_skip": 5, "eval_every": 4, "checkpoint_every": 4, "seed": 0,
        "threads": 1, "device": "cpu", "debug_log": True,
    }
    for k, v in over.items():
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    return d


def write_recipe(path: Path, d: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))
    return path


def records(path: Path) -> list[dict]:
    """JSON lines; a line cut short by a killed process is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def debug_by_step(run_dir: Path, rank: int) -> dict[int, dict]:
    recs = records(run_dir / "debug" / f"rank{rank}.jsonl")
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"rank {rank} logged a step twice or out of order: {steps}"
    return {r["step"]: r for r in recs}


@pytest.fixture(scope="module")
def corpus_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(len(DOCS)):
            f.write(json.dumps({"text": " ".join(DOCS[i:] + DOCS[:i]), "id": i}) + "\n")
    return path


# --- data parallel: trajectory, resume ---------------------------------------------------------


def test_two_processes_follow_the_one_process_trajectory(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file):
    runs = {}
    for procs in (1, 2):
        d = tiny_dict(tmp_path / f"p{procs}", tiny_backbone_dir, tiny_encoder_dir, corpus_file)
        run(["train", "--recipe", str(write_recipe(tmp_path / f"p{procs}.json", d))], procs)
        runs[procs] = Path(d["output_dir"])
    one = {r["step"]: r for r in records(runs[1] / "metrics.jsonl")}
    two = {r["step"]: r for r in records(runs[2] / "metrics.jsonl")}
    assert sorted(one) == sorted(two) == list(range(0, 9))
    worst = 0.0
    for step in range(1, 9):
        for key in ("loss", "ce", "diffusion"):
            worst = max(worst, abs(one[step][key] - two[step][key]))
    assert worst < LOSS_TOLERANCE, f"max |loss diff| {worst}"
    for step in (0, 4, 8):
        assert abs(one[step]["plan_gain"] - two[step]["plan_gain"]) < LOSS_TOLERANCE

    # each process took its half of the 1-process global batch, in order
    single = debug_by_step(runs[1], 0)
    ranks = [debug_by_step(runs[2], r) for r in (0, 1)]
    for step in range(1, 9):
        assert ranks[0][step]["indices"] + ranks[1][step]["indices"] == single[step]["indices"]
        assert len(ranks[0][step]["indices"]) == len(ranks[1][step]["indices"]) == 2
    # EMA updated identically on both processes (bitwise), at each checkpoint
    for step in (4, 8):
        assert ranks[0][step]["ema"] == ranks[1][step]["ema"]

    a, b = load_file(str(runs[1] / "final" / "model.safetensors")), load_file(str(runs[2] / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # only the main process wrote files: one metrics line per step
    assert len(records(runs[2] / "metrics.jsonl")) == 9


def test_killed_two_process_run_resumes_without_lost_or_repeated_data(tmp_path, tiny_backbone_dir,
                                                                     tiny_encoder_dir, corpus_file):
    n, batch = 24, 4  # 24 training chunks: an epoch is 6 steps
    d = tiny_dict(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file, steps=100_000,
                  checkpoint_every=5, eval_every=10**6, data={"max_chunks": n})
    recipe = write_recipe(tmp_path / "recipe.json", d)
    run_dir = Path(d["output_dir"])
    state = run_dir / "checkpoint" / "state.json"
    proc = subprocess.Popen(command(["train", "--recipe", str(recipe)], 2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env())
    try:
        # Kill 2-3 steps after a checkpoint (every 5 steps): that work is lost and must be redone.
        deadline = time.time() + 180
        log = run_dir / "debug" / "rank0.jsonl"
        while time.time() < deadline and proc.poll() is None:
            last = records(log)[-1]["step"] if state.exists() and log.exists() and records(log) else 0
            if last > 5 and last % 5 in (2, 3):
                break
            time.sleep(0.02)
    finally:
        kill_tree(proc)  # the launcher and both workers
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 100_000
    before = {r: debug_by_step(run_dir, r) for r in (0, 1)}
    print("killed at checkpoint", killed_at, "with steps", sorted(s for s in before[0] if s > killed_at), "lost")

    final_step = killed_at + 13
    run(["train", "--recipe", str(recipe), "--set", f"steps={final_step}"], 2)
    assert json.loads(state.read_text())["step"] == final_step
    ranks = [debug_by_step(run_dir, r) for r in (0, 1)]
    for r in (0, 1):  # each step exactly once per process, none lost across the resume
        assert sorted(ranks[r]) == list(range(1, final_step + 1))
    sequence = []
    for step in range(1, final_step + 1):
        both = ranks[0][step]["indices"] + ranks[1][step]["indices"]
        assert both == global_batch_indices(step - 1, batch, n, d["seed"])
        sequence += both
        for r in (0, 1):  # steps redone after the kill read what they had read before it
            if step in before[r]:
                assert before[r][step]["indices"] == ranks[r][step]["indices"]
    for start in range(0, len(sequence) - n + 1, n):  # every epoch covers each chunk exactly once
        assert sorted(sequence[start:start + n]) == list(range(n))
    for step in range(5, final_step + 1, 5):
        assert ranks[0][step]["ema"] == ranks[1][step]["ema"]
    steps = [r["step"] for r in records(run_dir / "metrics.jsonl")]
    assert steps[-1] == final_step and killed_at + 1 in steps


def test_gradient_accumulation_follows_the_one_pass_trajectory(tmp_path, tiny_backbone_dir, tiny_encoder_dir,
                                                               corpus_file):
    losses = {}
    for micro in (None, 1, 2):
        d = tiny_dict(tmp_path / f"m{micro}", tiny_backbone_dir, tiny_encoder_dir, corpus_file, threads=None,
                      micro_batch_size=micro, debug_log=False)
        Trainer(TrainConfig.from_dict(d)).run()
        losses[micro] = [r for r in records(Path(d["output_dir"]) / "metrics.jsonl") if "loss" in r]
    for micro in (1, 2):
        for a, b in zip(losses[None], losses[micro], strict=True):
            for key in ("loss", "ce", "diffusion", "v_mse"):
                assert abs(a[key] - b[key]) < LOSS_TOLERANCE, (micro, key, a, b)
    with pytest.raises(StarctlError, match="micro_batch_size"):
        Trainer(TrainConfig.from_dict(tiny_dict(tmp_path / "bad", tiny_backbone_dir, tiny_encoder_dir, corpus_file,
                                                threads=None, micro_batch_size=3))).run()


def test_global_batch_must_split_evenly(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file):
    d = tiny_dict(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file, batch_size=3)
    done = subprocess.run(command(["train", "--recipe", str(write_recipe(tmp_path / "r.json", d))], 2),
                          capture_output=True, text=True, timeout=120, env=env())
    assert done.returncode != 0 and "not divisible" in done.stderr


# --- streaming ---------------------------------------------------------------------------------


def test_chunk_stream_resumes_exactly_across_windows_sources_and_epochs(tmp_path, corpus_jsonl):
    import pandas as pd

    from starctl.streaming import ChunkStream, is_heldout
    from tiny import tiny_tokenizer

    parquet = tmp_path / "other.parquet"
    pd.DataFrame({"text": [d + " " + d for d in DOCS[:9]]}).to_parquet(parquet)
    tok = tiny_tokenizer()

    def stream(side="train"):
        return ChunkStream([str(corpus_jsonl), str(parquet)], tok, chunk_tokens=16, min_prefix_tokens=2,
                           min_cont_tokens=4, seed=3, heldout_fraction=0.2, side=side, window=20)

    straight = stream().take(0, 400)  # several windows and epochs
    for cut in (1, 37, 150, 333):
        first = stream()
        first.take(0, cut)
        state = json.loads(json.dumps(first.state_dict()))  # as saved in a checkpoint
        resumed = stream()
        resumed.load_state_dict(state)
        assert resumed.take(cut, 400 - cut) == (straight[0][cut:], straight[1][cut:])
    assert stream().take(0, 400) == straight  # deterministic
    # held-out documents (by hash) never train, and the held-out stream reads only them
    texts = [json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()]
    texts += pd.read_parquet(parquet)["text"].tolist()

    def chunks_of(docs):
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in docs]
        return {tuple(i[s:s + 16]) for i in ids for s in range(0, len(i) - 15, 16)}

    held_docs = [t for t in texts if is_heldout(t, 0.2, 3)]
    assert 0 < len(held_docs) < len(texts)
    held = stream("heldout").take(0, 30)
    assert {tuple(p + c) for p, c in zip(*held)} <= chunks_of(held_docs)
    assert {tuple(p + c) for p, c in zip(*straight)} <= chunks_of([t for t in texts if t not in held_docs])


def test_streaming_run_resumes_exactly(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_jsonl, monkeypatch):
    def cfg(sub):
        return TrainConfig.from_dict(tiny_dict(tmp_path / sub, tiny_backbone_dir, tiny_encoder_dir, corpus_jsonl,
                                               threads=None, data={"streaming": True, "shuffle_window": 8,
                                                                   "sample_chunks": 32}))

    straight = Trainer(cfg("a")).run()
    original = Trainer.save_checkpoint
    calls = {"n": 0}

    def save_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg("b")).run()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    assert (tmp_path / "b" / "run" / "checkpoint" / "stream.json").is_file()
    resumed = Trainer(cfg("b")).run()
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    positions = [r["indices"] for r in records(tmp_path / "b" / "run" / "debug" / "rank0.jsonl")]
    assert positions == [list(range(4 * s, 4 * s + 4)) for s in range(8)]


def test_streaming_two_processes_match_one(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_jsonl):
    """Also: the 2-process run accumulates gradients over micro-batches of 1 (DDP no_sync)."""
    losses = {}
    for procs in (1, 2):
        d = tiny_dict(tmp_path / f"p{procs}", tiny_backbone_dir, tiny_encoder_dir, corpus_jsonl, steps=4,
                      micro_batch_size=1 if procs == 2 else None,
                      data={"streaming": True, "shuffle_window": 8, "sample_chunks": 32})
        run(["train", "--recipe", str(write_recipe(tmp_path / f"p{procs}.json", d))], procs)
        losses[procs] = [r["loss"] for r in records(Path(d["output_dir"]) / "metrics.jsonl") if "loss" in r]
    assert len(losses[1]) == len(losses[2]) == 4
    assert max(abs(a - b) for a, b in zip(losses[1], losses[2])) < LOSS_TOLERANCE


# --- precomputed plans -------------------------------------------------------------------------


def test_encode_shards_across_processes_and_trains(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file):
    from starctl.assets import load_encoder, load_tokenizer
    from starctl.data import build_plan_examples
    from starctl.encode import load_encoded
    from starctl.training import corpus_documents

    d = tiny_dict(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file, data={"max_chunks": 40})
    recipe = write_recipe(tmp_path / "recipe.json", d)
    run(["encode", "--recipe", str(recipe), "--output", str(tmp_path / "enc2")], 2)
    assert len(list((tmp_path / "enc2").glob("train-*-of-00002.safetensors"))) == 2
    cfg = TrainConfig.from_dict(d)
    train, held = load_encoded(tmp_path / "enc2", cfg)

    # the same chunks, stop points and plans the trainer makes in memory
    tok, enc = load_tokenizer(str(tiny_backbone_dir)), load_encoder(str(tiny_encoder_dir))
    train_docs, held_docs = corpus_documents(cfg)
    c = cfg.data
    common = dict(chunk_tokens=c.chunk_tokens, min_prefix_tokens=c.min_prefix_tokens, min_cont_tokens=c.min_cont_tokens,
                  cache_dir=None, cache_tag={}, progress=False)
    want = build_plan_examples(train_docs, tok, enc, seed=cfg.seed, max_chunks=40, **common)
    want_held = build_plan_examples(held_docs, tok, enc, seed=cfg.seed + 1, max_chunks=c.eval_chunks, **common)
    for got, ref in ((train, want), (held, want_held)):
        assert got.prefixes == ref.prefixes and got.continuations == ref.continuations
        torch.testing.assert_close(got.embeddings, ref.embeddings, rtol=1e-4, atol=1e-5)

    d2 = dict(d, output_dir=str(tmp_path / "from-encoded"), steps=2, debug_log=False)
    d2["data"] = dict(d["data"], encoded=str(tmp_path / "enc2"), sources=["not-needed"])
    final = Trainer(TrainConfig.from_dict({**d2, "threads": None})).run()
    assert (final / "model.safetensors").is_file()
    with pytest.raises(StarctlError, match="encoder"):
        load_encoded(tmp_path / "enc2", TrainConfig.from_dict({**d, "core": {**d["core"], "encoder": "other"}}))


# --- the paper recipe --------------------------------------------------------------------------


def test_paper_recipe_dry_run_with_tiny_models(tmp_path, tiny_gpt2_dir, tiny_encoder_dir, corpus_jsonl):
    cfg = load_recipe(PAPER)
    assert (cfg.core.backbone, cfg.core.encoder) == ("gpt2-large", "sentence-transformers/sentence-t5-xl")
    assert (cfg.lr, cfg.backbone_lr, cfg.betas, cfg.weight_decay, cfg.ema_decay) == (5e-4, 5e-4, (0.9, 0.99), 1e-4, 0.999)
    assert (cfg.steps, cfg.batch_size, cfg.data.chunk_tokens, cfg.diffusion_weight) == (250_000, 512, 128, 5.0)
    assert cfg.core.backbone_mode == "full" and cfg.data.streaming
    assert cfg.data.sources[0]["path"] == "HuggingFaceFW/fineweb" and cfg.data.sources[0]["name"] == "sample-10BT"

    overrides = [f"core.backbone={tiny_gpt2_dir}", f"core.encoder={tiny_encoder_dir}", "core.latent_dim=16",
                 "core.width=32", "core.num_heads=2", "core.generator_depth=1", "core.head_depth=1",
                 f'data.sources=["{corpus_jsonl}"]', "data.heldout_fraction=0.2", "data.sample_chunks=16",
                 "data.eval_chunks=4", "data.shuffle_window=8", "steps=3", "batch_size=4", "warmup_steps=1",
                 "eval_every=3", "checkpoint_every=2", "device=cpu", f"output_dir={tmp_path / 'paper'}"]
    dry = load_recipe(PAPER, overrides)
    assert dry.core.backbone_mode == "full" and dry.data.chunk_tokens == 128 and dry.lr == 5e-4
    final = Trainer(dry).run()
    metrics = records(tmp_path / "paper" / "metrics.jsonl")
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics if "loss" in r)
    sd = load_file(str(final / "model.safetensors"))
    assert any(k.startswith("backbone.") for k in sd)  # the whole backbone trained and saved
    assert "backbone.lm_head.weight" not in sd  # tied to the input embedding: saved once
    from starctl.model import StarCore

    core = StarCore.from_pretrained(final)
    assert torch.equal(core.backbone.get_output_embeddings().weight, core.backbone.get_input_embeddings().weight)


# --- attribute heads from a streamed source ----------------------------------------------------


def test_attribute_head_trains_from_a_streamed_source_and_from_the_file(tmp_path):
    from starctl.assets import load_encoder
    from starctl.attributes import train_attribute
    from starctl.corpora import load_labelled
    from starctl.latent import LatentSpace
    from tiny import save_tiny_encoder

    encoder = load_encoder(str(save_tiny_encoder(tmp_path / "enc", 16)))
    data = tmp_path / "labelled.jsonl"
    with open(data, "w") as f:
        for i, doc in enumerate(DOCS):
            label = "film" if any(w in doc for w in ("movie", "film", "singer")) else "other"
            f.write(json.dumps({"sentence": f"{doc} ({i})", "tag": label}) + "\n")
    streamed = load_labelled(str(data), "sentence", "tag", streaming=True)
    assert streamed == load_labelled(str(data), "sentence", "tag")

    space = LatentSpace("tiny", 16, 0.0, 0.25)
    kw = dict(latent_space=space, encoder=encoder, epochs=1, batch_size=8, width=16, depth=1, min_per_class=2,
              heldout_fraction=0.3, num_threads=1)
    heads, counts = {}, {}
    for mode in (True, False):
        path, report = train_attribute("genre", str(data), "sentence", "tag", output=tmp_path / f"head-{mode}",
                                       streaming=mode, **kw)
        heads[mode] = load_file(str(path / "model.safetensors"))
        counts[mode] = report.class_counts
    assert counts[True] == counts[False] and set(counts[True]) == {"film", "other"}
    for k in heads[True]:  # same rows in the same order: the same head
        assert torch.equal(heads[True][k], heads[False][k])
    with pytest.raises(StarctlError, match="no column"):
        load_labelled(str(data), "text", "tag", streaming=True)


def test_streaming_errors_are_one_line_starctl_errors(tmp_path, monkeypatch):
    from starctl.streaming import DocumentStream

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StarctlError, match="cannot stream hub dataset 'HuggingFaceFW/fineweb'.*local path"):
        DocumentStream([{"path": "HuggingFaceFW/fineweb", "name": "sample-10BT"}])
    with pytest.raises(StarctlError, match="does not exist"):
        DocumentStream([str(tmp_path / "missing.jsonl")])
    with pytest.raises(StarctlError, match="may have name"):
        DocumentStream([{"path": "x", "config": "y"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text column"}\n')
    with pytest.raises(StarctlError, match="no column 'text'"):
        next(DocumentStream([str(bad)]))
