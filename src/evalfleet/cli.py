"""The `evalfleet` command. Each command is a thin shell over the layer that does the work.

User mistakes raise `EvalfleetError`; `main` turns them into one sentence on stderr and
the error's exit code, never a traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from evalfleet.types import EvalfleetError, EvaluationRequest, UsageError, default_output_dir, describe_validation_error

app = typer.Typer(
    name="evalfleet",
    help="Evaluate language models at any scale: plan layouts, run evaluations, schedule jobs, monitor GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Evaluate language models at any scale: plan layouts, run evaluations, schedule jobs, monitor GPUs."""


def fail(message: str, code: int = 1) -> None:
    """Print one sentence on stderr and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


_FLAG_NAMES = {
    "tasks.limit": "--limit",
    "tasks.num_fewshot": "--num-fewshot",
    "tasks.names": "--tasks",
    "model.path": "--model",
    "model.dtype": "--dtype",
    "model.device": "--device",
    "batch_size": "--batch-size",
    "max_batch_tokens": "--max-batch-tokens",
}


def build_request(**fields: object) -> EvaluationRequest:
    """An EvaluationRequest from CLI values, or a UsageError naming the flag that is wrong."""
    from pydantic import ValidationError

    try:
        return EvaluationRequest.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        flag = _FLAG_NAMES.get(where)
        if flag is None:
            raise UsageError(describe_validation_error(error)) from None
        message = first.get("msg", "is invalid").removeprefix("Value error, ")
        raise UsageError(f"{flag}: {message[:1].lower()}{message[1:]}") from None


@app.command()
def run(
    model: str = typer.Option(..., "--model", help="Local model folder, 'demo' for the bundled demo model, or a hub id."),
    tasks: str = typer.Option("demo_mc,demo_arith", "--tasks", help="Comma-separated lm-eval task names."),
    include_path: str | None = typer.Option(None, "--include-path", help="Folder of extra lm-eval task YAML files."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N examples of each task."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", help="Few-shot examples per prompt."),
    engine: str = typer.Option("auto", "--engine", help="auto | lightweight | distributed."),
    strategy: str = typer.Option("auto", "--strategy", help="auto | single | tp | pp | hybrid | dp."),
    tp: int | None = typer.Option(None, "--tp", help="Tensor-parallel degree."),
    pp: int | None = typer.Option(None, "--pp", help="Pipeline-parallel degree."),
    dp: int | None = typer.Option(None, "--dp", help="Data-parallel replicas."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16."),
    batch_size: str = typer.Option("auto", "--batch-size", help="Requests per batch, or 'auto' for the token budget alone."),
    max_batch_tokens: int | None = typer.Option(None, "--max-batch-tokens", help="Token budget of one padded batch."),
    output: str | None = typer.Option(None, "--output", help="Folder for results.json (default runs/<model name>)."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Also write lm-eval's samples_<task>.jsonl."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the request cache."),
    cache_path: str | None = typer.Option(None, "--cache", help="Request cache file (default $EVALFLEET_CACHE or the user cache)."),
    report: bool = typer.Option(False, "--report", help="Write monitoring.png next to results.json."),
) -> None:
    """Evaluate a model on lm-eval tasks; writes OUTPUT/results.json."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # our own progress display replaces lm-eval's bars
    request = build_request(
        model={"path": model, "dtype": dtype, "device": device},
        tasks={"names": tasks, "include_path": include_path, "limit": limit, "num_fewshot": num_fewshot},
        engine=engine,
        strategy=strategy,
        tp=tp,
        pp=pp,
        dp=dp,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        output_dir=output or str(default_output_dir(model)),
        log_samples=log_samples,
        use_cache=not no_cache,
        cache_path=cache_path,
    )
    from rich.console import Console

    from evalfleet.engines.run import evaluate_request
    from evalfleet.progress import RunProgress, results_table

    with RunProgress() as progress:
        result = evaluate_request(request, progress=progress, report=report)
    console = Console()
    console.print(results_table(result.document()))
    timing = result.evalfleet["timing"]
    console.print(
        f"{timing['requests']} requests in {timing['wall_seconds']:.1f} s "
        f"({timing['requests_per_s']} req/s, {timing['tokens_per_s']} tok/s) -> {result.output_path}"
    )


@app.command()
def monitor(
    once: bool = typer.Option(False, "--once", help="Print one snapshot and exit."),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of a table (one line per sample without --once)."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between samples."),
    thresholds: str | None = typer.Option(None, "--thresholds", help="YAML file of alert thresholds."),
    count: int | None = typer.Option(None, "--count", hidden=True, help="Stop after N samples."),
    duration: float | None = typer.Option(None, "--duration", hidden=True, help="Stop after S seconds."),
) -> None:
    """Watch GPUs, host CPU and memory, and evalfleet's processes (until Ctrl-C)."""
    from pathlib import Path

    from evalfleet.monitoring.console import run_monitor_command

    run_monitor_command(
        once=once,
        as_json=as_json,
        interval=interval,
        count=count,
        duration=duration,
        thresholds=Path(thresholds) if thresholds else None,
    )


@app.command()
def plan(
    model: str = typer.Option(..., "--model", help="Local folder or config.json, a shipped id (e.g. meta-llama/Llama-2-70b-hf), or a hub id."),
    gpus: str | None = typer.Option(None, "--gpus", help="cpu, 8xA100-80GB, 2x8xH100-80GB, a cluster YAML file; default: this machine."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="auto, float32, bfloat16, float16, int8 or int4."),
    max_length: int = typer.Option(2048, "--max-length", min=1, help="Longest evaluated sequence (tokens)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per batch."),
    strategy: str = typer.Option("auto", "--strategy", help="auto, single, tp, pp, hybrid or dp."),
    tp: int | None = typer.Option(None, "--tp", min=1, help="Force the tensor-parallel degree."),
    pp: int | None = typer.Option(None, "--pp", min=1, help="Force the number of pipeline stages."),
    dp: int | None = typer.Option(None, "--dp", min=1, help="Force the number of data-parallel replicas."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """Show whether a model fits and how to lay it out, from its config.json alone."""
    from evalfleet.planning.report import plan_command

    plan_command(
        model, gpus, dtype=dtype, max_length=max_length, batch_size=batch_size,
        strategy=strategy, tp=tp, pp=pp, dp=dp, as_json=as_json,
    )


def main() -> None:
    try:
        app()
    except EvalfleetError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
