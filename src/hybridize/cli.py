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


if __name__ == "__main__":
    app()
