"""The Gradio demo of starctl: a prompt, one slider per attribute label, live steering.

    starctl demo [--host 127.0.0.1] [--port 7860] [--core PATH]

A thin face over `starctl.api.Star`: every slider is a steer strength in [-1, 1] for one label
of an attribute whose head fits the core; the sliders left at 0 are not sent. Validation,
steering and generation all happen in the library; a `StarctlError` (an empty prompt, two labels
of a binary attribute at once, ...) is shown in the page as a one-line error and the server keeps
serving.

Offline by construction: analytics off, no server-side rendering, and a theme that names system
fonts only, so the page fetches nothing but what this server serves. It binds 127.0.0.1 unless
told otherwise. `Star` keeps no per-request state, so concurrent tabs get independent results;
the queue runs at most `DEFAULT_CONCURRENCY` generations at once so a small CPU does not thrash.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from starctl.api import Star  # noqa: E402
from starctl.attributes import AttributeInfo, list_attributes  # noqa: E402
from starctl.errors import StarctlError  # noqa: E402

__all__ = ["DEFAULT_CONCURRENCY", "GenerateHandler", "build_app", "launch", "main", "offline_theme",
           "steerable_attributes"]

DEFAULT_CONCURRENCY = 2
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif")
SYSTEM_MONO = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace")


def offline_theme() -> gr.themes.Base:
    """The default theme with system fonts only (no Google or bundled web fonts to fetch)."""
    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(SYSTEM_MONO))


def steerable_attributes(star: Star) -> list[AttributeInfo]:
    """The registered attributes with a head that fits the core, one per name (search order)."""
    out: dict[str, AttributeInfo] = {}
    for info in list_attributes(star.latent_space):
        if info.fits and info.problem is None and info.name not in out:
            out[info.name] = info
    return list(out.values())


@dataclass(frozen=True)
class SliderKey:
    attribute: str
    label: str

    @property
    def steer(self) -> str:
        """The qualified steer label (`attribute:label`), unambiguous when attributes share labels."""
        return f"{self.attribute}:{self.label}"

    @property
    def elem_id(self) -> str:
        return "steer-" + re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.attribute}-{self.label}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class GenerateHandler:
    """The Generate button: (prompt, steps, max new tokens, samples, seed, *slider values) ->
    (continuations text, probabilities table, timing text). Raises gr.Error for bad input."""

    def __init__(self, star: Star, attributes: list[AttributeInfo]):
        self.star = star
        self.attributes = list(attributes)
        self.sliders = [SliderKey(a.name, lab) for a in self.attributes for lab in a.labels]

    def steer(self, strengths) -> dict[str, float]:
        """Slider values -> {attribute:label: strength}, the sliders at 0 left out."""
        if len(strengths) != len(self.sliders):
            raise StarctlError(f"expected {len(self.sliders)} slider values, got {len(strengths)}")
        return {k.steer: float(v) for k, v in zip(self.sliders, strengths) if v is not None and float(v) != 0.0}

    def __call__(self, prompt: str, steps: float, max_new_tokens: float, num_samples: float,
                 seed: float | None, *strengths: float):
        try:
            outs, result = self.star.generate(
                [prompt or ""], steer=self.steer(strengths), report=[a.name for a in self.attributes],
                steps=int(steps), max_new_tokens=int(max_new_tokens), num_samples=int(num_samples),
                seed=None if seed is None else int(seed))
        except StarctlError as e:
            raise gr.Error(_one_line(e), print_exception=False) from None
        text = "\n\n".join(f"[{o.sample + 1}] {o.prompt}{o.continuation}" for o in outs)
        columns = ["sample"] + [f"{k.attribute}: {k.label}" for k in self.sliders]
        rows = [[o.sample + 1] + [round(o.probabilities.get(k.attribute, {}).get(k.label, float("nan")), 4)
                                  for k in self.sliders] for o in outs]
        table = pd.DataFrame(rows, columns=columns)
        n = len(outs)
        timing = (f"thinking {result.think_seconds:.2f} s, writing {result.write_seconds:.2f} s, "
                  f"total {result.seconds:.2f} s ({n} sample{'s' if n != 1 else ''}, "
                  f"{result.new_tokens} new tokens)")
        return text, table, timing


def build_app(star: Star, attributes: list[AttributeInfo] | None = None, *,
              concurrency: int = DEFAULT_CONCURRENCY, title: str = "starctl: steered generation") -> gr.Blocks:
    """The demo's Blocks (queued with `default_concurrency_limit=concurrency`).

    attributes: the attributes to show sliders for (default: `steerable_attributes(star)`).
    """
    attributes = steerable_attributes(star) if attributes is None else list(attributes)
    handler = GenerateHandler(star, attributes)
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown("## starctl: stop, think, autoregress\nWrite a prompt, move the sliders "
                    "(1 steers towards a label, -1 away from it, 0 leaves it alone), press Generate.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="The movie was", elem_id="prompt")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="Thinking steps", elem_id="steps")
                    max_new_tokens = gr.Slider(1, 256, value=64, step=1, label="Max new tokens",
                                               elem_id="max-new-tokens")
                with gr.Row():
                    num_samples = gr.Slider(1, 8, value=1, step=1, label="Samples", elem_id="num-samples")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                sliders = []
                if not attributes:
                    gr.Markdown("No attribute head fits this core: train one with "
                                "`starctl train-attribute NAME --data FILE --core CORE`.")
                for info in attributes:
                    with gr.Accordion(label=info.name, open=True, elem_id=f"attribute-{info.name}"):
                        if info.description or info.accuracy is not None:
                            acc = "" if info.accuracy is None else f" (held-out accuracy {info.accuracy:.2f})"
                            gr.Markdown(f"{info.description}{acc}")
                        for label in info.labels:
                            key = SliderKey(info.name, label)
                            sliders.append(gr.Slider(-1, 1, value=0, step=0.05, label=label, elem_id=key.elem_id))
        continuations = gr.Textbox(label="Continuations", lines=8, interactive=False, elem_id="continuations")
        probabilities = gr.Dataframe(label="Heads' probabilities of each final plan", interactive=False,
                                     elem_id="probabilities")
        timing = gr.Textbox(label="Time", interactive=False, elem_id="timing")
        button.click(handler, inputs=[prompt, steps, max_new_tokens, num_samples, seed, *sliders],
                     outputs=[continuations, probabilities, timing], api_name="generate")
    app.generate_handler = handler  # for tests and embedding
    return app.queue(default_concurrency_limit=concurrency)


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, **options):
    """Serve `app` offline-safe (system-font theme, no SSR, no share link, no MCP server).

    options pass to `Blocks.launch` (e.g. prevent_thread_lock=True, quiet=True).
    """
    kw = dict(server_name=host, server_port=port, theme=offline_theme(), ssr_mode=False, share=False,
              inbrowser=False, mcp_server=False, pwa=False, enable_monitoring=False)
    kw.update(options)
    return app.launch(**kw)


def main(host: str = "127.0.0.1", port: int = 7860, core: str | Path | None = None, device: str = "auto"):
    """Load the core (default: the bundled one) and serve the demo until interrupted."""
    star = Star.load(core, device=device)
    return launch(build_app(star), host=host, port=port)


if __name__ == "__main__":  # pragma: no cover
    main()
