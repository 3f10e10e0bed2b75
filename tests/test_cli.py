"""CLI: bad input gives one `error:` line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from starctl.cli import app

runner = CliRunner()


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("generate", "train", "eval", "attributes", "train-attribute"):
        assert cmd in result.output


def test_missing_checkpoint():
    assert_user_error(runner.invoke(app, ["generate", "Hello", "--core", "/nonexistent/core"]), "not found")


def test_corrupt_checkpoint(tmp_path, tiny_core_dir):
    bad = tmp_path / "core"
    shutil.copytree(tiny_core_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_user_error(runner.invoke(app, ["generate", "Hello", "--core", str(bad)]), "corrupt")
    (bad / "config.json").write_text("{ nope")
    assert_user_error(runner.invoke(app, ["generate", "Hello", "--core", str(bad)]), "corrupt")


def test_unknown_backbone_and_encoder(tmp_path, tiny_core_dir):
    for key, name in (("backbone", "no-such-backbone-xyz"), ("encoder", "no-such-encoder-xyz")):
        bad = tmp_path / key
        shutil.copytree(tiny_core_dir, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[key] = name
        (bad / "config.json").write_text(json.dumps(cfg))
        if key == "backbone":
            assert_user_error(runner.invoke(app, ["generate", "Hello", "--core", str(bad)]), name)
        recipe = tmp_path / f"{key}.json"
        recipe.write_text(json.dumps({"core": {key: name}, "output_dir": str(tmp_path / f"run-{key}")}))
        assert_user_error(runner.invoke(app, ["train", "--recipe", str(recipe)]), name)


def test_empty_prompt(tiny_core_dir):
    assert_user_error(runner.invoke(app, ["generate", "", "--core", str(tiny_core_dir)]), "empty prompt")


def test_prompt_longer_than_context(tiny_core_dir):
    assert_user_error(runner.invoke(app, ["generate", "word " * 400, "--core", str(tiny_core_dir)]), "context")


def test_steps_below_one(tiny_core_dir):
    assert_user_error(runner.invoke(app, ["generate", "Hi", "--steps", "0", "--core", str(tiny_core_dir)]), "steps")


def test_unreadable_recipe(tmp_path):
    assert_user_error(runner.invoke(app, ["train", "--recipe", str(tmp_path / "missing.json")]), "recipe")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    assert_user_error(runner.invoke(app, ["train", "--recipe", str(bad)]), "not valid JSON")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"stepz": 3}))
    assert_user_error(runner.invoke(app, ["train", "--recipe", str(unknown)]), "stepz")


def test_generate_json_output(tiny_core_dir):
    result = runner.invoke(app, ["generate", "The movie was", "Hello", "--core", str(tiny_core_dir), "--steps", "2",
                                 "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["The movie was", "Hello"]
    for r in rows:
        assert isinstance(r["continuation"], str) and r["seconds"] > 0
