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
