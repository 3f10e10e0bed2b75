"""The Gradio demo on the tiny core: the Generate handler, a live server through gradio_client
(one call, bad input, five parallel calls), and the page in headless Chromium (offline)."""

from __future__ import annotations

import csv
import re
import shutil
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from demo.app import DEFAULT_CONCURRENCY, build_app, launch, offline_theme, steerable_attributes  # noqa: E402
from starctl import attributes  # noqa: E402
from starctl.api import Star  # noqa: E402
from starctl.attributes import ENTRY_POINT_GROUP, train_attribute  # noqa: E402
from tiny import DOCS  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", None, ""}
FAST = dict(steps=3, max_new_tokens=6)          # per-request options small enough for ~0.1 s calls
MOOD = ["negative", "positive"]                  # head label order is sorted
GENRE = ["film", "other", "sport"]


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def mood_rows():
    good = ("wonderful", "great", "won", "new")
    return [(f"{doc} ({i})", "positive" if any(w in doc for w in good) else "negative") for i, doc in enumerate(DOCS)]


def genre_rows():
    def tag(doc):
        return "film" if any(w in doc for w in ("movie", "film", "singer")) else "sport" if "team" in doc else "other"
    return [(f"{doc} [{i}]", tag(doc)) for i, doc in enumerate(DOCS)]


@pytest.fixture(scope="module")
def star(tmp_path_factory, tiny_core_dir, tiny_encoder_dir):
    """The tiny core with two user heads trained here (mood: positive/negative; genre: three
    labels), an empty built-in folder and no plugins; torch on one thread (a shared 2-core box)."""
    from starctl.assets import load_encoder

    home = tmp_path_factory.mktemp("demo-home")
    real_entry_points = attributes.importlib.metadata.entry_points

    def entry_points(group=None, **kw):
        return [] if group == ENTRY_POINT_GROUP else real_entry_points(group=group, **kw)

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STARCTL_HOME", str(home / "home"))
        mp.setenv("STARCTL_ATTRIBUTES", str(home / "no-builtins"))
        mp.setattr(attributes.importlib.metadata, "entry_points", entry_points)
        torch.set_num_threads(1)
        s = Star.load(tiny_core_dir, device="cpu")
        encoder = load_encoder(str(tiny_encoder_dir))
        kw = dict(latent_space=s.latent_space, encoder=encoder, epochs=2, batch_size=8, width=16, depth=1,
                  min_per_class=2, heldout_fraction=0.3, probe=False)
        train_attribute("mood", str(write_csv(home / "mood.csv", mood_rows())), **kw)
        train_attribute("genre", str(write_csv(home / "genre.csv", genre_rows())), **kw)
        yield s
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def app(star):
    return build_app(star)


def zeros(app, **set_):
    """Slider values for `app`'s handler, all 0 but those named as attribute_label=value."""
    return [set_.get(f"{k.attribute}_{k.label}", 0.0) for k in app.generate_handler.sliders]


def call(app, prompt, seed=0, num_samples=1, **sliders):
    return app.generate_handler(prompt, FAST["steps"], FAST["max_new_tokens"], num_samples, seed, *zeros(app, **sliders))


# --- layout and the handler, called directly ----------------------------------------------------

def enclosing_accordion(block):
    while block is not None and not isinstance(block, gr.Accordion):
        block = block.parent
    return block


def test_a_slider_per_label_grouped_by_attribute(star, app):
    assert [a.name for a in steerable_attributes(star)] == ["genre", "mood"]
    keys = [(k.attribute, k.label) for k in app.generate_handler.sliders]
    assert keys == [("genre", lab) for lab in GENRE] + [("mood", lab) for lab in MOOD]
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    for attr, label in keys:
        slider = by_id[f"steer-{attr}-{label}"]
        assert isinstance(slider, gr.Slider) and (slider.minimum, slider.maximum, slider.step, slider.value) == (-1, 1, 0.05, 0)
        assert slider.label == label
    accordions = {b.label: b for b in app.blocks.values() if isinstance(b, gr.Accordion)}
    assert set(accordions) == {"genre", "mood"}
    for attr, label in keys:  # each slider sits inside its attribute's accordion
        assert enclosing_accordion(by_id[f"steer-{attr}-{label}"]) is accordions[attr]
    for name in ("steps", "max-new-tokens", "num-samples", "seed", "generate", "prompt"):
        assert name in by_id
    deps = [d for d in app.config["dependencies"] if d.get("api_name") == "generate"]
    assert len(deps) == 1 and app.fns[deps[0]["id"]].concurrency_limit == "default"
    assert app._queue.default_concurrency_limit == DEFAULT_CONCURRENCY == 2
    assert app.analytics_enabled is False


def test_handler_outputs_continuations_probabilities_and_timing(star, app):
    text, table, timing = call(app, "The movie was", seed=3, num_samples=2, mood_positive=0.8)
    assert re.fullmatch(r"\[1\] The movie was.*\n\n\[2\] The movie was.*", text, flags=re.S)
    assert list(table.columns) == ["sample"] + [f"genre: {g}" for g in GENRE] + [f"mood: {m}" for m in MOOD]
    assert table.shape == (2, 6) and list(table["sample"]) == [1, 2]
    for _, row in table.iterrows():
        assert sum(row[f"genre: {g}"] for g in GENRE) == pytest.approx(1, abs=1e-3)
        assert sum(row[f"mood: {m}"] for m in MOOD) == pytest.approx(1, abs=1e-3)
    assert re.fullmatch(r"thinking \d+\.\d\d s, writing \d+\.\d\d s, total \d+\.\d\d s \(2 samples, \d+ new tokens\)", timing)
    # a thin face: exactly what the library gives for the same request
    outs, _ = star.generate(["The movie was"], steer={"mood:positive": 0.8}, report=["genre", "mood"],
                            num_samples=2, seed=3, **FAST)
    assert text == "\n\n".join(f"[{o.sample + 1}] {o.prompt}{o.continuation}" for o in outs)
    for o, (_, row) in zip(outs, table.iterrows()):
        assert row["mood: positive"] == pytest.approx(o.probabilities["mood"]["positive"], abs=1e-4)
        assert row["genre: sport"] == pytest.approx(o.probabilities["genre"]["sport"], abs=1e-4)


def test_sliders_steer_the_plan(app):
    def p_positive(strength):
        _, table, _ = call(app, "The team", seed=1, num_samples=4, mood_positive=strength)
        return table["mood: positive"].mean()

    assert p_positive(1.0) > p_positive(0.0) > p_positive(-1.0)


@pytest.mark.parametrize("prompt, sliders, message", [
    ("", {}, "empty prompt: give some text to continue"),
    ("   ", {"mood_positive": 0.5}, "empty prompt"),
    ("The film", {"mood_positive": 1.0, "mood_negative": 1.0},
     "are both labels of the binary attribute 'mood': steer one of them"),
])
def test_bad_input_is_a_one_line_gradio_error(app, prompt, sliders, message):
    with pytest.raises(gr.Error) as info:
        call(app, prompt, **sliders)
    assert message in info.value.message and "\n" not in info.value.message


def test_two_labels_of_a_multiclass_attribute_are_fine(app):
    text, table, _ = call(app, "The film", genre_film=0.5, genre_sport=-0.5)
    assert text.startswith("[1] The film") and table.shape == (1, 6)


def test_no_fitting_head_still_builds(star):
    empty = build_app(star, attributes=[])
    text, table, _ = empty.generate_handler("The movie was", 2, 4, 1, 0)
    assert text.startswith("[1] The movie was") and list(table.columns) == ["sample"]


def test_offline_theme_names_system_fonts_only():
    from gradio.themes.utils import fonts

    theme = offline_theme()
    assert not any(isinstance(f, (fonts.GoogleFont, fonts.LocalFont)) for f in theme._font + theme._font_mono)


def test_cli_demo_command_serves_on_localhost_by_default(star, tiny_core_dir, monkeypatch):
    from typer.testing import CliRunner

    import demo.app
    from starctl.cli import app as cli

    seen = {}

    def fake_launch(blocks, host="127.0.0.1", port=7860, **options):
        seen.update(host=host, port=port, sliders=[k.steer for k in blocks.generate_handler.sliders])

    monkeypatch.setattr(demo.app, "launch", fake_launch)
    result = CliRunner().invoke(cli, ["demo", "--core", str(tiny_core_dir)])
    assert result.exit_code == 0, result.output
    assert seen == {"host": "127.0.0.1", "port": 7860,
                    "sliders": [f"genre:{g}" for g in GENRE] + [f"mood:{m}" for m in MOOD]}
    result = CliRunner().invoke(cli, ["demo", "--host", "0.0.0.0", "--port", "7999", "--core", str(tiny_core_dir)])
    assert result.exit_code == 0 and (seen["host"], seen["port"]) == ("0.0.0.0", 7999)
    bad = CliRunner().invoke(cli, ["demo", "--core", "/nonexistent/core"])
    lines = [line for line in bad.output.strip().splitlines() if line.strip()]
    assert bad.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), bad.output


# --- a live server ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    """The demo served on a free port of 127.0.0.1; records every host name looked up meanwhile."""
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kw):
        lookups.append(host if isinstance(host, str) else repr(host))
        return real(host, *args, **kw)

    from huggingface_hub import constants as hf_constants

    with pytest.MonkeyPatch.context() as mp:
        # gradio_client (the test's side, not the demo's) would ask huggingface.co for its
        # agent registry and send telemetry: keep the client offline too.
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        mp.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        _, url, _ = launch(app, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
        try:
            yield url.rstrip("/"), lookups
        finally:
            app.close()


def assert_local_only(lookups):
    assert {h for h in lookups if h not in LOCAL_HOSTS} == set(), lookups


def client_for(url):
    return gradio_client.Client(url, verbose=False, download_files=False)


def test_live_server_answers_generate(app, server):
    url, lookups = server
    assert urlparse(url).hostname == "127.0.0.1"
    client = client_for(url)
    text, table, timing = client.predict("The movie was", 3, 6, 1, 0, *zeros(app, mood_positive=0.5),
                                         api_name="/generate")
    want_text, want_table, _ = call(app, "The movie was", mood_positive=0.5)
    assert text == want_text and timing.startswith("thinking ")
    assert table["headers"] == list(want_table.columns)
    assert table["data"][0][1:] == pytest.approx(list(want_table.iloc[0])[1:], abs=1e-6)
    # bad input: a readable message, and the server keeps serving
    with pytest.raises(Exception, match="both labels of the binary attribute 'mood'"):
        client.predict("The film", 3, 6, 1, 0, *zeros(app, mood_positive=1, mood_negative=1), api_name="/generate")
    with pytest.raises(Exception, match="empty prompt"):
        client.predict("", 3, 6, 1, 0, *zeros(app), api_name="/generate")
    again, _, _ = client.predict("The movie was", 3, 6, 1, 0, *zeros(app, mood_positive=0.5), api_name="/generate")
    assert again == want_text
    client.close()
    assert_local_only(lookups)


def test_five_parallel_requests_are_independent(app, server):
    url, lookups = server
    jobs = [(f"{DOCS[i].split()[0]} {DOCS[i].split()[1]} number {i}", i, 0.2 * (i - 2)) for i in range(5)]
    sequential = {p: call(app, p, seed=seed, mood_positive=s) for p, seed, s in jobs}
    barrier = threading.Barrier(len(jobs))

    def one(job):
        prompt, seed, strength = job
        client = client_for(url)
        barrier.wait(timeout=30)  # all five hit the queue together
        try:
            return prompt, client.predict(prompt, 3, 6, 1, seed, *zeros(app, mood_positive=strength),
                                          api_name="/generate")
        finally:
            client.close()

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    for prompt, (text, table, _) in answers:
        want_text, want_table, _ = sequential[prompt]
        assert text.startswith(f"[1] {prompt}") and text == want_text
        assert table["data"][0][1:] == pytest.approx(list(want_table.iloc[0])[1:], abs=1e-5)
    assert_local_only(lookups)


# --- the page in headless Chromium ---------------------------------------------------------------

def set_slider(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"headless browser test needs {CHROMIUM}")
def test_page_in_headless_chromium(app, server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, lookups = server
    off_host: list[str] = []
    local: list[str] = []

    def only_local(route):
        if urlparse(route.request.url).hostname in LOCAL_HOSTS:
            local.append(route.request.url)
            route.continue_()
        else:
            off_host.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.route("**/*", only_local)
            page.goto(url, wait_until="networkidle")
            page.locator("#prompt textarea").fill("The movie was")
            set_slider(page, "steps", FAST["steps"])
            set_slider(page, "max-new-tokens", FAST["max_new_tokens"])
            set_slider(page, "steer-mood-positive", 0.8)
            sync_api.expect(page.locator("#steer-mood-positive input[type=range]")).to_have_value("0.8")
            page.locator("#generate").click()
            out = page.locator("#continuations textarea")
            sync_api.expect(out).to_have_value(re.compile(r"^\[1\] The movie was"), timeout=30_000)
            sync_api.expect(page.locator("#timing textarea")).to_have_value(re.compile(r"^thinking "))
            sync_api.expect(page.locator("#probabilities")).to_contain_text("mood: positive")
            want_text, _, _ = call(app, "The movie was", mood_positive=0.8)
            assert out.input_value() == want_text  # the slider's value reached the library
            shot = tmp_path / "demo-screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            (ROOT / "runs").mkdir(exist_ok=True)
            shutil.copy(shot, ROOT / "runs" / "demo-screenshot.png")

            # contradictory sliders: a readable message in the page, and the page keeps working
            set_slider(page, "steer-mood-negative", 1)
            set_slider(page, "steer-mood-positive", 1)
            page.locator("#generate").click()
            sync_api.expect(page.get_by_text(re.compile("both labels of the binary attribute 'mood'")).first
                            ).to_be_visible(timeout=30_000)
            assert "Traceback" not in page.content()
            set_slider(page, "steer-mood-negative", 0)
            set_slider(page, "steer-mood-positive", 0.5)
            page.locator("#seed input").fill("7")
            page.locator("#seed input").press("Enter")
            again, _, _ = call(app, "The movie was", seed=7, mood_positive=0.5)
            assert again != want_text
            page.locator("#generate").click()
            sync_api.expect(out).to_have_value(again, timeout=30_000)
        finally:
            browser.close()
    assert off_host == [] and len(local) > 5  # the page loaded, from this server only
    assert_local_only(lookups)
