"""The ``p2r`` command as a user runs it: listed commands, one-line errors, real outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

P2R = [sys.executable, "-m", "p2r.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run([*P2R, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("answer", "ask", "data", "demo", "models", "serve"):
        assert command in out.stdout
    assert "synth" in run("data", "--help").stdout and "check" in run("data", "--help").stdout
    assert "tiny" in run("models", "--help").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bogus",), "p2r: error: No such command 'bogus'. (see 'p2r --help')"),
        (("data", "synth", "--out", "/tmp/x", "--n", "0"), "p2r: error: Invalid value for '--n'"),
        (("data", "check", "/nonexistent.parquet"), "p2r: error: /nonexistent.parquet: no such data file"),
        (("answer", "--model", "m", "--image", "/nonexistent.png", "--question", "q"),
         "p2r: error: --image: no such file /nonexistent.png"),
        (("serve", "perceiver"), "p2r: error: config: Value error, a model is required"),
        (("serve", "gateway", "--config", "/nonexistent.yaml"), "p2r: error: --config: no such file"),
        (("serve", "oracle"), "p2r: error: Invalid value for '{perceiver|reasoner|verifier|gateway}...': 'oracle'"),
    ],
)
def test_errors_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    out = run(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr


def test_only_the_projects_user_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """``UserError`` (and its subclasses, e.g. ``CheckpointError``) is one line and exit 2; a
    ValueError from anywhere else is a bug and keeps its traceback."""
    from p2r.cli import _Group
    from p2r.core.errors import USER_ERROR_EXIT, UserError
    from p2r.services.checkpoints import CheckpointError

    group = _Group(name="p2r")

    @group.command("user")
    def user() -> None:
        raise UserError("--x: not a number")

    @group.command("checkpoint")
    def checkpoint() -> None:
        raise CheckpointError("s3://b/p/: no manifest.json")

    @group.command("bug")
    def bug() -> None:
        int("a library bug")

    for name, line in (("user", "p2r: error: --x: not a number"),
                       ("checkpoint", "p2r: error: s3://b/p/: no manifest.json")):
        with pytest.raises(SystemExit) as ended:
            group.main([name], prog_name="p2r")
        assert ended.value.code == USER_ERROR_EXIT and capsys.readouterr().err.splitlines() == [line]
    with pytest.raises(ValueError, match="invalid literal for int"):
        group.main(["bug"], prog_name="p2r")


def test_bad_image_and_empty_question_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = run("answer", "--model", "m", "--image", str(bad), "--question", "q")
    assert out.returncode == 2 and out.stderr.startswith("p2r: error: --image: cannot decode image")
    out = run("answer", "--model", "m", "--image", str(bad), "--question", "  ")
    assert out.returncode == 2 and out.stderr.strip() == "p2r: error: --question is empty"


def test_models_tiny_and_data_commands(tmp_path: Path) -> None:
    out = run("models", "tiny", "--out", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
    out = run("data", "synth", "--out", str(tmp_path / "d"), "--n", "4", "--image-mode", "bytes")
    assert out.returncode == 0 and "wrote 4 samples" in out.stdout
    out = run("data", "check", str(tmp_path / "d" / "train.parquet"))
    assert out.returncode == 0 and out.stdout.strip() == "4 valid rows, 4 images decoded: free_form=1, mca=2, na=1"


def test_data_check_reports_malformed_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"prompt": [{"role": "user", "content": "<image>Q?"}], "images": [{"path": "missing.png"}],
           "reward_model": {"ground_truth": "A"}, "extra_info": {"answer_form": "mca", "index": 0}}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "t.parquet")
    out = run("data", "check", str(tmp_path / "t.parquet"))
    assert out.returncode == 2
    assert out.stderr.startswith("p2r: error: row 0: field 'images[0].path': no file at")


def test_data_check_decodes_every_image_and_checks_boxes(tmp_path: Path) -> None:
    """Garbage bytes, and a PNG whose header is valid but whose pixel data is cut off, both pass
    a header-only look; ``data check`` decodes them and names the row and image. A bad
    ``gt_bboxes`` value names its row and box. One line on stderr, exit 2."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buf, format="PNG")
    good, truncated = buf.getvalue(), buf.getvalue()[: len(buf.getvalue()) // 2]

    def row(i: int, images: list[bytes], boxes: list[list[float]] | None = None) -> dict[str, object]:
        return {"prompt": [{"role": "user", "content": "<image>" * len(images) + "Q?"}],
                "images": [{"bytes": b, "path": None} for b in images], "reward_model": {"ground_truth": "A"},
                "extra_info": {"answer_form": "mca", "index": i, "gt_bboxes": boxes or [[1.0, 2.0, 3.0, 4.0]]}}

    cases = [
        ([row(0, [good]), row(1, [good, b"\x89PNG\r\n\x1a\n garbage"])], "row 1: field 'images[1]': "),
        ([row(0, [good]), row(1, [good]), row(2, [truncated])], "row 2: field 'images[0]': "),
        ([row(0, [good]), row(1, [good], [[1.0, 2.0, 3.0, 4.0], [5.0, float("nan"), 6.0, 7.0]])],
         "row 1: field 'extra_info.gt_bboxes[1]' has a non-finite coordinate"),
        ([row(0, [good], [[9.0, 2.0, 3.0, 4.0]])], "row 0: field 'extra_info.gt_bboxes[0]' must have x1 <= x2"),
    ]
    for k, (rows, message) in enumerate(cases):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{k}.parquet")
        out = run("data", "check", str(tmp_path / f"{k}.parquet"))
        assert out.returncode == 2, (message, out.stdout)
        assert out.stderr.startswith(f"p2r: error: {message}") and len(out.stderr.strip().splitlines()) == 1, \
            out.stderr
    pq.write_table(pa.Table.from_pylist([row(0, [good, good]), row(1, [good])]), tmp_path / "ok.parquet")
    out = run("data", "check", str(tmp_path / "ok.parquet"))
    assert out.returncode == 0 and out.stdout.strip() == "2 valid rows, 3 images decoded: mca=2", out.stderr


def test_data_check_refuses_paths_outside_the_prefix_and_prompts_without_a_tag(tmp_path: Path) -> None:
    """Issue 25 item 13: a real PNG reached by ``..`` or by an absolute path, and a prompt with no
    ``<image>`` tag, passed ``p2r data check`` (exit 0); each is one line naming row and field,
    exit 2. The trainer reads rows through the same parser (``load_samples``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    prefix = tmp_path / "data"
    (prefix / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(prefix / "images" / "ok.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "outside.png")

    def row(i: int, path: str, content: str = "<image>Q?") -> dict[str, object]:
        return {"prompt": [{"role": "user", "content": content}], "images": [{"bytes": None, "path": path}],
                "reward_model": {"ground_truth": "A"}, "extra_info": {"answer_form": "mca", "index": i}}

    cases = [
        ([row(0, "images/ok.png"), row(1, "../outside.png")],
         "row 1: field 'images[0].path': '../outside.png' is outside the image prefix"),
        ([row(0, str(tmp_path / "outside.png"))],
         f"row 0: field 'images[0].path': '{tmp_path / 'outside.png'}' is outside the image prefix"),
        ([row(0, "images/ok.png"), row(1, "images/ok.png", "Q without a tag?")],
         "row 1: field 'prompt' has 0 <image> tag(s) for 1 image(s)"),
    ]
    for k, (rows, message) in enumerate(cases):
        pq.write_table(pa.Table.from_pylist(rows), prefix / f"{k}.parquet")
        out = run("data", "check", str(prefix / f"{k}.parquet"), "--image-prefix", str(prefix))
        assert out.returncode == 2 and out.stderr.startswith(f"p2r: error: {message}"), (message, out.stdout,
                                                                                           out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    pq.write_table(pa.Table.from_pylist([row(0, "images/ok.png")]), prefix / "ok.parquet")
    out = run("data", "check", str(prefix / "ok.parquet"), "--image-prefix", str(prefix))
    assert out.returncode == 0 and out.stdout.strip() == "1 valid rows, 1 images decoded: mca=1", out.stderr


@pytest.mark.engine
def test_demo_answers_one_question_through_a_real_engine(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``p2r demo --json`` (one engine start, shared with ``p2r answer``'s code path): the tiny
    model and data are built, the question answered in P2R mode, the annotated image written;
    stdout is the JSON alone, and the same result prints as the human-readable lines."""
    from p2r.cli import _print_result

    out = run("demo", "--workdir", str(tmp_path), "--json", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["annotated_image"] == str(tmp_path / "annotated.png") and (tmp_path / "annotated.png").is_file()
    assert result["answer_form"] in ("mca", "na", "free_form") and isinstance(result["regions"], list)
    assert (tmp_path / "tiny-model" / "config.json").is_file() and "answering #0" in out.stderr
    _print_result(result)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("answer   :") for line in lines)
    assert any(line.startswith("regions  :") for line in lines)


def test_train_resume_refuses_a_tampered_checkpoint_in_one_line(tmp_path: Path, tiny_model_dir: Path,
                                                                synthetic_dir: Path) -> None:
    """Issue 25 items 3 and 11 through ``p2r train --resume``: a checkpoint whose manifest was
    regenerated over a ``train_state/.metadata`` pointing at ``../../../outside/x.distcp`` (a real
    shard there: stock DCP read it and resumed, exit 0), and one whose ``trainer_state.json``
    says step 10**30 (a ValueError in seeding), each exit 2 with one line naming the path or
    the field - before any engine starts."""
    import shutil

    import yaml

    from p2r.services.checkpoints import MANIFEST, write_manifest
    from p2r.trainer.state import STATE_FILE, PositionState, TrainerState, capture_rng, write_state
    from tests.test_resume_state import _optimiser, rewrite_storage, saved_train_state

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "role": "perceiver", "model": str(tiny_model_dir), "data": str(synthetic_dir / "train.parquet"),
        "output": str(tmp_path / "out"), "workdir": str(tmp_path / "work"),
        "reward_plugin": "tests.plugins:starts_with_digit", "max_pixels": 65536, "max_model_len": 2048}))
    outside = tmp_path / "outside" / "x.distcp"
    for case, named in (("path", "key '../../../outside/x.distcp' is not a safe relative path"),
                        ("step", "trainer_state.json: field 'position.step'")):
        ckpt = tmp_path / case / "step-1"
        shutil.copytree(tiny_model_dir, ckpt)
        write_state(ckpt, TrainerState(position=PositionState(step=1, epoch=0, offset=2),
                                       scheduler=_optimiser()[2].state_dict(), rng=capture_rng(), world_size=1))
        directory = saved_train_state(ckpt / "train_state")
        if case == "path":
            outside.parent.mkdir()
            outside.write_bytes(next(directory.glob("*.distcp")).read_bytes())
            rewrite_storage(directory, "../../../outside/x.distcp")
        else:
            state = json.loads((ckpt / STATE_FILE).read_text())
            state["position"]["step"] = 10**30
            (ckpt / STATE_FILE).write_text(json.dumps(state))
        (ckpt / MANIFEST).unlink()
        write_manifest(ckpt, step=1, role="perceiver")  # what someone with write access would do
        out = run("train", "--config", str(config), "--role", "perceiver", "--resume", str(ckpt), timeout=300)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and lines[-1].startswith("p2r: error: ") and named in lines[-1], out.stderr[-2000:]
        assert "Traceback" not in out.stderr and "vLLM" not in out.stderr, out.stderr[-2000:]
