"""Training throughput (tokens/s) of `starctl train` on this machine's CPUs: one process with 1 and
with 2 threads, and 2 data-parallel processes (accelerate launch, gloo) with 1 thread each, on
the same global batch.

    python recipes/ddp_throughput.py --model small     # a random 4-layer width-256 Llama (any time)
    python recipes/ddp_throughput.py --model smollm2   # the default core's SmolLM2-135M + LoRA setup

Tokens are the real (non-pad) prefix + continuation tokens of the global batch; the rate is
measured from each run's debug log (data.debug_log) over the steps after `--warmup`, so start-up,
data preparation and plan encoding are not counted. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def small_backbone(folder: Path) -> Path:
    """A random Llama (4 layers, width 256, 8 heads) with SmolLM2's tokenizer when it is installed,
    else the tests' tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    try:
        from starctl.assets import load_tokenizer

        tok = load_tokenizer("smollm2-135m")
    except Exception:  # noqa: BLE001 - any failure: fall back to the tiny tokenizer
        from tiny import tiny_tokenizer

        tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def recipe(work: Path, model: str, steps: int, batch: int) -> dict:
    if model == "smollm2":
        d = json.loads((REPO / "recipes" / "default-core.json").read_text())
        d.pop("description", None)
        d["data"]["max_chunks"] = 4000
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import save_tiny_encoder

        bb = work / "backbone"
        enc = work / "encoder"
        if not bb.exists():
            small_backbone(bb)
        if not enc.exists():
            save_tiny_encoder(enc, dim=64)
        d = {"core": {"backbone": str(bb), "encoder": str(enc), "latent_dim": 64, "width": 128, "num_heads": 4,
                      "generator_depth": 2, "head_depth": 2, "vocab_size": 0, "num_slots": 8, "backbone_mode": "full"},
             "data": {"sources": ["lee"], "heldout_fraction": 0.05, "chunk_tokens": 64, "min_prefix_tokens": 4,
                      "min_cont_tokens": 8, "max_chunks": 4000, "eval_chunks": 16}}
    d.update({"steps": steps, "batch_size": batch, "eval_every": 10**6, "checkpoint_every": 10**6,
              "max_minutes": None, "device": "cpu", "debug_log": True, "seed": 0})
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(work: Path, d: dict, name: str, processes: int, threads: int, warmup: int) -> dict:
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
    d = dict(d, output_dir=str(out), threads=threads)
    path = work / f"{name}.json"
    path.write_text(json.dumps(d))
    args = ["-m", "starctl.cli", "train", "--recipe", str(path)]
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    logs = [[json.loads(x) for x in (out / "debug" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(processes)]
    steps = [r["step"] for r in logs[0]]
    first, last = steps[warmup - 1], steps[-1]
    tokens = sum(rec["tokens"] for log in logs for rec in log if first < rec["step"] <= last)
    seconds = logs[0][-1]["seconds"] - logs[0][warmup - 1]["seconds"]
    return {"config": name, "processes": processes, "threads_per_process": threads, "steps_timed": last - first,
            "global_batch": d["batch_size"], "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "s_per_step": round(seconds / (last - first), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("small", "smollm2"), default="small")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="ddp-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    d = recipe(work, a.model, a.steps, a.batch)
    for name, procs, threads in (("1proc-1thread", 1, 1), ("1proc-2threads", 1, 2), ("2procs-1thread", 2, 1)):
        print(json.dumps({"model": a.model, **measure(work, d, name, procs, threads, a.warmup)}), flush=True)


if __name__ == "__main__":
    main()
