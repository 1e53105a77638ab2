"""The ``p2r`` command line.

Conventions: every command is listed by ``p2r --help``; a user error (``p2r.core.errors.UserError``
and its subclasses, raised anywhere below a command) is one line on stderr (``p2r: error: ...``)
and exit code 2, while any other exception is a bug and keeps its traceback; long work shows a
progress bar. Heavy imports (torch,
vLLM) happen inside the commands so ``p2r --help`` stays instant.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import click

from p2r.core.errors import USER_ERROR_EXIT, UserError
from p2r.core.exiting import skip_exit_collection
from p2r.data.synth import TASKS as SYNTH_TASKS


class _Group(click.Group):
    """Turns usage and user errors into one readable line and a non-zero exit.

    Commands that live in their own package (``eval``, ``pipeline``) are registered in
    ``LAZY`` as ``module:attribute`` and imported only when listed or run: no import cycle with
    this module, and ``p2r --help`` stays instant."""

    LAZY: ClassVar[dict[str, str]] = {"eval": "p2r.eval.cli:eval_command", "pipeline": "p2r.controller.cli:pipeline"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY and name not in self.commands:
            import importlib

            module, attr = self.LAZY[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("p2r: aborted", err=True)
            sys.exit(130)
        except UserError as e:  # the project's own: one line, never a traceback
            click.echo(f"p2r: error: {e}", err=True)
            sys.exit(USER_ERROR_EXIT)
        except click.ClickException as e:
            message = e.format_message()
            if isinstance(e, click.UsageError) and e.ctx is not None:
                message += f" (see '{e.ctx.command_path} --help')"
            click.echo(f"p2r: error: {message}", err=True)
            sys.exit(e.exit_code if e.exit_code else USER_ERROR_EXIT)


def _config_error(error: Any) -> UserError:
    """A pydantic ValidationError as one line: the first bad field and what is wrong with it."""
    first = error.errors()[0]
    return UserError(f"{'.'.join(str(p) for p in first['loc']) or 'config'}: {first['msg']}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """P2R Platform: perceive-to-reason visual reasoning - models, data, inference."""


# ------------------------------------------------------------------------------------ models


@cli.group()
def models() -> None:
    """Build model checkpoints."""


# ``p2r models tiny --preset``: "tiny" and p2r.models.tiny.PRESETS (not imported: --help stays instant).
MODEL_PRESETS = ("tiny", "qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-2b")


@models.command("tiny")
@click.argument("out_arg", metavar="[OUT]", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory to write the checkpoint to (or give it as OUT).")
@click.option("--seed", type=int, default=0, show_default=True, help="Weight initialisation seed.")
@click.option("--preset", type=click.Choice(MODEL_PRESETS), default="tiny", show_default=True,
              help="tiny: the 2-layer test model; qwen3-vl-2b / 4b / 8b: the real architecture, random bf16 "
                   "weights (4B: 8.9 GB, 8B: 17.5 GB), tokenizer padded to the real vocabulary and special-token "
                   "ids; 2b fits one 80 GiB GPU for the device check (bench/gpu_step.py).")
@click.option("--pretrain", is_flag=True,
              help="tiny only: train it supervised on the synthetic dot task (perceiver boxes, reasoner answers "
                   "from crops, direct answers, verifier verdicts) - the local stand-in for Qwen3-VL-Instruct; "
                   "cached by the digest of its inputs.")
@click.option("--time-budget-s", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="With --pretrain: stop training after this long (the record says so).")
def models_tiny(out_arg: Path | None, out: Path | None, seed: int, preset: str, pretrain: bool,
                time_budget_s: float) -> None:
    """Write a random-initialised Qwen3-VL checkpoint: the tiny one (tests, demo) or a real-size preset;
    with --pretrain, the tiny one trained on the synthetic dot task."""
    if (out_arg is None) == (out is None):
        raise UserError("give the output directory once: OUT or --out")
    target = out_arg or out
    assert target is not None
    if pretrain:
        if preset != "tiny":
            raise UserError("--pretrain trains the tiny preset only")
        from p2r.models.pretrain import PretrainConfig, install_pretrained

        record = install_pretrained(target, PretrainConfig(seed=seed), time_budget_s=time_budget_s)
        click.echo(f"wrote pretrained tiny Qwen3-VL checkpoint to {target} ({record['steps_run']} steps, "
                   f"digest {record['digest']})")
        return
    if preset == "tiny":
        from p2r.models.tiny import write_tiny_model

        path = write_tiny_model(target, seed=seed)
        click.echo(f"wrote tiny Qwen3-VL checkpoint to {path}")
        return
    from p2r.models.tiny import write_preset_model

    path = write_preset_model(target, preset, seed=seed, progress=True)
    click.echo(f"wrote random {preset} checkpoint to {path}")


@models.command("upload")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("dest")
def models_upload(src: Path, dest: str) -> None:
    """Copy model directory SRC and its manifest to DEST (s3://BUCKET/PREFIX): seeds object
    storage (e.g. MinIO from a volume) with a model the servers load. The manifest goes last."""
    from p2r.services.checkpoints import upload_model

    done = upload_model(src, dest)  # a CheckpointError is a UserError: one line, exit 2
    click.echo(f"{dest}: {done['uploaded']} of {done['files']} files uploaded ({done['skipped']} already there "
               f"with the same sha256), {done['bytes']} bytes in all")


@models.command("wait")
@click.argument("uri")
@click.option("--poll-s", type=click.FloatRange(min=0.1), default=10.0, show_default=True)
@click.option("--timeout-s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Give up (exit 1) after this many seconds; 0 waits forever.")
def models_wait(uri: str, poll_s: float, timeout_s: float) -> None:
    """Wait until URI can be loaded: s3://BUCKET/PREFIX has its manifest.json (written last by
    `p2r models upload`), s3://BUCKET exists. Says what it waits for while it waits (a role pod's
    init container: the pod shows Init, not a crash loop). hf:// and paths return at once."""
    from p2r.controller.storage import wait_for

    if not wait_for(uri, poll_s=poll_s, timeout_s=timeout_s, say=lambda m: click.echo(m, err=True)):
        raise SystemExit(1)
    click.echo(f"{uri}: ready")


@models.command("manifest")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def models_manifest(directory: Path) -> None:
    """Write DIRECTORY/manifest.json (every file's sha256), so a server loads that local model
    directory verified, without allow_unverified_local."""
    from p2r.services.checkpoints import verify_checkpoint_dir, write_manifest

    verify_checkpoint_dir(directory, require_manifest=False)
    manifest = write_manifest(directory)
    verify_checkpoint_dir(directory)
    click.echo(f"wrote {manifest}")


# -------------------------------------------------------------------------------------- data


@cli.group()
def data() -> None:
    """Build and check training data (P2R-10k parquet layout)."""


@data.command("synth")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for train.parquet (and images/).")
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of samples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-mode", type=click.Choice(["path", "bytes"]), default="path", show_default=True,
              help="Store images as files under out/images (path) or inline in the parquet (bytes).")
@click.option("--task", type=click.Choice(SYNTH_TASKS), default="objects", show_default=True,
              help="objects: shapes and words in three answer forms; dot: the pipeline's 'colour of the dot on "
                   "the red square' (legible only in a crop).")
def data_synth(out: Path, n: int, seed: int, image_mode: str, task: str) -> None:
    """Write a synthetic fine-grained VQA set with ground-truth answers and boxes."""
    from p2r.data.dataset import write_synthetic

    path = write_synthetic(out, n, seed=seed, image_mode=image_mode, progress=True, task=task)
    click.echo(f"wrote {n} samples to {path}")


@data.command("upload")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("dest")
def data_upload(src: Path, dest: str) -> None:
    """Copy data set directory SRC (e.g. `p2r data synth` output) to DEST (s3://BUCKET/PREFIX)
    with a manifest written last; files already there with the same sha256 are skipped."""
    from p2r.services.checkpoints import upload_model

    done = upload_model(src, dest, model=False)
    click.echo(f"{dest}: {done['uploaded']} of {done['files']} files uploaded ({done['skipped']} already there "
               f"with the same sha256), {done['bytes']} bytes in all")


@data.command("fetch")
@click.argument("src")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
def data_fetch(src: str, dest: Path) -> None:
    """Copy the data set at SRC (s3://BUCKET/PREFIX, written by `p2r data upload`) into DEST,
    each file checked against its manifest (a trainer pod's init container)."""
    from p2r.controller.storage import fetch_data

    done = fetch_data(src, dest)
    click.echo(f"fetched {done} files from {src} to {dest}")


@data.command("check")
@click.argument("parquet", type=click.Path(path_type=Path))
@click.option("--image-prefix", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory image paths are relative to (default: the parquet's directory).")
def data_check(parquet: Path, image_prefix: Path | None) -> None:
    """Validate a P2R-10k-layout parquet, decoding every image; report the first malformed row and field."""
    from p2r.data.dataset import check_images, load_samples

    samples = load_samples(parquet, image_prefix)
    images = check_images(samples, progress=sys.stderr.isatty())
    forms = Counter(s.form.value for s in samples)
    click.echo(f"{len(samples)} valid rows, {images} images decoded: "
               + ", ".join(f"{k}={v}" for k, v in sorted(forms.items())))


# --------------------------------------------------------------------------------- inference


def _answer_one(
    model: str, image_path: Path, question: str, form: str, out: Path, max_pixels: int
) -> dict[str, Any]:
    """Run one question through vLLM in P2R mode and save the annotated image."""
    from p2r.core.flow import P2RConfig, Question, run_p2r
    from p2r.core.generation import Sampling
    from p2r.core.images import MIN_PIXELS, PixelBounds, decode_image
    from p2r.core.prompts import AnswerForm
    from p2r.services.engine import EngineLimits, OfflineEngine

    if not image_path.is_file():
        raise UserError(f"--image: no such file {image_path}")
    if not question.strip():
        raise UserError("--question is empty")
    image = decode_image(image_path.read_bytes(), field="--image")
    answer_form = AnswerForm.parse(form)
    bounds = PixelBounds(MIN_PIXELS, max_pixels)
    click.echo(f"starting vLLM on {model} ...", err=True)
    engine = OfflineEngine(model, EngineLimits(max_model_len=16384, max_num_seqs=4))
    config = P2RConfig(
        bounds=bounds,
        perceive=Sampling(max_tokens=128),
        reason=Sampling(max_tokens=128),
    )
    started = time.perf_counter()
    [result] = run_p2r([Question(image, question, answer_form)], engine, engine, config)
    elapsed = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    result.evidence.images[0].save(out)
    return {
        "question": question,
        "answer_form": answer_form.value,
        "perceiver_output": result.perceiver_output,
        "regions": [r.to_json() for r in result.regions],
        "with_evidence": result.evidence.with_evidence,
        "crops": result.evidence.num_crops,
        "reasoner_output": result.reasoner_output,
        "answer": result.answer,
        "annotated_image": str(out),
        "seconds": round(elapsed, 2),
    }


def _print_result(result: dict[str, Any]) -> None:
    regions = result["regions"]
    click.echo(f"question : {result['question']!r}")
    if regions:
        click.echo(f"regions  : {json.dumps(regions)}")
    else:
        click.echo("regions  : none valid in the perceiver reply -> reasoner answered without evidence")
    click.echo(f"perceiver: {result['perceiver_output'][:200]!r}")
    click.echo(f"crops    : {result['crops']}")
    click.echo(f"answer   : {result['answer'][:200]!r}")
    click.echo(f"annotated: {result['annotated_image']}")
    click.echo(f"P2R took {result['seconds']} s (perceive + evidence + reason)")


@cli.command("answer")
@click.option("--model", required=True, help="Checkpoint directory (Hugging Face format).")
@click.option("--image", "image_path", type=click.Path(path_type=Path), required=True)
@click.option("--question", required=True)
@click.option("--form", type=click.Choice(["mca", "na", "free_form"]), default="mca", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("annotated.png"),
              show_default=True, help="Where to write the annotated image.")
@click.option("--max-pixels", type=click.IntRange(min=4096), default=512 * 32 * 32, show_default=True,
              help="smart_resize pixel budget per image (training uses 2097152).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def answer(model: str, image_path: Path, question: str, form: str, out: Path, max_pixels: int,
           as_json: bool) -> None:
    """Answer one question about an image in P2R mode (perceive -> evidence -> reason)."""
    result = _answer_one(model, image_path, question, form, out, max_pixels)
    click.echo(json.dumps(result, indent=2)) if as_json else _print_result(result)


@cli.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("p2r-demo"),
              show_default=True, help="Where the tiny model, data and outputs go.")
@click.option("--index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which synthetic question to answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (as `p2r answer --json`).")
def demo(workdir: Path, index: int, as_json: bool) -> None:
    """Build the tiny model and synthetic data, answer one question in P2R mode (the main job is
    `p2r pipeline run`)."""
    from p2r.data.dataset import load_samples, write_synthetic
    from p2r.models.tiny import write_tiny_model

    model_dir = workdir / "tiny-model"
    if not (model_dir / "config.json").is_file():
        write_tiny_model(model_dir)
    say = (lambda line: click.echo(line, err=True)) if as_json else click.echo  # stdout: the JSON alone
    say(f"tiny model : {model_dir}")
    n = max(6, index + 1)
    parquet = write_synthetic(workdir / "synthetic", n, progress=True)
    sample = load_samples(parquet)[index]
    image_path = sample.images[0].path
    assert image_path is not None
    say(f"data       : {parquet} ({n} samples); answering #{index} "
        f"[{sample.form.value}, truth {sample.ground_truth!r}]")
    result = _answer_one(str(model_dir), image_path, sample.question, sample.form.value,
                         workdir / "annotated.png", 512 * 32 * 32)
    click.echo(json.dumps(result, indent=2)) if as_json else _print_result(result)


# ------------------------------------------------------------------------------------- serve


@cli.command("serve")
@click.argument("roles", nargs=-1, required=True,
                type=click.Choice(["perceiver", "reasoner", "verifier", "gateway"]))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML config file (P2R_* environment variables override it; flags override both).")
@click.option("--model", default=None, help="Checkpoint: directory, file:// or s3:// URI.")
@click.option("--host", default=None, help="Bind address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="gRPC port (0 = any free port).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (0 = any free port).")
@click.option("--http-port", type=int, default=None, help="Gateway HTTP facade port.")
@click.option("--admin-port", type=int, default=None,
              help="Admin gRPC port (LoadCheckpoint; off on a gateway-only server unless admin: true).")
def serve(roles: tuple[str, ...], config_path: Path | None, model: str | None, host: str | None,
          port: int | None, metrics_port: int | None, http_port: int | None, admin_port: int | None) -> None:
    """Serve roles over gRPC on one vLLM engine: perceiver, reasoner, verifier, gateway."""
    import asyncio
    import logging

    from pydantic import ValidationError

    from p2r.services.checkpoints import CheckpointError
    from p2r.services.config import load_config
    from p2r.services.server import serve as run_server

    try:
        config = load_config(config_path, roles=list(dict.fromkeys(roles)), model=model, host=host, port=port,
                             metrics_port=metrics_port, http_port=http_port, admin_port=admin_port)
    except ValidationError as e:
        raise _config_error(e) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(run_server(config))
    except CheckpointError as e:
        raise UserError(str(e)) from None


@cli.command("ask")
@click.option("--target", default="127.0.0.1:50051", show_default=True, help="Gateway gRPC address.")
@click.option("--image", "image_path", type=click.Path(path_type=Path), required=True)
@click.option("--question", required=True)
@click.option("--form", type=click.Choice(["mca", "na", "free_form"]), default="mca", show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.001), default=300.0, show_default=True,
              help="Deadline in seconds.")
@click.option("--stream", is_flag=True, help="P2R.AnswerStream: print each event as it arrives, one JSON "
              "object a line: {\"regions\": ...}, then {\"delta\": ...} per text chunk, then {\"response\": ...}.")
def ask(target: str, image_path: Path, question: str, form: str, timeout_s: float, stream: bool) -> None:
    """Ask a running gateway (P2R.Answer over gRPC); prints the response as JSON."""
    import grpc
    from google.protobuf.json_format import MessageToJson

    from p2r.core.prompts import AnswerForm
    from p2r.services.client import Client
    from p2r.services.protocol import FORM_TO_PB
    from p2r.v1 import p2r_pb2 as pb

    if not image_path.is_file():
        raise UserError(f"--image: no such file {image_path}")
    request = pb.AnswerRequest(image=image_path.read_bytes(), question=question,
                               answer_form=FORM_TO_PB[AnswerForm.parse(form)])
    try:
        with Client(target, timeout_s=timeout_s) as client:
            if stream:
                for event in client.answer_stream(request):
                    click.echo(MessageToJson(event, preserving_proto_field_name=True, indent=None))
                return
            response = client.answer(request)
    except grpc.RpcError as e:
        raise UserError(f"{target}: {e.code().name}: {e.details()}") from None
    click.echo(MessageToJson(response, preserving_proto_field_name=True))


@cli.command("train")
@click.option("--role", type=click.Choice(["perceiver", "reasoner", "baseline"]), required=True,
              help="perceiver = stage 1, reasoner = stage 2, baseline = plain GRPO (trainer/config.py TrainRole).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="YAML training config (P2R_TRAIN_* environment variables override it).")
@click.option("--resume", default=None, help="'auto' (newest complete checkpoint under output) or a URI.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None)
@click.option("--plan", is_flag=True, help="Print the per-GPU memory plan and exit (0: it fits); no GPU, no "
              "weights read. The config's model: a local checkpoint directory or preset:qwen3-vl-2b|4b|8b.")
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="With --plan: GPUs (ranks) of the run [1].")
@click.option("--gpu-memory", default=None, help="With --plan: memory of one GPU, e.g. 80GiB, 24GB.")
@click.option("--cpu", "plan_cpu", is_flag=True, help="With --plan: CPU ranks (--gpus ranks of --gpu-memory "
              "each): fp32, no engine terms.")
def train(role: str, config_path: Path, resume: str | None, max_steps: int | None, plan: bool,
          gpus: int | None, gpu_memory: str | None, plan_cpu: bool) -> None:
    """Run one PRA-GRPO stage (perceiver = stage 1, reasoner = stage 2) or the plain GRPO
    baseline (original image, no-evidence prompt, own answer graded), or plan its memory."""
    import logging

    from pydantic import ValidationError

    from p2r.data.dataset import DataError
    from p2r.services.checkpoints import CheckpointError
    from p2r.trainer.config import load_train_config

    if not plan and (gpus is not None or gpu_memory is not None or plan_cpu):
        raise UserError("--gpus, --gpu-memory and --cpu go with --plan")
    if plan and gpu_memory is None:
        raise UserError("--plan needs --gpu-memory (e.g. 80GiB)")
    try:
        config = load_train_config(config_path, role=role, max_steps=max_steps)
    except ValidationError as e:
        raise _config_error(e) from None
    if plan:
        assert gpu_memory is not None
        _print_plan(config, gpus or 1, gpu_memory, plan_cpu)
        return
    from p2r.trainer.loop import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result = Trainer(config, resume=resume).run()
    except (CheckpointError, DataError) as e:  # a missing checkpoint, a bad or unusable data set
        raise UserError(str(e)) from None
    click.echo(json.dumps({"checkpoint": result["checkpoint"], "steps": result["steps"],
                           "param_digest": result["param_digest"]}))


def _print_plan(config: Any, gpus: int, gpu_memory: str, cpu: bool) -> None:
    """``train --plan``: the table on stdout; when it does not fit, one line naming the largest term."""
    from p2r.trainer.plan import estimate, format_plan, load_arch, parse_bytes

    plan = estimate(config, load_arch(config.model), gpus, parse_bytes(gpu_memory), cpu=cpu)
    click.echo(format_plan(plan, config))
    error = plan.error_line()
    if error is not None:
        raise UserError(error)


def main() -> None:
    """Console entry point."""
    try:
        cli(prog_name="p2r")
    finally:
        skip_exit_collection()


if __name__ == "__main__":
    main()
