"""Train the built-in attribute heads for a core's latent space (writes attributes/<name>/head).

    python recipes/train_builtin_heads.py [--core cores/default] [--limit 4000] [NAME ...]

Embeddings are cached under $STARCTL_HOME/head-cache, so re-runs only re-train the heads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from starctl.assets import load_encoder, starctl_home
from starctl.attributes import builtin_attributes_dir, train_builtin
from starctl.model import read_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=["sentiment", "topic", "toxicity"])
    ap.add_argument("--core", default="cores/default", help="core folder (or a training checkpoint folder)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many examples per label")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    config, _ = read_checkpoint(args.core)
    encoder = load_encoder(config.encoder)
    cache_dir = starctl_home() / "head-cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        t0 = time.time()
        out = builtin_attributes_dir() / name / "head"
        _, report = train_builtin(name, config.latent_space, encoder, out, limit=args.limit,
                                  cache=cache_dir / f"{name}.safetensors", num_threads=args.threads)
        print(f"== {name}: {time.time() - t0:.0f} s -> {out}")
        print(report.table())


if __name__ == "__main__":
    main()
