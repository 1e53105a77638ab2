"""The dot task and the tiny model's supervised pretraining (p2r/data/synth.py, p2r/models/pretrain.py).

Pretraining itself runs at toy size here (a few steps); what the full recipe teaches is measured by
the signal tests (test_signal.py) on the session's pretrained base.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from p2r.core import prompts
from p2r.core.bbox import Region, parse_regions
from p2r.core.evidence import build_evidence
from p2r.core.images import MIN_PIXELS, PixelBounds, resize_for_model
from p2r.data import synth
from p2r.models import pretrain

ROOT = Path(__file__).resolve().parents[1]
TOY = pretrain.PretrainConfig(steps=2, batch_size=4, pool=6, eval_every=0, warmup_steps=1)
BOUNDS = PixelBounds(MIN_PIXELS, 65536)


def _pixels(image, box: list[float]) -> tuple[int, int, int, int]:
    w, h = image.size
    return (round(box[0] / 1000 * w), round(box[1] / 1000 * h), round(box[2] / 1000 * w), round(box[3] / 1000 * h))


@pytest.mark.parametrize("index", range(6))
def test_dot_sample_ground_truth_matches_its_pixels(index: int) -> None:
    """The answer names the red square's dot; every square's dot differs (a wrong crop answers
    wrongly); the ground-truth box holds red pixels and the dot's colour at its centre."""
    s = synth.make_dot_sample(index, seed=5)
    assert s.image.size == (synth.DOT_CANVAS, synth.DOT_CANVAS)
    assert sorted(s.dots.values()) == sorted(synth.DOT_OPTIONS)
    assert s.answer == synth.OPTION_LETTERS[synth.DOT_OPTIONS.index(s.dots["red"])]
    assert s.gt_boxes == [s.squares["red"]]
    for colour, box in s.squares.items():
        x1, y1, x2, y2 = _pixels(s.image, box)
        assert s.image.getpixel((x1 + 4, y1 + 4)) == synth.COLOURS[colour]
        assert s.image.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == synth.DOT_COLOURS[s.dots[colour]]
    assert f"A. {synth.DOT_OPTIONS[0]}" in s.question and s.form is prompts.AnswerForm.MCA


def test_the_crop_magnifies_the_dot_that_the_model_resolution_shrinks() -> None:
    """The construction's premise, in pixels: at 65,536 model pixels the dot spans ~8 px; in the
    model-resized crop of the red square it spans over 25 px (a whole merged vision token)."""
    s = synth.make_dot_sample(0)
    scale_full = resize_for_model(s.image, BOUNDS).width / s.image.width
    evidence = build_evidence(s.image, [Region(*s.gt_boxes[0], label="red square")])
    crop = evidence.images[1]
    scale_crop = resize_for_model(crop, BOUNDS).width / crop.width
    assert synth.DOT_DIAMETER_PX * scale_full < 9
    assert synth.DOT_DIAMETER_PX * scale_crop > 25


def test_examples_use_the_methods_prompts_and_reference_formats() -> None:
    """Each role's example is the request the method sends, with the reply the reference expects."""
    rng = random.Random(0)
    views = pretrain.Views.of(synth.make_dot_sample(3), BOUNDS)
    s = views.sample
    perceiver = pretrain.make_example("perceiver", views, rng, perceiver_noise=0.0)
    assert [r.coords for r in parse_regions(perceiver.target)] == [tuple(float(v) for v in s.gt_boxes[0])]
    user = "".join(i["text"] for i in perceiver.request.messages[1]["content"] if i["type"] == "text")
    assert user.strip() in {prompts.perceiver_text(s.question, v) for v in ("train", "eval")}
    noisy = [pretrain.make_example("perceiver", views, rng, perceiver_noise=1.0).target for _ in range(12)]
    assert all(parse_regions(t)[0].coords != tuple(s.gt_boxes[0]) for t in noisy)
    reasoner = pretrain.make_example("reasoner", views, rng, 0.0)
    assert len(reasoner.request.images) == 2 and reasoner.target.endswith(f"<answer>{s.answer}</answer>")
    assert s.dot_colour in reasoner.target
    assert reasoner.request.images == views.evidence["red"]
    misses = [pretrain.make_example("reasoner", views, rng, 0.0, reasoner_miss=1.0) for _ in range(8)]
    for miss in misses:  # another square's crop, answered with that square's dot: a wrong answer
        colour = next(c for c, ims in views.evidence.items() if ims == miss.request.images)
        assert colour != "red" and miss.target.endswith(
            f"<answer>{synth.OPTION_LETTERS[synth.DOT_OPTIONS.index(s.dots[colour])]}</answer>")
    plain = pretrain.make_example("plain", views, rng, 0.0, reasoner_miss=1.0)
    assert plain.request.images == views.plain and plain.target.endswith(f"<answer>{s.answer}</answer>")
    assert pretrain.make_example("direct", views, rng, 0.0).target == s.answer
    verdicts = {pretrain.make_example("verifier", views, rng, 0.0).target for _ in range(20)}
    assert verdicts == {"Yes", "No"}
    with pytest.raises(ValueError, match="unknown pretraining role"):
        pretrain.make_example("critic", views, rng, 0.0)


def test_labels_cover_exactly_the_reply(tiny_model_dir: Path) -> None:
    """The loss sees the reply tokens and the end-of-turn token, never the prompt or padding."""
    from transformers import AutoProcessor

    batcher = pretrain.Batcher(AutoProcessor.from_pretrained(tiny_model_dir))
    tokenizer = batcher.tokenizer
    rng = random.Random(1)
    views = pretrain.Views.of(synth.make_dot_sample(1), BOUNDS)
    examples = [pretrain.make_example(r, views, rng, 0.0) for r in ("perceiver", "verifier", "reasoner")]
    batch = batcher(examples)
    for row, example in enumerate(examples):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tokenizer.decode(labelled) == example.target + tokenizer.eos_token


def test_pretraining_is_cached_by_digest_and_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same config, same weights, and not the initial ones; the time box stops a run and says so;
    a second call reuses the cache; another config is another digest; install_pretrained copies the
    cached base to the target."""
    monkeypatch.setenv("P2R_CACHE", str(tmp_path / "cache"))
    first = pretrain.pretrain(tmp_path / "a", TOY, progress=False, log=lambda _: None)
    assert first["steps_run"] == 2 and not first["stopped_early"]
    path, again = pretrain.pretrained_base(TOY, progress=False, log=lambda _: None)  # a second build
    assert path == tmp_path / "cache" / "pretrained" / TOY.digest() and again["digest"] == first["digest"]
    weights_a = load_file(tmp_path / "a" / "model.safetensors")
    weights_b = load_file(path / "model.safetensors")
    assert all(weights_a[k].equal(weights_b[k]) for k in weights_a)
    untrained = pretrain.pretrain(tmp_path / "init", TOY, time_budget_s=0.0, progress=False, log=lambda _: None)
    assert untrained["stopped_early"] and untrained["steps_run"] == 0  # the time box says where it stopped
    weights_0 = load_file(tmp_path / "init" / "model.safetensors")
    assert not all(weights_a[k].equal(weights_0[k]) for k in weights_a)
    logs: list[str] = []
    cached = pretrain.pretrain(tmp_path / "a", TOY, progress=False, log=logs.append)
    assert cached == first and logs and "cached" in logs[0]
    assert pretrain.PretrainConfig(**{**TOY.__dict__, "seed": 1}).digest() != TOY.digest()
    installed = pretrain.install_pretrained(tmp_path / "model", TOY, progress=False, log=lambda _: None)
    assert installed["digest"] == TOY.digest() and (tmp_path / "model" / "manifest.json").is_file()
    assert not list(tmp_path.glob("*.partial"))


def test_cli_pretrain_refuses_a_real_size_preset(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "p2r.cli", "models", "tiny", str(tmp_path / "m"), "--pretrain",
                             "--preset", "qwen3-vl-4b"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == "p2r: error: --pretrain trains the tiny preset only\n"
    assert not (tmp_path / "m").exists()


def test_pipeline_config_checks_the_pretrain_block(tmp_path: Path) -> None:
    """A typo in prepare.pretrain fails at load time in one line, not minutes into the run."""
    from p2r.controller.config import Prepare

    with pytest.raises(ValueError, match=r"pretrain: .*unexpected keyword argument 'stepz'"):
        Prepare(tiny_model=True, pretrain={"stepz": 3})
    with pytest.raises(ValueError, match="set tiny_model: true"):
        Prepare(tiny_model=False, pretrain={})
    assert Prepare(tiny_model=True, pretrain={}, task="dot").pretrain == {}


def test_cli_writes_the_dot_task(tmp_path: Path) -> None:
    """`p2r data synth --task dot` writes the pipeline's task in the P2R-10k layout."""
    from p2r.data.dataset import load_samples

    result = subprocess.run([sys.executable, "-m", "p2r.cli", "data", "synth", "--out", str(tmp_path), "--n", "2",
                             "--task", "dot"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    samples = load_samples(tmp_path / "train.parquet")
    assert [s.category for s in samples] == [synth.DOT_CATEGORY] * 2
    assert [s.gt_bboxes for s in samples] == [synth.make_dot_sample(i).gt_boxes for i in range(2)]
