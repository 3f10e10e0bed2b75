"""Shared fixtures: tiny backbones and encoders saved once per session."""

from __future__ import annotations

import pytest

from tiny import DOCS, save_tiny_backbone, save_tiny_encoder


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("backbone") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("backbone") / "gpt2", "gpt2")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("encoder") / "enc", dim=16)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    # Documents separated by blank lines; each long enough for a few 16-token chunks.
    path.write_text("\n\n".join(" ".join(DOCS[i:] + DOCS[:i]) for i in range(len(DOCS))) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_core_dir(tmp_path_factory, tiny_backbone_dir, tiny_encoder_dir):
    """A randomly initialised tiny core saved like a trained one."""
    import torch

    from starctl.assets import load_backbone
    from starctl.model import StarConfig, StarCore

    torch.manual_seed(0)
    backbone, tok = load_backbone(str(tiny_backbone_dir))
    cfg = StarConfig(backbone=str(tiny_backbone_dir), encoder=str(tiny_encoder_dir), latent_dim=16, width=32,
                     num_heads=2, generator_depth=1, head_depth=1, vocab_size=40, num_slots=4,
                     latent_mean=0.01, latent_std=0.2)
    core = StarCore(cfg, backbone, tok)
    with torch.no_grad():
        core.generator.vocab_ids.copy_(torch.arange(10, 50))
    folder = tmp_path_factory.mktemp("core") / "tiny-core"
    core.save_pretrained(folder)
    return folder
