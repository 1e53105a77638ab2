"""``p2r eval``: one benchmark, one mode, one model; local or ``s3://`` data and outputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import click

from p2r.core.errors import UserError
from p2r.eval.benchmarks import TASKS
from p2r.eval.inference import MODES

_OUTPUTS = ("results.jsonl", "summary.json", "report.md", "report.html")


def _cache(kind: str, uri: str) -> Path:
    root = Path(os.environ.get("P2R_CACHE", Path.home() / ".cache" / "p2r"))
    return root / kind / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _local_data(uri: str) -> Path:
    from p2r.services.checkpoints import download_prefix, local_path

    if not uri.startswith("s3://"):
        return local_path(uri)

    target = _cache("data", uri)
    if not download_prefix(uri, target):
        raise UserError(f"--data {uri}: no objects under that prefix")
    return target


@click.command("eval")
@click.option("--task", type=click.Choice(TASKS), required=True)
@click.option("--data", "data_uri", required=True,
              help="Benchmark files: a file, a directory or an s3:// prefix (parquet / jsonl / tsv).")
@click.option("--mode", "modes", type=click.Choice(MODES), multiple=True, default=["p2r"], show_default=True,
              help="Repeat for several modes in one run (engines shared); outputs then go to OUT/MODE/.")
@click.option("--model", default=None, help="Checkpoint (path, file:// or s3://) answering the questions.")
@click.option("--perceiver-model", default=None, help="p2r mode: perceiver checkpoint (default: --model).")
@click.option("--verifier-model", default=None, help="Grades free_form answers (synthetic task); else ungraded.")
@click.option("--reasoner-endpoint", default=None, help="HOST:PORT of a deployed reasoner (instead of --model).")
@click.option("--perceiver-endpoint", default=None, help="HOST:PORT of a deployed perceiver (p2r mode).")
@click.option("--verifier-endpoint", default=None, help="HOST:PORT of a deployed verifier.")
@click.option("--out", "out_uri", required=True, help="Output directory or s3:// prefix (resumes from it).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Samples per engine call (the unit of work of each Ray replica).")
@click.option("--ray-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Shard over Ray Data with this many engine replicas (0: this process).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--skip-bad-rows", is_flag=True, help="Report malformed rows and go on (default: stop at the first).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Override the answering budget (16 default / 1024 thinking and p2r) for smoke runs.")
@click.option("--perceive-max-tokens", type=click.IntRange(min=1), default=None, help="Override 256 (p2r mode).")
@click.option("--max-pixels", type=click.IntRange(min=1024), default=None, help="Override 4096×32×32.")
@click.option("--max-model-len", type=click.IntRange(min=256), default=16384, show_default=True)
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--row", "rows", type=(str, str, str, str), multiple=True, metavar="NAME MODE MODEL PERCEIVER",
              help="An evaluation matrix instead of --mode/--model: each row evaluates MODE answered by MODEL "
                   "(PERCEIVER perceives in p2r mode) into OUT/NAME/; all rows share one engine whose weights "
                   "are reloaded in place between checkpoints (same architecture). Repeat per row.")
@click.pass_context
def eval_command(click_ctx: click.Context, task: str, data_uri: str, modes: tuple[str, ...], model: str | None,
                 perceiver_model: str | None, verifier_model: str | None, reasoner_endpoint: str | None,
                 perceiver_endpoint: str | None, verifier_endpoint: str | None, out_uri: str, limit: int | None,
                 batch_size: int, ray_workers: int, gpus_per_worker: float, skip_bad_rows: bool,
                 max_new_tokens: int | None, perceive_max_tokens: int | None, max_pixels: int | None,
                 max_model_len: int, max_num_seqs: int, rows: tuple[tuple[str, str, str, str], ...]) -> None:
    """Evaluate a model on a benchmark (V*, HR-Bench, MME-RealWorld, synthetic) in one mode.

    Writes results.jsonl, summary.json, report.md and report.html to --out and prints the
    accuracy table. Re-running with the same --out skips the samples already evaluated.
    With --row, evaluates each row into OUT/NAME/ instead (and OUT/matrix.json)."""
    if rows:
        from click.core import ParameterSource

        given = [f"--{name.replace('_', '-')}" for name in ("model", "perceiver_model", "reasoner_endpoint",
                                                             "perceiver_endpoint") if click_ctx.params[name]]
        if click_ctx.get_parameter_source("modes") != ParameterSource.DEFAULT:
            given.append("--mode")
        if ray_workers:
            given.append("--ray-workers")
        if given:
            raise UserError(f"--row names each row's mode and models: drop {', '.join(given)}")
        model = rows[0][2]  # the spec below carries the shared settings; each row names its own models
    from dataclasses import replace

    from tqdm import tqdm

    from p2r.core.images import EVAL_BOUNDS, PixelBounds
    from p2r.eval.benchmarks import load_benchmark
    from p2r.eval.inference import BackendSpec, EvalSettings
    from p2r.eval.report import text_table
    from p2r.eval.runner import evaluate, spec_meta
    from p2r.services.checkpoints import CheckpointError, download_prefix, local_path, put_files
    from p2r.services.engine import EngineLimits

    modes = tuple(dict.fromkeys(modes))
    settings = EvalSettings(mode=modes[0])  # type: ignore[arg-type]
    if max_new_tokens is not None:
        settings = replace(settings, default_max_tokens=max_new_tokens, thinking_max_tokens=max_new_tokens,
                           reason_max_tokens=max_new_tokens)
    if perceive_max_tokens is not None:
        settings = replace(settings, perceive_max_tokens=perceive_max_tokens)
    if max_pixels is not None:
        settings = replace(settings, bounds=PixelBounds(min(EVAL_BOUNDS.min_pixels, max_pixels), max_pixels))
    spec = BackendSpec(settings, model=model, perceiver_model=perceiver_model, verifier_model=verifier_model,
                       reasoner_endpoint=reasoner_endpoint, perceiver_endpoint=perceiver_endpoint,
                       verifier_endpoint=verifier_endpoint,
                       limits=EngineLimits(max_model_len=max_model_len, max_num_seqs=max_num_seqs))
    try:
        skipped: list[str] = []
        samples = load_benchmark(task, _local_data(data_uri), skip_bad=skip_bad_rows, on_skip=skipped.append)
        for message in skipped:
            click.echo(f"p2r eval: skipped {message}", err=True)
        samples = samples[:limit] if limit else samples
        out_dir = local_path(out_uri)
        if out_uri.startswith("s3://"):
            out_dir = _cache("eval", out_uri)
            download_prefix(out_uri, out_dir)  # resume from what an earlier run uploaded
        if rows:
            _matrix(task, samples, rows, spec, out_dir, out_uri, batch_size)
            return
        outputs = {m: out_dir if len(modes) == 1 else out_dir / m for m in modes}
        bar = tqdm(total=len(samples) * len(modes), desc=f"{task} {'+'.join(modes)}", unit="sample",
                   dynamic_ncols=True)
        last = [0]

        def progress(done: int, _total: int) -> None:
            bar.update(done - last[0])
            last[0] = done

        try:
            summaries = evaluate(samples, spec, outputs, spec_meta(spec, task),  # type: ignore[arg-type]
                                 batch_size=batch_size, ray_workers=ray_workers, gpus_per_worker=gpus_per_worker,
                                 progress=progress)
        finally:
            bar.close()
            if out_uri.startswith("s3://"):
                for m, d in outputs.items():
                    names = [n for n in _OUTPUTS if (d / n).is_file()]
                    if names:
                        put_files(d, names, out_uri if d == out_dir else f"{out_uri.rstrip('/')}/{m}")
    except CheckpointError as e:
        raise UserError(str(e)) from None
    for m, summary in summaries.items():
        click.echo(f"\n{task} — {m} mode\n{text_table(summary)}", err=True)
        click.echo(json.dumps({"mode": m, "out": str(outputs[m]) if not out_uri.startswith("s3://") else out_uri,
                               "n": summary["n"], "overall": summary["overall"],
                               "categories": summary["categories"]}))


def _matrix(task: str, samples: list[Any], values: tuple[tuple[str, str, str, str], ...], spec: Any, out_dir: Path,
            out_uri: str, batch_size: int) -> None:
    """``--row``: every row on one shared engine (p2r.eval.matrix); outputs as for one mode, per row."""
    from tqdm import tqdm

    from p2r.eval.matrix import MATRIX, evaluate_rows, parse_rows
    from p2r.eval.report import text_table
    from p2r.services.checkpoints import put_files

    rows = parse_rows(values)
    bar = tqdm(total=len(samples) * len(rows), desc=f"{task} {len(rows)} rows", unit="sample", dynamic_ncols=True)
    last = [0]

    def progress(done: int, _total: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    try:
        summaries = evaluate_rows(samples, rows, out_dir, task, spec.settings, spec.limits,
                                  verifier_model=spec.verifier_model, verifier_endpoint=spec.verifier_endpoint,
                                  batch_size=batch_size, seed=spec.seed, progress=progress)
    finally:
        bar.close()
        if out_uri.startswith("s3://"):
            for row in rows:
                names = [n for n in _OUTPUTS if (out_dir / row.name / n).is_file()]
                if names:
                    put_files(out_dir / row.name, names, f"{out_uri.rstrip('/')}/{row.name}")
            if (out_dir / MATRIX).is_file():
                put_files(out_dir, [MATRIX], out_uri)
    for row in rows:
        summary = summaries[row.name]
        click.echo(f"\n{task} — {row.name} ({row.mode} mode)\n{text_table(summary)}", err=True)
        click.echo(json.dumps({"row": row.name, "mode": row.mode, "out": f"{out_uri.rstrip('/')}/{row.name}",
                               "n": summary["n"], "overall": summary["overall"],
                               "categories": summary["categories"]}))
