"""Training on tiny models: loss falls, checkpoints resume exactly, save/load/generate round trip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from starctl.generation import GenerationConfig, generate
from starctl.model import StarCore
from starctl.training import Trainer, TrainConfig


def tiny_recipe(tmp_path, backbone, encoder, corpus, **over) -> TrainConfig:
    d = {
        "core": {"backbone": str(backbone), "encoder": str(encoder), "latent_dim": 16, "width": 32,
                 "num_heads": 2, "generator_depth": 1, "head_depth": 1, "vocab_size": 40, "num_slots": 4},
        "data": {"sources": [str(corpus)], "heldout_fraction": 0.2, "chunk_tokens": 16,
                 "min_prefix_tokens": 2, "min_cont_tokens": 4, "eval_chunks": 8},
        "output_dir": str(tmp_path / "run"), "steps": 6, "batch_size": 4, "lr": 3e-3,
        "warmup_steps": 1, "vocab_skip": 5, "eval_every": 3, "checkpoint_every": 2, "seed": 0,
    }
    for k, v in over.items():
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    return TrainConfig.from_dict(d)


def test_train_save_load_generate(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file):
    cfg = tiny_recipe(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file)
    final = Trainer(cfg).run()
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert sum("plan_gain" in r for r in records) == 3  # step 0, 3, 6
    core = StarCore.from_pretrained(final)
    saved = json.loads((final / "config.json").read_text())
    assert saved["latent_std"] != 1.0  # statistics measured on the corpus and stored
    result = generate(core, ["The movie was"], GenerationConfig(steps=3, max_new_tokens=5, num_samples=2))
    assert len(result.generations) == 2 and result.new_tokens > 0


def test_loss_falls_on_a_fixed_batch(tiny_backbone_dir, tiny_encoder_dir):
    from starctl.assets import load_backbone
    from starctl.data import collate
    from starctl.model import StarConfig
    from tiny import DOCS

    backbone, tok = load_backbone(str(tiny_backbone_dir))
    core = StarCore(StarConfig(backbone=str(tiny_backbone_dir), encoder=str(tiny_encoder_dir), latent_dim=16,
                               width=32, num_heads=2, backbone_mode="full"), backbone, tok)
    ids = [tok(d)["input_ids"] for d in DOCS[:6]]
    batch = collate([i[:4] for i in ids], [i[4:] for i in ids], tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    logsnr = torch.linspace(-3, 5, 6)
    opt = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        t = core.training_losses(*batch, x, logsnr, noise)
        loss = t["nll_sum"].sum() / t["ntokens"].sum() + t["v_mse"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_resume_after_interruption_is_exact(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file, monkeypatch):
    straight = Trainer(tiny_recipe(tmp_path / "a", tiny_backbone_dir, tiny_encoder_dir, corpus_file)).run()

    cfg = tiny_recipe(tmp_path / "b", tiny_backbone_dir, tiny_encoder_dir, corpus_file)
    calls = {"n": 0}
    original = Trainer.save_checkpoint

    def save_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint at step 4
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).run()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    state = json.loads((tmp_path / "b" / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    resumed = Trainer(tiny_recipe(tmp_path / "b", tiny_backbone_dir, tiny_encoder_dir, corpus_file)).run()
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 0] == sorted(set(s for s in steps if s > 0))  # no step repeated or lost
    assert max(steps) == 6


def test_killed_process_resumes(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file):
    """SIGKILL a real `starctl train` after its first checkpoint, then resume it."""
    recipe = tiny_recipe(tmp_path, tiny_backbone_dir, tiny_encoder_dir, corpus_file, steps=400,
                         checkpoint_every=5, eval_every=1000)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe.to_dict()))
    cmd = [sys.executable, "-m", "starctl.cli", "train", "--recipe", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 400
    done = subprocess.run(cmd + ["--set", "steps=" + str(killed_at + 5)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == killed_at + 5
    assert killed_at + 1 in steps
