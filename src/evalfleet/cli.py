"""The `evalfleet` command. Each command is a thin shell over the layer that does the work.

User mistakes raise `EvalfleetError`; `main` turns them into one sentence on stderr and
the error's exit code, never a traceback; so is a package that is not installed (with the
extra that installs it).
"""

from __future__ import annotations

import os
import sys

import typer

from evalfleet import cli_options as flags
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
    "priority": "--priority",
    "gpus": "--gpus",
    "backend": "--backend",
    "seed": "--seed",
    "harness": "--fewshot-as-multiturn",
    "harness.apply_chat_template": "--apply-chat-template",
    "harness.gen_kwargs": "--gen-kwargs",
    "harness.samples": "--samples",
    **{f"model.{name}": "--model-args" for name in ("revision", "trust_remote_code", "max_length", "add_bos_token",
                                                     "chat_template_args")},
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


def _wandb_args(text: str | None) -> dict | None:
    if text is None:
        return None
    from evalfleet.engines.wandb_log import parse_wandb_args, require_wandb

    require_wandb()
    return parse_wandb_args(text)


_BACKEND_HELP = "auto | hf | vllm: auto takes vLLM on GPUs when it is installed, transformers otherwise."


@app.command()
def run(
    model: str | None = typer.Option(None, "--model", help="Local model folder, 'demo' for the bundled demo model, or a hub id (or --model-args pretrained=...)."),
    tasks: str = typer.Option("demo_mc,demo_arith", "--tasks", help="Comma-separated lm-eval task names."),
    include_path: str | None = flags.INCLUDE_PATH,
    limit: int | None = flags.LIMIT,
    num_fewshot: int | None = flags.NUM_FEWSHOT,
    engine: str = typer.Option("auto", "--engine", help="auto | lightweight | distributed."),
    strategy: str = typer.Option("auto", "--strategy", help="auto | single | tp | pp | hybrid | dp | device_map (layers over one node's GPUs in one process)."),
    tp: int | None = typer.Option(None, "--tp", help="Tensor-parallel degree."),
    pp: int | None = typer.Option(None, "--pp", help="Pipeline-parallel degree (a device_map's GPUs)."),
    dp: int | None = typer.Option(None, "--dp", help="Data-parallel replicas."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    dtype: str = flags.DTYPE,
    batch_size: str = typer.Option("auto", "--batch-size", help="Requests per batch, or 'auto' for the token budget alone."),
    max_batch_tokens: int | None = typer.Option(None, "--max-batch-tokens", help="Token budget of one padded batch."),
    output: str | None = typer.Option(None, "--output", help="Folder for results.json (default runs/<model name>)."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Also write lm-eval's samples_<task>.jsonl."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the request cache."),
    cache_path: str | None = typer.Option(None, "--cache", help="Request cache file (default $EVALFLEET_CACHE or the user cache)."),
    report: bool = typer.Option(False, "--report", help="Write monitoring.png next to results.json."),
    ray_address: str | None = typer.Option(None, "--ray", help="Run the ranks on the Ray cluster at ADDRESS ('auto': the local head), groups spread over its nodes."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    apply_chat_template: str | None = flags.APPLY_CHAT_TEMPLATE,
    fewshot_as_multiturn: str | None = flags.FEWSHOT_AS_MULTITURN,
    system_instruction: str | None = flags.SYSTEM_INSTRUCTION,
    gen_kwargs: str | None = flags.GEN_KWARGS,
    seed: str | None = flags.SEED,
    model_args: str | None = flags.MODEL_ARGS,
    predict_only: bool = flags.PREDICT_ONLY,
    samples: str | None = flags.SAMPLES,
    confirm_run_unsafe_code: bool = flags.CONFIRM_UNSAFE,
    metadata: str | None = flags.METADATA,
    wandb_args: str | None = typer.Option(None, "--wandb-args", help="Log the finished run to W&B through lm-eval's WandbLogger: wandb.init's arguments as K=V,K=V (lm-eval's --wandb_args)."),
) -> None:
    """Evaluate a model on lm-eval tasks; writes OUTPUT/results.json.

    lm-eval's flags (chat template, generation settings, seeds, model arguments, ...) mean what
    they mean to `lm_eval --model hf`, and give its prompts and scores.
    """
    from evalfleet.tasks.harness_args import request_fields

    os.environ.setdefault("TQDM_DISABLE", "1")  # our own progress display replaces lm-eval's bars
    lm_eval = request_fields(
        model={"path": model, "dtype": dtype, "device": device}, model_args=model_args,
        apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
        system_instruction=system_instruction, gen_kwargs=gen_kwargs, seed=seed, predict_only=predict_only,
        samples=samples, confirm_run_unsafe_code=confirm_run_unsafe_code, metadata=metadata,
    )
    request = build_request(
        **lm_eval,
        tasks={"names": tasks, "include_path": include_path, "limit": limit, "num_fewshot": num_fewshot},
        engine=engine,
        backend=backend,
        strategy=strategy,
        tp=tp,
        pp=pp,
        dp=dp,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        output_dir=output or str(default_output_dir(lm_eval["model"]["path"])),
        log_samples=log_samples,
        wandb_args=_wandb_args(wandb_args),
        use_cache=not no_cache,
        cache_path=cache_path,
    )
    from rich.console import Console

    from evalfleet.engines.run import evaluate_request
    from evalfleet.progress import RunProgress, results_table

    with RunProgress() as progress:
        if ray_address is None:
            result = evaluate_request(request, progress=progress, report=report)
        else:
            from evalfleet.orchestrator.foreground import run_on_ray

            result = run_on_ray(request, ray_address, progress=progress,  # retried after a lost node
                                say=lambda line: progress.console.print(line, markup=False, highlight=False,
                                                                           soft_wrap=True))
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
    strategy: str = typer.Option("auto", "--strategy", help="auto, single, tp, pp, hybrid, dp or device_map (layers over one node's GPUs in one process, one computing at a time)."),
    tp: int | None = typer.Option(None, "--tp", min=1, help="Force the tensor-parallel degree."),
    pp: int | None = typer.Option(None, "--pp", min=1, help="Force the number of pipeline stages (a device_map's GPUs)."),
    dp: int | None = typer.Option(None, "--dp", min=1, help="Force the number of data-parallel replicas."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
) -> None:
    """Show whether a model fits and how to lay it out, from its config.json alone."""
    from evalfleet.planning.report import plan_command

    plan_command(
        model, gpus, dtype=dtype, max_length=max_length, batch_size=batch_size,
        strategy=strategy, tp=tp, pp=pp, dp=dp, as_json=as_json, backend=backend,
    )


_DB_HELP = "Job store (default $EVALFLEET_DB, else jobs.db in the user data folder)."


@app.command()
def scheduler(
    gpus: str | None = typer.Option(None, "--gpus", help="Pool: a spec (4xA10G-24GB), a cluster YAML or 'auto' (default: this machine)."),
    slots: int | None = typer.Option(None, "--slots", min=1, help="Pool of N CPU slots: N jobs side by side, each with cores/N threads."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    preempt: bool = typer.Option(False, "--preempt/--no-preempt", help="Let long-waiting jobs stop lower-priority ones (they resume from the cache)."),
    resize: bool = typer.Option(True, "--resize/--no-resize", help="Widen running data-parallel jobs onto idle devices and narrow them for higher-priority jobs (local jobs)."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts per job before it fails for good."),
    backoff: float = typer.Option(30.0, "--backoff", min=0, help="Seconds before a job's second retry in a row without progress; doubles each time (the first retry is at once)."),
    heartbeat_timeout: float = typer.Option(120.0, "--heartbeat-timeout", min=1, help="Restart a job silent this long."),
    interval: float = typer.Option(2.0, "--interval", min=0.05, help="Seconds between scheduling rounds."),
    ray_address: str | None = typer.Option(None, "--ray", help="Run jobs on the Ray cluster at ADDRESS ('auto': the local head); its nodes and GPUs are the pool."),
    standby: bool = typer.Option(True, "--standby/--no-standby", help="Keep one worker process warm, its imports done (and joined to the Ray cluster), so the next job or retry starts with its model load."),
) -> None:
    """Run the job scheduler in the foreground (Ctrl-C stops it and requeues its running jobs)."""
    from evalfleet.orchestrator.foreground import SchedulerOptions, run_scheduler
    from evalfleet.orchestrator.pool import pool_from_options
    from evalfleet.orchestrator.store import resolve_db_path

    options = SchedulerOptions(preempt=preempt, resize=resize, max_attempts=max_attempts, backoff_s=backoff,
                               interval_s=interval, heartbeat_timeout_s=heartbeat_timeout, standby=standby)
    db_path = resolve_db_path(db)
    if ray_address is None:
        run_scheduler(db_path, pool_from_options(gpus, slots), options)
        return
    if gpus is not None or slots is not None:
        raise UsageError("with --ray the Ray cluster is the pool; drop --gpus and --slots")
    from evalfleet.orchestrator.executors.ray import ray_pool_and_executor

    inventory, executor = ray_pool_and_executor(ray_address, db_path, grace_s=options.grace_s, standby=standby)
    run_scheduler(db_path, inventory, options, executor=executor)


@app.command()
def submit(
    model: str | None = typer.Option(None, "--model", help="Local model folder, 'demo', a shipped id or a hub id (or --model-args pretrained=...)."),
    tasks: str = typer.Option("demo_mc,demo_arith", "--tasks", help="Comma-separated lm-eval task names."),
    include_path: str | None = flags.INCLUDE_PATH,
    limit: int | None = flags.LIMIT,
    num_fewshot: int | None = flags.NUM_FEWSHOT,
    priority: str = flags.PRIORITY,
    gpus: int | None = typer.Option(None, "--gpus", help="Most GPUs the job may use."),
    strategy: str = typer.Option("auto", "--strategy", help="auto | single | tp | pp | hybrid | dp | device_map (layers over one node's GPUs in one process)."),
    tp: int | None = typer.Option(None, "--tp", help="Tensor-parallel degree."),
    pp: int | None = typer.Option(None, "--pp", help="Pipeline-parallel degree (a device_map's GPUs)."),
    dp: int | None = typer.Option(None, "--dp", help="Data-parallel replicas (at least)."),
    dtype: str = flags.DTYPE,
    batch_size: str = typer.Option("auto", "--batch-size", help="Requests per batch, or 'auto'."),
    max_batch_tokens: int | None = typer.Option(None, "--max-batch-tokens", help="Token budget of one padded batch."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Also write lm-eval's samples_<task>.jsonl."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the request cache (no resume)."),
    cache_path: str | None = typer.Option(None, "--cache", help="Request cache file (default: the scheduler's)."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    pool: str | None = typer.Option(None, "--pool", help="Check the job against this pool spec instead of the one the scheduler recorded in the store (else this machine)."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    apply_chat_template: str | None = flags.APPLY_CHAT_TEMPLATE,
    fewshot_as_multiturn: str | None = flags.FEWSHOT_AS_MULTITURN,
    system_instruction: str | None = flags.SYSTEM_INSTRUCTION,
    gen_kwargs: str | None = flags.GEN_KWARGS,
    seed: str | None = flags.SEED,
    model_args: str | None = flags.MODEL_ARGS,
    predict_only: bool = flags.PREDICT_ONLY,
    samples: str | None = flags.SAMPLES,
    confirm_run_unsafe_code: bool = flags.CONFIRM_UNSAFE,
    metadata: str | None = flags.METADATA,
    wandb_args: str | None = typer.Option(None, "--wandb-args", help="Log the finished run to W&B through lm-eval's WandbLogger: wandb.init's arguments as K=V,K=V (lm-eval's --wandb_args)."),
) -> None:
    """Queue an evaluation and print its job id; refuse one that can never fit the pool.

    The job's size (requests by type, tokens) is counted from its tasks and the model's
    tokenizer, without running the model, and kept for the next submit of the same tasks. Its
    compute time is estimated from speeds measured by earlier runs of the same model shape,
    layout and hardware where there are some, else from the cost model, and says which.
    Results go to <store folder>/results/<job id>/results.json.
    """
    from evalfleet.orchestrator.console import submit_job, submitted_size
    from evalfleet.tasks.harness_args import request_fields

    request = build_request(
        **request_fields(
            model={"path": model, "dtype": dtype}, model_args=model_args,
            apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
            system_instruction=system_instruction, gen_kwargs=gen_kwargs, seed=seed, predict_only=predict_only,
            samples=samples, confirm_run_unsafe_code=confirm_run_unsafe_code, metadata=metadata,
        ),
        tasks={"names": tasks, "include_path": include_path, "limit": limit, "num_fewshot": num_fewshot},
        strategy=strategy, tp=tp, pp=pp, dp=dp, gpus=gpus, priority=priority, backend=backend,
        batch_size=batch_size, max_batch_tokens=max_batch_tokens, log_samples=log_samples,
        wandb_args=_wandb_args(wandb_args), use_cache=not no_cache, cache_path=cache_path,
    )
    job_id = submit_job(request, db, pool)
    typer.echo(job_id)
    size, estimate = submitted_size(job_id, db)
    typer.echo(f"size: {size}", err=True)
    if estimate:
        typer.echo(f"estimate: {estimate}", err=True)


@app.command()
def sweep(
    file: str = typer.Argument(..., help="Sweep YAML: models (paths, names or globs such as ckpts/step-*), tasks (task sets), settings (submit's options, one mapping per column), and optional name, priority, limit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the matrix and what would be skipped; submit nothing."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document: the group, the cells submitted and skipped."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    pool: str | None = typer.Option(None, "--pool", help="Check the jobs against this pool spec instead of the one the scheduler recorded."),
) -> None:
    """Submit models x task sets x settings as one group of jobs, as `submit` would each.

    Relative paths and globs are read from the current folder, as `submit` reads them. A cell
    that already has results, or is queued or running with the same score-changing settings, is
    skipped: submitting the file again submits only what is new, into the same group.
    """
    from evalfleet.orchestrator.sweeps import sweep_command

    sweep_command(file, db=db, pool=pool, dry_run=dry_run, as_json=as_json)


@app.command()
def watch(
    folder: str = typer.Argument(..., help="The folder the trainer writes its checkpoints into (step-1000, checkpoint-1000, iter_0001000, global_step1000, ...)."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated lm-eval task names (required unless --status)."),
    every: float = typer.Option(30.0, "--every", min=0.05, help="Seconds between looks at the folder."),
    marker: str | None = typer.Option(None, "--marker", help="A checkpoint is complete once this file is in it (default: any of .complete, COMPLETE, done, DONE, .done, _SUCCESS, else --quiet-for)."),
    quiet_for: float = typer.Option(60.0, "--quiet-for", min=0, help="Without a marker, complete once its files have not changed for this many seconds and it holds config.json and whole weights."),
    step_regex: str | None = typer.Option(None, "--step-regex", help="Regex with one group: the step in a checkpoint folder's name."),
    once: bool = typer.Option(False, "--once", help="Submit what is complete now (watching up to --quiet-for), then exit."),
    show_status: bool = typer.Option(False, "--status", help="Show the folder's watches and their checkpoints' states, then exit."),
    as_json: bool = typer.Option(False, "--json", help="With --status: one JSON document."),
    include_path: str | None = flags.INCLUDE_PATH,
    limit: int | None = flags.LIMIT,
    num_fewshot: int | None = flags.NUM_FEWSHOT,
    priority: str = flags.PRIORITY,
    gpus: int | None = typer.Option(None, "--gpus", help="Most GPUs a job may use."),
    dtype: str = flags.DTYPE,
    batch_size: str = typer.Option("auto", "--batch-size", help="Requests per batch, or 'auto'."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    apply_chat_template: str | None = flags.APPLY_CHAT_TEMPLATE,
    fewshot_as_multiturn: str | None = flags.FEWSHOT_AS_MULTITURN,
    system_instruction: str | None = flags.SYSTEM_INSTRUCTION,
    gen_kwargs: str | None = flags.GEN_KWARGS,
    seed: str | None = flags.SEED,
    model_args: str | None = flags.MODEL_ARGS,
) -> None:
    """Evaluate each new checkpoint under FOLDER once it is complete, as `submit` would (until Ctrl-C).

    Its jobs form one group (kind 'watch') per folder, tasks and settings; each checkpoint's state
    is kept in the job store, so a restarted watcher submits nothing twice. A checkpoint whose files
    changed while it was evaluated is evaluated again; one deleted before or during its evaluation
    is reported.
    """
    from evalfleet.orchestrator.watcher import watch_command
    from evalfleet.tasks.harness_args import request_fields

    request = None
    if tasks is not None:
        request = build_request(
            **request_fields(
                model={"path": folder, "dtype": dtype}, model_args=model_args,
                apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
                system_instruction=system_instruction, gen_kwargs=gen_kwargs, seed=seed,
            ),
            tasks={"names": tasks, "include_path": include_path, "limit": limit, "num_fewshot": num_fewshot},
            gpus=gpus, priority=priority, backend=backend, batch_size=batch_size,
        )
    watch_command(folder, request, db, every_s=every, marker=marker, quiet_s=quiet_for, step_regex=step_regex,
                  once=once, status=show_status, as_json=as_json)


@app.command()
def status(
    job: str | None = typer.Argument(None, help="A job id or a group id (a sweep); without it, every job."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document (a list without JOB)."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Show one job (state, progress, attempts, result, history), a group's jobs, or all jobs."""
    from evalfleet.orchestrator.groups import status_command

    status_command(job, db, as_json)


@app.command()
def queue(db: str | None = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """Show running jobs with their progress and ETA, then queued jobs in start order."""
    from evalfleet.orchestrator.console import queue_command

    queue_command(db)


@app.command()
def cancel(
    job: str = typer.Argument(..., help="The job id, or a group id: every unfinished job of the group."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Cancel a job (or a group's jobs); a running one is stopped by its scheduler, which frees its devices."""
    from evalfleet.orchestrator.groups import cancel_command

    typer.echo(cancel_command(job, db), err=True)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; a non-loopback one needs --token-file or $EVALFLEET_TOKEN, of at least 32 characters."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port (0 picks a free one)."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    slots: int | None = typer.Option(None, "--slots", min=1, help="Also schedule on N CPU slots."),
    gpus: str | None = typer.Option(None, "--gpus", help="Also schedule on this pool: a spec, a cluster YAML or 'auto'."),
    ray: str | None = typer.Option(None, "--ray", help="Also schedule on the Ray cluster at this address."),
    token_file: str | None = typer.Option(None, "--token-file", help="File holding the service token (else $EVALFLEET_TOKEN, else one created in the user data folder)."),
    model_root: list[str] = typer.Option([], "--model-root", help="Folder whose models may be submitted over HTTP (repeatable; the demo model always may)."),
    allow_hub: bool = typer.Option(False, "--allow-hub", help="Also accept hub model ids (org/name) over HTTP."),
    task_root: list[str] = typer.Option([], "--task-root", help="Folder of your task YAMLs: a job over HTTP may name it, or a folder under it, as include_path (repeatable; trusted: its YAMLs may run code)."),
    data_root: list[str] = typer.Option([], "--data-root", help="Folder whose files an uploaded task YAML may read as its dataset (repeatable; the task roots' files may be read too)."),
    forwarded_allow_ips: str | None = typer.Option(None, "--forwarded-allow-ips", help="Reverse proxies whose X-Forwarded-Proto/-For to believe (comma-separated addresses or networks, or '*'); behind an https proxy this makes the session cookie Secure."),
    interval: float = typer.Option(2.0, "--interval", min=0.05, help="Seconds between scheduling rounds."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts per job before it fails for good."),
    preempt: bool = typer.Option(False, "--preempt/--no-preempt", help="Let long-waiting jobs stop lower-priority ones."),
    watch: list[str] = typer.Option([], "--watch", help="Also watch this checkpoint folder, as `evalfleet watch` does, restarted if it exits (repeatable)."),
    watch_tasks: str | None = typer.Option(None, "--watch-tasks", help="The tasks each watched checkpoint is evaluated on (with --watch)."),
    watch_options: str | None = typer.Option(None, "--watch-options", help="More `evalfleet watch` options for every --watch folder, in one string, e.g. '--limit 100 --every 60'."),
) -> None:
    """Serve the dashboard and HTTP API over the job store; with --slots/--gpus/--ray, schedule too;
    with --watch, evaluate a trainer's new checkpoints too."""
    from evalfleet.service.serve import ServeOptions
    from evalfleet.service.serve import serve as serve_forever

    serve_forever(ServeOptions(host=host, port=port, db=db, slots=slots, gpus=gpus, ray=ray, token_file=token_file,
                               model_roots=model_root, allow_hub=allow_hub, task_roots=task_root, data_roots=data_root,
                               forwarded_allow_ips=forwarded_allow_ips,
                               interval=interval, max_attempts=max_attempts, preempt=preempt,
                               watch=watch, watch_tasks=watch_tasks, watch_options=watch_options))


@app.command()
def compare(
    a: str = typer.Argument(..., help="Run A: a job id, or a results.json (or its folder)."),
    b: str = typer.Argument(..., help="Run B: a job id, or a results.json (or its folder)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of a table."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Compare two runs task by task: values, difference, paired test (McNemar or bootstrap), flipped samples."""
    from evalfleet.service.compare_report import compare_command

    compare_command(a, b, db=db, as_json=as_json)


@app.command()
def leaderboard(
    group: str | None = typer.Option(None, "--group", help="Rank a group's finished jobs (a sweep, a checkpoint watch)."),
    models: str | None = typer.Option(None, "--models", help="Comma-separated models (path or folder name), job ids or results folders; default: every finished job."),
    baseline: str | None = typer.Option(None, "--baseline", help="Test every cell against this model's (compare's paired test)."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level of the tests against the baseline."),
    output_format: str = typer.Option("table", "--format", help="table | md | csv | json | html (one page with a score-by-step chart per task for checkpoints)."),
    output: str | None = typer.Option(None, "--output", help="Write to this file instead of standard output."),
    lm_eval_layout: str | None = typer.Option(None, "--lm-eval-layout", help="Also write the ranked runs as lm-eval writes them: DIR/<model>/results_<time>.json and samples_<task>_<time>.jsonl."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Rank finished runs: models × tasks (main metric ± stderr) and their mean, best marked; runs whose
    score-changing settings differ are put in separate sections, never ranked together."""
    from evalfleet.service.leaderboard_report import leaderboard_command

    names = [name.strip() for name in (models or "").split(",") if name.strip()]
    leaderboard_command(group=group, models=names, baseline=baseline, alpha=alpha, output_format=output_format,
                        output=output, db=db, lm_eval_layout=lm_eval_layout)


@app.command()
def pool(
    as_json: bool = typer.Option(False, "--json", help="One JSON document: nodes (Ray: dead ones too), GPUs, the job holding each, quarantines with their evidence, ranks of Ray jobs."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Show the scheduler's pool: every GPU, the job holding it, quarantined GPUs with the evidence, and on Ray the node of each rank."""
    from rich.console import Console

    from evalfleet.orchestrator.pool_status import pool_status, pool_table, rank_lines
    from evalfleet.orchestrator.store import JobStore, resolve_db_path

    with JobStore(resolve_db_path(db)) as store:
        status = pool_status(store)
    if as_json:
        typer.echo(status.model_dump_json(indent=2))
    else:
        Console().print(pool_table(status))
        for line in rank_lines(status):
            typer.echo(line)


@app.command()
def release(
    device: str = typer.Argument(..., help="The quarantined GPU: NODE:GPU, or GPU for node 0."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Return a quarantined GPU to the pool once it has been checked."""
    from evalfleet.orchestrator.pool_status import release_device
    from evalfleet.orchestrator.store import JobStore, resolve_db_path

    with JobStore(resolve_db_path(db)) as store:
        node, gpu = release_device(store, device)
    typer.echo(f"GPU {gpu} of node {node} is back in the pool", err=True)


@app.command(hidden=True)
def worker(
    job: str = typer.Option(..., "--job", help="The job id."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Run one placed job (the scheduler launches this; not for direct use)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from evalfleet.orchestrator.store import resolve_db_path
    from evalfleet.orchestrator.worker import run_worker

    result = run_worker(job, resolve_db_path(db))
    typer.echo(f"job {job} finished -> {result.output_path}", err=True)


# Optional packages and the extra that installs each; anything else is a broken installation.
EXTRAS = {"vllm": "vllm", "ray": "ray", "fastapi": "service", "uvicorn": "service", "wandb": "wandb"}


def missing_package(error: ModuleNotFoundError) -> str:
    """One sentence for a package that is not installed: which extra brings it, or how to repair."""
    package = (error.name or "").split(".")[0] or "a required package"
    extra = EXTRAS.get(package)
    if extra is not None:
        return f"this needs the optional package '{package}'; install it with: pip install 'evalfleet[{extra}]'"
    return f"the package '{package}' is missing from this installation; reinstall evalfleet (pip install evalfleet)"


def main() -> None:
    sys.argv[1:] = flags.lm_eval_command_line(sys.argv[1:])
    try:
        app()
    except EvalfleetError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except ModuleNotFoundError as error:
        typer.echo(f"error: {missing_package(error)}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
