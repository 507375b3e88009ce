"""The `hybridize` command line: parses, validates, calls the Python API, prints. No logic of its own."""

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from hybridize.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Retrofit fast inference onto transformer LLMs.")
console = Console()


def user_errors(command):
    """Report a UserError as one sentence on stderr with exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def _parse_layers(text: Optional[str]):
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--layers must be comma-separated layer indices, got {text!r}") from None


@app.command()
@user_errors
def inspect(
    model: str = typer.Argument(..., help="Model directory, .gguf file or built-in name (smollm2-135m)."),
    context: int = typer.Option(8192, help="Context length for the per-step speed-up estimate."),
    output_len: int = typer.Option(16384, help="Output length of the throughput scenario (1 input token)."),
    memory_gb: float = typer.Option(80.0, help="GPU memory for the max-batch estimate."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
):
    """Per-layer mixers and parameters, cache sizes, and the roofline decode speed-up."""
    from hybridize.convert.describe import describe
    from hybridize.convert.teacher import load_teacher

    loaded, _ = load_teacher(model)
    report = describe(loaded, context=context, output_len=output_len, memory=memory_gb * 1e9)
    table = Table(title=f"{model} ({report['model_type']}, {report['parameters'] / 1e6:.1f}M parameters)")
    for column in ("layer", "mixer", "parameters"):
        table.add_column(column, justify="right")
    for layer in report["layers"]:
        table.add_row(str(layer["index"]), layer["mixer"], f"{layer['parameters']:,}")
    console.print(table)
    console.print(f"KV cache: {report['kv_bytes_per_token']:,} bytes/token (bf16); "
                  f"recurrent state: {report['recurrent_bytes_per_sequence']:,} bytes/sequence")
    console.print(f"decode step at context {context}, batch 1: {report['step_speedup_batch1']:.2f}x "
                  "fewer bytes than all-attention")
    roof = report["roofline"]
    if roof:
        console.print(f"roofline throughput ratio vs all-attention (1 in / {output_len} out, {memory_gb:g} GB): "
                      f"{roof['ratio']:.2f}x (max batch {roof['hybrid_batch']} vs {roof['teacher_batch']})")
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


@app.command()
@user_errors
def convert(
    teacher: str = typer.Option(..., help="Teacher: model directory, .gguf file, hybrid checkpoint or built-in name."),
    out: Path = typer.Option(..., help="Output checkpoint directory."),
    layers: Optional[str] = typer.Option(None, help="Explicit layer indices to convert, e.g. 3,5,7."),
    count: Optional[int] = typer.Option(None, help="Total number of mixer layers."),
    fraction: Optional[float] = typer.Option(None, help="Fraction of layers to turn into mixers."),
    ranking: Optional[Path] = typer.Option(None, help="Importance JSON; least important layers convert first."),
    mixer: str = typer.Option("mamba", help="Mixer type."),
    mil_layout: str = typer.Option("apriel", help="MIL init layout: apriel or aligned."),
    mixer_init: str = typer.Option("mil", help="mil (from attention weights) or random."),
    dtype: str = typer.Option("float32", help="Saved dtype: float32, bfloat16 or float16."),
    seed: int = typer.Option(0, help="Seed of the fresh parameters."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
):
    """Replace attention layers of a teacher by MIL-initialised mixers and save the hybrid."""
    from hybridize.convert import convert as convert_model

    model = convert_model(teacher, out, layers=_parse_layers(layers), count=count, fraction=fraction,
                          ranking=ranking, mixer=mixer, mil_layout=mil_layout, mixer_init=mixer_init,
                          dtype=dtype, overwrite=overwrite, seed=seed)
    console.print(f"saved {out}: mixer layers {model.config.mixer_layers}")


@app.command()
@user_errors
def generate(
    model: str = typer.Argument(..., help="Model directory, .gguf file or built-in name."),
    prompt: list[str] = typer.Option(..., help="A user message; repeat for a batch."),
    max_new_tokens: int = typer.Option(48),
):
    """Greedy chat completion of one or more prompts (batched, left-padded)."""
    from hybridize.convert.teacher import load_teacher
    from hybridize.evaluate.generate import generate_texts

    loaded, tokenizer = load_teacher(model)
    for text, completion in zip(prompt, generate_texts(loaded, tokenizer, prompt, max_new_tokens)):
        console.print(f"[bold]> {text}[/bold]\n{completion}\n")


data_app = typer.Typer(no_args_is_help=True, help="Built-in reasoning tasks and teacher traces.")
importance_app = typer.Typer(no_args_is_help=True, help="Rank layers by importance (LOO, MMR).")
app.add_typer(data_app, name="data")
app.add_typer(importance_app, name="importance")


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@data_app.command("synth")
@user_errors
def data_synth(
    task: str = typer.Option(..., help="arithmetic, variable_tracking or multi_digit."),
    n: int = typer.Option(..., help="Number of problems."),
    out: Path = typer.Option(..., help="Output JSONL."),
    seed: int = typer.Option(0),
    split: str = typer.Option("train", help="train or test (never share a problem)."),
    knob: list[str] = typer.Option([], help="Difficulty knob NAME=INT, e.g. steps=5, chain=6, digits=4."),
):
    """Write verifiable reasoning problems with step-by-step solutions, as chat rows."""
    from hybridize.data.synthetic import synthesize, write_jsonl

    knobs = {}
    for item in knob:
        name, _, value = item.partition("=")
        try:
            knobs[name] = int(value)
        except ValueError:
            raise UserError(f"--knob must be NAME=INTEGER, got {item!r}") from None
    try:
        rows = synthesize(task, n, seed=seed, split=split, **knobs)
    except ValueError as error:
        raise UserError(str(error)) from None
    write_jsonl(rows, out)
    console.print(f"wrote {len(rows)} {task} problems ({split}) to {out}")


@data_app.command("generate")
@user_errors
def data_generate(
    teacher: str = typer.Option(..., help="Teacher that writes the traces."),
    prompts: Path = typer.Option(..., help="JSONL of chat rows with an `answer` (e.g. from `data synth`)."),
    out: Path = typer.Option(..., help="Output JSONL of verified traces."),
    n_per_prompt: int = typer.Option(1),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.95),
    max_new_tokens: int = typer.Option(512),
    batch_size: int = typer.Option(16),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
):
    """Sample the teacher's own solutions and keep only those whose answer verifies."""
    from hybridize.convert.teacher import load_teacher
    from hybridize.data.traces import write_traces

    model, tokenizer = load_teacher(teacher, device=_device())
    try:
        stats = write_traces(model, tokenizer, prompts, out, overwrite=overwrite, n_per_prompt=n_per_prompt,
                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, seed=seed)
    except ValueError as error:
        raise UserError(str(error)) from None
    console.print_json(data=stats)


@importance_app.command("loo")
@user_errors
def importance_loo(
    teacher: str = typer.Option(..., help="Model to rank: teacher or hybrid."),
    data: str = typer.Option("synthetic", help="Held-out data: a file, or synthetic[:task,...]."),
    out: Path = typer.Option(Path("ranking.json"), help="Output JSON (a PNG chart is written beside it)."),
    scope: str = typer.Option("block", help="block (whole layer, as in Apriel-H1) or mixer (MLP kept)."),
    metric: str = typer.Option("kl", help="kl (vs the unablated model) or ce (on the data's labels)."),
    rows: int = typer.Option(16, help="Held-out rows."),
    window: int = typer.Option(512, help="Packed window length in tokens."),
):
    """Leave-one-out importance: score each layer by the damage its removal does; least important first."""
    from hybridize.importance import run_loo

    try:
        result, (json_path, png) = run_loo(teacher, data, out, scope=scope, metric=metric, rows=rows, window=window)
    except ValueError as error:
        raise UserError(str(error)) from None
    console.print(f"ranking (least important first): {result['ranking']}")
    console.print(f"{result['tokens']} tokens in {result['seconds']} s; wrote {json_path} and {png}")


@importance_app.command("mmr")
@user_errors
def importance_mmr(
    teacher: str = typer.Option(..., help="The teacher distilled from."),
    student: str = typer.Option(..., help="The current hybrid checkpoint."),
    data: str = typer.Option("synthetic", help="Probe training data: a file, or synthetic[:task,...]."),
    out: Path = typer.Option(Path("mmr.json"), help="Output JSON (a PNG chart is written beside it)."),
    probe_steps: int = typer.Option(100, help="Distillation steps per probe."),
    seq_len: int = typer.Option(512),
    micro_batch_size: int = typer.Option(4),
    lr: float = typer.Option(1e-4),
    mil_layout: str = typer.Option("apriel"),
):
    """MMR: probe a mixer at each remaining attention layer; lowest final loss converts first."""
    from hybridize.importance import run_mmr

    result, (json_path, png) = run_mmr(teacher, student, data, out, probe_steps=probe_steps, seq_len=seq_len,
                                       micro_batch_size=micro_batch_size, lr=lr, mil_layout=mil_layout)
    console.print(f"ranking (cheapest to convert first): {result['ranking']}; wrote {json_path} and {png}")


@app.command()
@user_errors
def distill(
    teacher: str = typer.Option(..., help="Teacher model."),
    student: str = typer.Option(..., help="Hybrid checkpoint to train (from `convert`)."),
    data: str = typer.Option("synthetic", help="Training rows: a file, or synthetic[:task,...]."),
    out: Path = typer.Option(..., help="Output checkpoint directory."),
    loss: str = typer.Option("reverse_kl", help="reverse_kl, forward_kl, jsd, ce, or a sum such as reverse_kl+ce."),
    steps: Optional[int] = typer.Option(None),
    tokens: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    seq_len: Optional[int] = typer.Option(None),
    micro_batch_size: Optional[int] = typer.Option(None),
    grad_accum: Optional[int] = typer.Option(None),
    warmup_steps: Optional[int] = typer.Option(None),
    freeze: Optional[str] = typer.Option(None, help="none, or non_mixers (train only the Mamba mixers)."),
    save_every: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    overwrite: bool = typer.Option(False),
):
    """One distillation stage: train a hybrid on the teacher's distribution; resumable, torchrun-ready."""
    from hybridize.distill.runner import distill_stage

    options = dict(steps=steps, tokens=tokens, lr=lr, seq_len=seq_len, micro_batch_size=micro_batch_size,
                   grad_accum=grad_accum, warmup_steps=warmup_steps, freeze=freeze, save_every=save_every, seed=seed)
    result = distill_stage(teacher, student, data, out, loss=loss, overwrite=overwrite, **options)
    console.print(f"{result.steps} steps, {result.tokens:,} tokens, final loss {result.final_loss:.4f}; saved {out}")


@app.command()
@user_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    out: Path = typer.Option(..., help="Run directory; the same command on it resumes."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field: stages.1.train.lr=1e-4."),
):
    """Every stage of a recipe: select layers, convert, distil, evaluate; then the report."""
    from hybridize.distill.runner import run as run_recipe

    paths = run_recipe(recipe, out, set_)
    if paths:
        console.print(f"done: {paths[0]} and {paths[1]}")


@app.command("eval")
@user_errors
def eval_command(
    model: str = typer.Argument(..., help="Model directory, .gguf, hybrid checkpoint or built-in name."),
    data: str = typer.Option("synthetic", help="Rows with answers: a file, or synthetic[:task,...]."),
    teacher: Optional[str] = typer.Option(None, help="Also teacher-forced KL, perplexity and agreement."),
    out: Optional[Path] = typer.Option(None, help="JSON output."),
    rows: Optional[int] = typer.Option(None, help="Evaluate at most this many rows."),
    max_new_tokens: int = typer.Option(256),
    batch_size: int = typer.Option(16),
):
    """Accuracy on verifiable problems, and how far the model is from its teacher."""
    from hybridize.convert.teacher import load_teacher
    from hybridize.data.sources import load_rows
    from hybridize.evaluate.evaluator import evaluate, format_table, save_result

    loaded, tokenizer = load_teacher(model, device=_device())
    teacher_model = teacher_tokenizer = None
    if teacher is not None:
        teacher_model, teacher_tokenizer = load_teacher(teacher, device=_device())
    result = evaluate(loaded, tokenizer, load_rows(data, rows, split="test"), teacher=teacher_model,
                      teacher_tokenizer=teacher_tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size)
    console.print(format_table(result))
    if out is not None:
        save_result(result, out)


@app.command("bench")
@user_errors
def bench_command(
    model: Optional[str] = typer.Argument(None, help="Model directory, .gguf or built-in name (or use --shape)."),
    shape: Optional[str] = typer.Option(None, help="Random-weight preset: apriel-15b, llama3-8b, smollm2-135m."),
    teacher: Optional[str] = typer.Option(None, help="Teacher of a hybrid MODEL, measured in the same run."),
    mixer_layers: Optional[str] = typer.Option(None, help="Mixer-layer counts to measure, e.g. 25,30,40."),
    layout: Optional[Path] = typer.Option(None, help="layers.json naming the mixer layers."),
    input_len: int = typer.Option(1),
    output_len: int = typer.Option(16384),
    batch: str = typer.Option("auto", help="N, or auto: the most sequences whose caches fit."),
    mode: str = typer.Option("steady", help="full (every output token) or steady (decode at context I+O/2)."),
    stock: bool = typer.Option(True, "--stock/--no-stock", help="Also time stock transformers generate()."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
):
    """Decode throughput of teacher and hybrids in one engine, beside the roofline and the stock path."""
    from hybridize.bench.runner import bench
    from hybridize.bench.shapes import get_shape

    if (model is None) == (shape is None):
        raise UserError("give either MODEL or --shape")
    if batch != "auto" and not (batch.isdigit() and int(batch) > 0):
        raise UserError(f"--batch must be a positive integer or auto, got {batch!r}")
    bench(get_shape(shape) if shape else model, teacher=teacher, mixer_layers=_parse_layers(mixer_layers),
          layout=layout, input_len=input_len, output_len=output_len,
          batch="auto" if batch == "auto" else int(batch), mode=mode, include_stock=stock, json_path=json_out)


@app.command()
@user_errors
def report(run_dir: Path = typer.Argument(..., help="A run directory of `hybridize run`.")):
    """report.md (one row per checkpoint) and pareto.png (accuracy vs throughput) for a run."""
    from hybridize.report import build_report

    markdown, png = build_report(run_dir)
    console.print(markdown.read_text())
    console.print(f"wrote {markdown} and {png}")


if __name__ == "__main__":
    app()
