"""`starctl`: the command-line face. It parses, calls the library, and formats; nothing else.

A `StarctlError` (bad input the user can fix) is printed on one line and exits with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import StarctlError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="STAR-LDM: stop, think (denoise a latent plan), autoregress. Steer with attribute heads.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate the core or steering.")
app.add_typer(eval_app, name="eval")
console = Console(stderr=True)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def run_guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except StarctlError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


@app.command()
def generate(
    prompts: list[str] = typer.Argument(..., help="One or more prompts to continue."),
    steps: int = typer.Option(20, help="DPM-Solver++ steps for each plan."),
    max_new_tokens: int = typer.Option(64, help="Tokens to write per sample."),
    num_samples: int = typer.Option(1, help="Samples per prompt."),
    seed: int = typer.Option(0, help="Random seed (noise and sampling)."),
    plan_every: Optional[str] = typer.Option(None, help="Re-plan every N tokens, or 'sentence'."),
    steer: list[str] = typer.Option([], help="LABEL=STRENGTH with strength in [-1, 1]; repeatable."),
    top_p: float = typer.Option(0.9),
    temperature: float = typer.Option(1.0),
    repetition_penalty: float = typer.Option(1.2),
    tolerance: Optional[float] = typer.Option(None, help="Adaptive thinking: stop once the relative plan change per unit log-SNR falls below this (about the relative plan error accepted, e.g. 0.03)."),
    reference_thinking: bool = typer.Option(False, help="Think the reference way (no cache, one example at a time)."),
    core: Optional[Path] = typer.Option(None, help="Core checkpoint folder (default: the bundled core)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line."),
):
    """Generate continuations: think a plan, then write, optionally steered."""
    from .api import Star
    from .generation import parse_plan_every
    from .steering import parse_steer_specs

    def work():
        steer_map = parse_steer_specs(steer)
        pe = parse_plan_every(plan_every)
        if steps < 1:
            raise StarctlError(f"steps must be >= 1, got {steps}")
        star = Star.load(core, device=device)
        return star.generate(prompts, steer=steer_map, steps=steps, max_new_tokens=max_new_tokens,
                             num_samples=num_samples, seed=seed, plan_every=pe, top_p=top_p,
                             temperature=temperature, repetition_penalty=repetition_penalty,
                             tolerance=tolerance, reference_thinking=reference_thinking)

    outs, result = run_guarded(work)
    for o in outs:
        if json_out:
            print(json.dumps({"prompt": o.prompt, "sample": o.sample, "continuation": o.continuation,
                              "seconds": round(result.seconds, 4), "think_seconds": round(result.think_seconds, 4),
                              "write_seconds": round(result.write_seconds, 4), "steps_used": o.steps_used,
                              "probabilities": o.probabilities}))
        else:
            print(f"{o.prompt}{o.continuation}")
            if o.probabilities:
                probs = "; ".join(f"{a}: " + ", ".join(f"{k} {v:.2f}" for k, v in d.items())
                                  for a, d in o.probabilities.items())
                console.print(f"[dim]plan: {probs}[/]")
            print()
    if not json_out:
        console.print(f"[dim]{len(outs)} samples in {result.seconds:.2f} s "
                      f"(thinking {result.think_seconds:.2f} s, writing {result.write_seconds:.2f} s)[/]")


@app.command()
def train(
    recipe: Path = typer.Option(..., help="Recipe JSON (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: key.sub=value (JSON)."),
    output_dir: Optional[str] = typer.Option(None, help="Run folder (overrides the recipe's)."),
):
    """Train a core (resumes automatically from the run folder's checkpoint)."""
    from .training import Trainer, load_recipe

    def work():
        cfg = load_recipe(recipe, set_)
        if output_dir:
            cfg.output_dir = output_dir
        return Trainer(cfg, console=console).run()

    final = run_guarded(work)
    print(final)


@app.command("attributes")
def attributes_cmd(
    core: Optional[Path] = typer.Option(None, help="Core whose latent space heads must fit."),
    json_out: bool = typer.Option(False, "--json"),
):
    """List attributes: labels, held-out accuracy, and whether each head fits the core."""
    from .api import default_core_path
    from .attributes import list_attributes
    from .model import read_checkpoint

    def work():
        config, _ = read_checkpoint(core or default_core_path())
        return list_attributes(config.latent_space)

    infos = run_guarded(work)
    if json_out:
        print(json.dumps([i.to_dict() for i in infos]))
        return
    from rich.table import Table

    table = Table("attribute", "labels", "held-out acc.", "source", "fits core")
    for i in infos:
        acc = "-" if i.accuracy is None else f"{i.accuracy:.3f}"
        table.add_row(i.name, ", ".join(i.labels), acc, i.source, "yes" if i.fits else "no")
    Console().print(table)


@app.command("train-attribute")
def train_attribute_cmd(
    name: str = typer.Argument(..., help="Attribute name (built-in: sentiment, topic, toxicity; or a new one)."),
    data: Optional[str] = typer.Option(None, help="CSV/JSONL/parquet file or datasets id (required for a new attribute)."),
    text_col: str = typer.Option("text"),
    label_col: str = typer.Option("label"),
    output: Optional[Path] = typer.Option(None, help="Head folder to write."),
    core: Optional[Path] = typer.Option(None, help="Core whose latent space the head is trained in."),
    epochs: int = typer.Option(10),
):
    """Train an attribute head on latents of labelled text (never touches the backbone)."""
    from .api import default_core_path
    from .attributes import train_attribute
    from .model import read_checkpoint

    from rich.progress import Progress

    def work():
        config, _ = read_checkpoint(core or default_core_path())
        with Progress(console=console) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            return train_attribute(name, data=data, text_col=text_col, label_col=label_col,
                                   latent_space=config.latent_space, output=output, epochs=epochs,
                                   progress=progress)

    folder, report = run_guarded(work)
    console.print(report.table(), highlight=False)
    print(folder)


@eval_app.command("core")
def eval_core_cmd(
    core: Optional[Path] = typer.Option(None, help="Core checkpoint folder (default: the bundled core)."),
    quick: bool = typer.Option(False, help="Smaller sample: same keys, under 10 minutes on 2 cores."),
    out_dir: Path = typer.Option(Path("runs/eval-core"), help="Where eval-core.json and steps-curve.png go."),
    judge: str = typer.Option("gemma3-270m", help="Independent LM that judges fluency."),
    device: str = typer.Option("auto"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object (last line)."),
):
    """Plan gain, planner quality, steps curve and judged fluency of a core on held-out text."""
    from .api import Star
    from .evaluation import EvalSettings, evaluate_core

    def work():
        star = Star.load(core, device=device)
        settings = EvalSettings.quick() if quick else EvalSettings()
        settings.judge = judge
        return evaluate_core(star.core, settings, out_dir, log=lambda m: console.print(m, highlight=False))

    result = run_guarded(work)
    if json_out:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k not in ("samples", "steps_curve"):
                print(f"{k:22s} {v:.4f}" if isinstance(v, float) else f"{k:22s} {v}")


@app.command("demo")
def demo_cmd(
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, help="Port to serve on."),
    core: Optional[Path] = typer.Option(None, help="Core checkpoint folder (default: the bundled core)."),
):
    """Serve the Gradio demo: a prompt, a slider per attribute label, live steering."""

    def work():
        try:
            from demo.app import main as demo_main
        except ModuleNotFoundError as e:
            if e.name in ("gradio", "pandas"):
                raise StarctlError(f"the demo needs {e.name}: pip install 'starctl[demo]'") from None
            root = Path(__file__).resolve().parent.parent  # the demo/ folder sits beside the package
            if not (root / "demo" / "app.py").is_file():
                raise StarctlError("the demo is not installed (demo/app.py ships with the repository)") from None
            sys.path.insert(0, str(root))
            sys.modules.pop("demo", None)
            from demo.app import main as demo_main
        return demo_main(host=host, port=port, core=core)

    run_guarded(work)


@eval_app.command("steer")
def eval_steer_cmd(
    core: Optional[Path] = typer.Option(None, help="Core checkpoint folder (default: the bundled core)."),
    quick: bool = typer.Option(False, help="Fewer prompts, samples and strengths."),
    out_dir: Path = typer.Option(Path("runs/eval-steer"), help="Where eval-steer.json and steer-sweep.png go."),
    judge: str = typer.Option("gemma3-270m", help="Independent LM that judges fluency."),
    device: str = typer.Option("auto"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object (last line)."),
):
    """On-target rates of steered generation under independent judges, with judged fluency."""
    from .api import Star
    from .steer_eval import SteerEvalSettings, evaluate_steering

    def work():
        star = Star.load(core, device=device)
        settings = SteerEvalSettings.quick() if quick else SteerEvalSettings()
        settings.judge = judge
        return evaluate_steering(star, settings, out_dir, log=lambda m: console.print(m, highlight=False))

    result = run_guarded(work)
    if json_out:
        print(json.dumps(result))


@app.command("encode")
def encode_cmd(
    recipe: Path = typer.Option(..., help="Recipe JSON whose chunks to encode."),
    output: Path = typer.Option(..., help="Folder to write (train with --set data.encoded=FOLDER)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: key.sub=value (JSON)."),
    max_chunks: Optional[int] = typer.Option(None, help="Training chunks to encode (required when streaming)."),
    batch_size: int = typer.Option(64, help="Encoder batch size."),
):
    """Precompute the plan embeddings of a recipe's chunks; shards across `accelerate launch` processes."""
    from .encode import encode_corpus
    from .training import load_recipe

    def work():
        cfg = load_recipe(recipe, set_)
        return encode_corpus(cfg, output, max_chunks=max_chunks, batch_size=batch_size,
                             log=lambda m: console.print(m, highlight=False))

    print(run_guarded(work))


@app.command("bench")
def bench_cmd(
    core: Optional[Path] = typer.Option(None, help="Core checkpoint folder (default: the bundled core)."),
    quick: bool = typer.Option(False, help="A subset of the grid that finishes in under 3 minutes on 2 cores."),
    out_dir: Path = typer.Option(Path("runs/bench"), help="Where bench.json, bench.md and bench.png go."),
    device: str = typer.Option("auto"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object (last line)."),
):
    """Speed: plain decoding vs STAR-LDM (unsteered, 1 and 3 attributes) vs reference-style thinking."""
    from .bench import run_bench

    result = run_guarded(run_bench, core, quick=quick, out_dir=out_dir, device=device,
                         log=lambda m: console.print(m, highlight=False))
    if json_out:
        print(json.dumps(result))


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
