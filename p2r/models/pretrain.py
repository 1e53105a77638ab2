"""Supervised pretraining of the tiny Qwen3-VL on the synthetic dot task: a base that knows the formats.

The reference starts PRA-GRPO from Qwen3-VL-Instruct, a model that already emits bbox JSON,
answers in ``<think>…</think><answer>…</answer>`` and grades with "Yes"/"No". A random tiny model
knows none of it, so RL on it shows only noise. This step stands in for the instruction tuning:
it trains the tiny model, supervised, on the ``dot`` task (``p2r.data.synth.make_dot_sample``) in
every prompt the method uses, built by the method's own request builders (``p2r.core.flow``), so
the pixels and tokens are those the trainer, the role servers and the evaluation will send:

- perceiver: the perceiver prompt (train and eval variants, policy and service layouts) -> the
  red square's box as the reference's JSON. A share of these targets is deliberately the box of a
  *distractor* square (``perceiver_noise``): the base perceiver looks at the right square only part
  of the time, which leaves stage 1 something to learn from the frozen reasoner's verdicts;
- reasoner: the annotated image plus a crop -> ``<think>`` naming the colour of the dot in the
  crop, then that option's letter (mostly the red square's crop; sometimes another square's, so a
  wrong box earns a wrong answer); and, without evidence, the plain reasoner prompt;
- direct answering (the evaluation's default mode): the letter alone;
- verifier: the grading prompt -> "Yes" / "No".

The loss is on the reply tokens only. The run is deterministic for a seed (fixed data order,
seeded init, fixed thread count), time-boxed (``time_budget_s`` stops it early and the result
records how far it got), and cached: the output holds ``pretrain.json`` with the digest of every
input, and a second call with the same inputs returns the cached model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from p2r.core import prompts
from p2r.core.answers import extract_answer
from p2r.core.bbox import Region, parse_regions
from p2r.core.evidence import build_evidence
from p2r.core.flow import verifier_request
from p2r.core.generation import ChatRequest
from p2r.core.images import MIN_PIXELS, PixelBounds, resize_for_model
from p2r.data import synth

RESULT_FILE = "pretrain.json"
FORMAT_VERSION = 1  # bump when the recipe changes in a way the config does not show
ROLES = ("perceiver", "reasoner", "plain", "direct", "verifier")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides the pretrained weights (the cache digest covers all of it)."""

    seed: int = 0
    # The initialisation's std: at 0.02 (the tiny model's default) the tied embedding swamps the
    # residual stream and 200 steps teach it nothing about where things are in the image; at 0.1 it
    # learns to locate the red square in ~150 steps (measured with a single-token probe).
    init_std: float = 0.1
    steps: int = 250
    # The first steps train the perceiver alone, on clean targets: locating the red square is the
    # slow skill (measured: hit rate 0.12 / 0.44 / 1.0 at steps 75 / 150 / 225 perceiver-only, while
    # in a mixed batch it stayed at chance for 250 steps). Stopping at 150 leaves it imperfect.
    perceiver_steps: int = 150
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    max_pixels: int = 65536
    # After the perceiver's steps, this share of its targets is a distractor's box: the perceiver
    # keeps its format and some spread over the squares for stage 1 to sharpen.
    perceiver_noise: float = 0.5
    reasoner_miss: float = 0.3  # share of reasoner examples on another square's crop
    # Share of each role in a batch after the perceiver's steps (normalised); "plain" is the
    # reasoner without evidence (the fallback when no box is valid).
    mix: dict[str, float] = field(default_factory=lambda: {
        "perceiver": 0.15, "reasoner": 0.35, "plain": 0.05, "direct": 0.2, "verifier": 0.25})
    pool: int = 256  # distinct training samples (4! colourings x 4! dot orders: ample)
    eval_samples: int = 32
    eval_every: int = 50
    threads: int = 2

    def digest(self) -> str:
        """Digest of the config, the recipe version and the task's constants."""
        task = {k: getattr(synth, k) for k in dir(synth) if k.startswith("DOT_") and not callable(getattr(synth, k))}
        blob = json.dumps({"config": asdict(self), "format": FORMAT_VERSION, "task": task}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Example:
    """One supervised example: a chat request (messages, images) and the reply to learn."""

    role: str
    request: ChatRequest
    target: str


def box_json(box: list[float], label: str = synth.DOT_LABEL) -> str:
    """The reference's perceiver reply for one box, integer coordinates."""
    return json.dumps([{"bbox_2d": [round(v) for v in box], "label": label}])


def reasoner_reply(colour: str, with_evidence: bool = True) -> str:
    """A short chain of thought naming the dot's colour (the crop's, or the red square's when there
    is no crop), then that option's letter."""
    letter = synth.OPTION_LETTERS[synth.DOT_OPTIONS.index(colour)]
    where = "in the crop" if with_evidence else f"on the {synth.DOT_TARGET} square"
    return f"<think>The dot {where} is {colour}.</think><answer>{letter}</answer>"


@dataclass
class Views:
    """A sample and the resized images every role's request needs, made once (the resize of a
    2,048-px canvas costs as much as a training step's share of compute)."""

    sample: synth.DotSample
    original: Image.Image  # resized for the model
    evidence: dict[str, list[Image.Image]]  # by square colour: the annotated original and the crop, resized
    plain: list[Image.Image]  # the no-evidence fallback: the original alone

    @classmethod
    def of(cls, sample: synth.DotSample, bounds: PixelBounds) -> Views:
        """The views of ``sample``; the kept sample holds the resized image, not the 12 MB canvas
        (a pool of canvases would take gigabytes)."""
        original = resize_for_model(sample.image, bounds)
        evidence = {colour: [resize_for_model(im, bounds) for im in build_evidence(
                        sample.image, [Region(*box, label=f"{colour} square")]).images]
                    for colour, box in sample.squares.items()}
        return cls(replace(sample, image=original), original, evidence, [original])


def make_example(role: str, views: Views, rng: random.Random, perceiver_noise: float,
                 reasoner_miss: float = 0.0) -> Example:
    """The ``role`` example for a sample: the method's prompts and layouts (``p2r.core.flow``
    builds the same messages for the trainer, the role servers and the evaluation)."""
    sample = views.sample
    policy = rng.random() < 0.5  # the trained policy's layout, or the services' / evaluation's
    variant: prompts.Variant = "train" if rng.random() < 0.5 else "eval"
    q, form = sample.question, sample.form
    layout = prompts.policy_messages if policy else prompts.chat_messages
    if role == "perceiver":
        box = sample.gt_boxes[0]
        if rng.random() < perceiver_noise:
            box = sample.squares[rng.choice(synth.DOT_DISTRACTORS)]
        request = ChatRequest(layout(prompts.perceiver_text(q, variant), 1), [views.original])
        return Example(role, request, box_json(box))
    if role in ("reasoner", "plain"):
        # The reasoner reads the crop it is given: the red square's mostly, another square's
        # sometimes (``reasoner_miss``), so a perceiver that boxes the wrong square gets the wrong
        # square's colour back - a wrong answer - rather than a guess. Without evidence it answers
        # the question as best it can from the whole image.
        with_evidence = role == "reasoner"
        colour = synth.DOT_TARGET
        if with_evidence and rng.random() < reasoner_miss:
            colour = rng.choice(synth.DOT_DISTRACTORS)
        images = views.evidence[colour] if with_evidence else views.plain
        text = prompts.reasoner_text(q, form, with_evidence=with_evidence, variant=variant)
        reply = reasoner_reply(sample.dots[colour], with_evidence)
        return Example(role, ChatRequest(layout(text, len(images)), images), reply)
    if role == "direct":  # the evaluation's default mode (p2r.eval.inference)
        request = ChatRequest(prompts.chat_messages(prompts.direct_text(q, form), 1), [views.original])
        return Example(role, request, sample.answer)
    if role == "verifier":
        letters = synth.OPTION_LETTERS
        i = letters.index(sample.answer)
        j = i if rng.random() < 0.5 else rng.choice([k for k in range(len(letters)) if k != i])
        said = rng.choice([letters[j], synth.DOT_OPTIONS[j], f"{letters[j]}. {synth.DOT_OPTIONS[j]}"])
        return Example(role, verifier_request(q, sample.answer, said), "Yes" if i == j else "No")
    raise ValueError(f"unknown pretraining role {role!r} (expected one of: {', '.join(ROLES)})")


class Batcher:
    """Tokenises examples with the model's processor; labels mask everything but the reply."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos = self.tokenizer.eos_token

    def prompt_text(self, request: ChatRequest) -> str:
        """The prompt as the engine renders it (``services.engine``: the tokenizer's template)."""
        return self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False,
                                                  **(request.template_kwargs or {}))

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        texts = [self.prompt_text(e.request) + e.target + self.eos for e in examples]
        images = [im for e in examples for im in e.request.images]
        enc = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                             padding_side="right")
        labels = torch.full_like(enc["input_ids"], -100)
        lengths = enc["attention_mask"].sum(dim=1)
        for row, e in enumerate(examples):
            n = len(self.tokenizer.encode(e.target + self.eos, add_special_tokens=False))
            end = int(lengths[row])
            labels[row, end - n:end] = enc["input_ids"][row, end - n:end]
        enc["labels"] = labels
        return dict(enc)


@dataclass
class Probe:
    """Held-out greedy decoding of each role: the learning curve's points."""

    perceiver_hit: float  # the first box's centre lies in the red square
    reasoner_acc: float  # with the crop of the red square
    direct_acc: float  # default mode: the whole image only
    verifier_acc: float


def _centre_in(box: list[float], region: Region | None) -> bool:
    if region is None:
        return False
    cx, cy = (region.x1 + region.x2) / 2, (region.y1 + region.y2) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


@torch.no_grad()
def probe(model: Any, batcher: Batcher, held_out: list[Views]) -> Probe:
    """Greedy replies of each role on held-out samples (transformers' generate, no engine)."""
    rng = random.Random(0)
    scores: dict[str, list[float]] = {}
    for role in ("perceiver", "reasoner", "direct", "verifier"):
        examples = [make_example(role, v, rng, 0.0) for v in held_out]
        replies = _generate(model, batcher, examples, 40 if role != "verifier" else 2)
        for s, e, reply in zip((v.sample for v in held_out), examples, replies, strict=True):
            if role == "perceiver":
                regions = parse_regions(reply)
                ok = _centre_in(s.gt_boxes[0], regions[0] if regions else None)
            elif role == "reasoner":
                ok = extract_answer(reply) == s.answer
            else:
                ok = reply.strip() == e.target
            scores.setdefault(role, []).append(float(ok))
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    return Probe(mean["perceiver"], mean["reasoner"], mean["direct"], mean["verifier"])


def _generate(model: Any, batcher: Batcher, examples: list[Example], max_new_tokens: int) -> list[str]:
    replies: list[str] = []
    for i in range(0, len(examples), 16):
        chunk = examples[i:i + 16]
        texts = [batcher.prompt_text(e.request) for e in chunk]
        images = [im for e in chunk for im in e.request.images]
        enc = batcher.processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                                padding_side="left")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        replies += batcher.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return replies


def _roles(mix: dict[str, float], batch_size: int, rng: random.Random) -> list[str]:
    """A batch's roles: each role's share rounded, the remainder drawn by weight."""
    unknown = set(mix) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown pretraining roles {sorted(unknown)} (expected {', '.join(ROLES)})")
    total = sum(mix.values())
    roles = [r for r, w in mix.items() for _ in range(int(batch_size * w / total))]
    roles += rng.choices(list(mix), weights=list(mix.values()), k=batch_size - len(roles))
    return roles


def cached(out: Path, config: PretrainConfig) -> dict[str, Any] | None:
    """The recorded result when ``out`` holds a complete pretraining of exactly ``config``."""
    try:
        result = json.loads((out / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    # A build the time box cut short is not the config's model: the next call trains it again.
    complete = result.get("digest") == config.digest() and not result.get("stopped_early")
    return result if complete and (out / "config.json").is_file() else None


def pretrain(out: Path | str, config: PretrainConfig | None = None, *, time_budget_s: float = 600.0,
             progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the pretrained tiny model to ``out`` (or reuse it) and return its record.

    The record (also ``out/pretrain.json``) holds the digest, the steps run, whether the time
    box cut the run short, the wall time and the learning curve (``Probe`` points).
    """
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from p2r.models.tiny import write_tiny_model

    config = config or PretrainConfig()
    out = Path(out)
    hit = cached(out, config)
    if hit is not None:
        log(f"pretrained base: cached at {out} (digest {hit['digest']}, {hit['steps_run']} steps)")
        return hit
    started = time.monotonic()
    torch.manual_seed(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        write_tiny_model(work, seed=config.seed, init_std=config.init_std)
        processor = AutoProcessor.from_pretrained(work)
        model = Qwen3VLForConditionalGeneration.from_pretrained(work, dtype=torch.float32)
        batcher = Batcher(processor)
        bounds = PixelBounds(MIN_PIXELS, config.max_pixels)
        held_out = [Views.of(synth.make_dot_sample(i, seed=config.seed + 10_000), bounds)
                    for i in range(config.eval_samples)]
        pool = [Views.of(synth.make_dot_sample(i, seed=config.seed), bounds)
                for i in tqdm(range(config.pool), desc="drawing the pretraining set", unit="sample",
                              disable=not progress)]
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)

        def lr_at(step: int) -> float:  # linear warm-up, cosine to a tenth
            if step < config.warmup_steps:
                return (step + 1) / config.warmup_steps
            t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
        rng = random.Random(config.seed)
        curve: list[dict[str, float]] = []
        losses: list[float] = []
        steps_run, stopped_early = 0, False
        bar = tqdm(total=config.steps, desc="pretraining the tiny base", unit="step", disable=not progress)
        model.train()
        for step in range(config.steps):
            if time.monotonic() - started > time_budget_s:
                stopped_early = True
                log(f"pretraining: time box of {time_budget_s:.0f} s reached at step {step}/{config.steps}")
                break
            first = step < config.perceiver_steps
            roles = ["perceiver"] * config.batch_size if first else _roles(config.mix, config.batch_size, rng)
            noise = 0.0 if first else config.perceiver_noise
            examples = [make_example(r, rng.choice(pool), rng, noise, config.reasoner_miss) for r in roles]
            loss = model(**batcher(examples)).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
            steps_run = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if config.eval_every and (steps_run % config.eval_every == 0 or steps_run == config.steps):
                model.eval()
                point = probe(model, batcher, held_out)
                model.train()
                curve.append({"step": steps_run, "loss": sum(losses[-10:]) / len(losses[-10:]), **asdict(point)})
                bar.write(f"step {steps_run}: " + ", ".join(f"{k} {v:.2f}" for k, v in list(curve[-1].items())[1:]))
        bar.close()
        model.save_pretrained(work)
        record = {"digest": config.digest(), "config": asdict(config), "steps_run": steps_run,
                  "stopped_early": stopped_early, "wall_s": round(time.monotonic() - started, 1), "curve": curve}
        (work / RESULT_FILE).write_text(json.dumps(record, indent=1))
        from p2r.models.tiny import _bind

        _bind(work)  # the manifest binds the new weights
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
        return record
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(work, ignore_errors=True)


def cache_root() -> Path:
    """Where pretrained bases are kept between runs: ``$P2R_CACHE``, else ``~/.cache/p2r``."""
    return Path(os.environ.get("P2R_CACHE") or Path.home() / ".cache" / "p2r")


def pretrained_base(config: PretrainConfig | None = None, *, time_budget_s: float = 600.0, progress: bool = True,
                    log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The pretrained base for ``config`` in the cache (built once per digest) and its record."""
    config = config or PretrainConfig()
    path = cache_root() / "pretrained" / config.digest()
    return path, pretrain(path, config, time_budget_s=time_budget_s, progress=progress, log=log)


def install_pretrained(target: Path | str, config: PretrainConfig | None = None, *, time_budget_s: float = 600.0,
                       progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Put the pretrained base for ``config`` at ``target`` (a copy of the cached one); a target
    that already holds this digest is left as it is."""
    config = config or PretrainConfig()
    target = Path(target)
    hit = cached(target, config)
    if hit is not None:
        return hit
    source, record = pretrained_base(config, time_budget_s=time_budget_s, progress=progress, log=log)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return record
