"""Smoke test on the real bundled default core and heads (runs by default; a few seconds)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from starctl.api import Star, default_core_path
from starctl.cli import app


@pytest.fixture(scope="module")
def star():
    if not (default_core_path() / "config.json").is_file():
        pytest.fail(f"the bundled default core is missing at {default_core_path()}")
    return Star.load()


def test_default_core_generates_and_steers(star):
    outs, result = star.generate(["The movie was"], steer={"positive": 0.8}, steps=4, max_new_tokens=8, seed=0)
    assert len(outs) == 1 and outs[0].continuation.strip()
    probs = outs[0].probabilities["sentiment"]
    assert set(probs) == {"positive", "negative"} and abs(sum(probs.values()) - 1) < 1e-4
    assert result.think_seconds > 0 and result.write_seconds > 0


def test_builtin_heads_fit_the_default_core():
    result = CliRunner().invoke(app, ["attributes", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    for name in ("sentiment", "topic", "toxicity"):
        assert rows[name]["fits"], rows[name]
