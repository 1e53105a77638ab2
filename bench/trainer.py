"""Trainer benchmark: the reward phase of a perceiver step, and a step's time split.

One run, same machine, tiny model, the same work on every path - the reward of every rollout:
penalties, the frozen reasoner's answer on each distinct (sample, boxes) evidence, and its grade
(rules for mca / na, the verifier model for free_form):

  offline    - vLLM's offline engine in this process, with the reasoner service's limits: the
               distinct reasoner requests built serially (decode, evidence, resize - sharing each
               image's resize as the service does), generated in one batch, then the free-form
               replies verified in one batch on the same engine (``EngineVerifier``)
  ours       - ``PerceiverReward`` against ``p2r serve reasoner verifier``: penalties, identical
               reasoner inputs sent once, batch RPCs (``reward_batch_size`` items,
               ``reward_concurrency`` in flight), then the verifier in batch RPCs
  reference  - one blocking ``Reason`` request per rollout, in order, and one ``Verify`` per
               free-form rollout (the reference way: no deduplication, so more work by design)

The offline path is a comparison, not a limit: the service overlaps preparation, engine work
and grading across batches, which one offline ``generate`` call cannot.

Equal engine state (``bench/_common.py``): both engines are up for the whole run and were
warmed up once; every measurement uses images its engine has never seen (a fresh variant of the
same samples, with the same replies), so the second path on the service gets no prefix,
multimodal or decoded-image cache from the first. Each path runs ``--repeats`` times
interleaved (offline, ours, reference, then again) and the table shows the median with the
min–max; ratios pair the paths of the same repeat.

Perceiver replies are synthesised per rollout (jittered ground-truth boxes, exact repeats, empty
lists, unlabelled boxes), since a random tiny policy emits no boxes. Then a few real trainer
steps against the same service give the rollout / reward / update / sync split.

    .venv/bin/python bench/trainer.py [--prompts 64] [--rollouts 8] [--repeats 3] \
        [--out bench/results/trainer.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import header, image_variants, load_average, repeats, spread, summary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_PIXELS = 65536
MAX_TOKENS = 16
LIMITS = {"max_model_len": 4096, "max_num_seqs": 64}
OFFLINE = "offline engine: reasoner + verifier generate"
OFFLINE_BUILT = "offline incl. building requests (evidence, resize)"
OURS = "ours: PerceiverReward (dedup + batch RPC x4)"
REFERENCE = "reference: one blocking Reason per rollout"


def replies_for(samples: list[Any], rollouts: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    for s in samples:
        group = []
        for _ in range(rollouts):
            kind = rng.random()
            if kind < 0.2:
                group.append("[]")
            elif kind < 0.45:  # the exact ground truth: repeats within the group
                group.append(json.dumps([{"bbox_2d": b, "label": "object"} for b in s.gt_bboxes]))
            elif kind < 0.5:
                group.append(json.dumps([{"bbox_2d": s.gt_bboxes[0]}]))  # no label: penalised
            else:
                boxes = [[round(c + rng.uniform(-15, 15)) for c in b] for b in s.gt_bboxes]
                group.append(json.dumps([{"bbox_2d": b, "label": "object"} for b in boxes]))
        out.append(group)
    return out


def start_reasoner(model: Path, tmp: Path) -> Any:
    from p2r.services.launch import start_server

    config = tmp / "serve.yaml"
    config.write_text(json.dumps({"max_pixels": MAX_PIXELS, "max_in_flight": 8192, "limits": LIMITS}))
    return start_server(["reasoner", "verifier", "--model", str(model)], config=config,
                        env={"VLLM_CPU_KVCACHE_SPACE": "2"})


def reference_rewards(cfg: Any, samples: list[Any], replies: list[list[str]]) -> dict[str, Any]:
    """One blocking request per rollout (and per free-form verdict), no deduplication - what the
    reference client does."""
    from p2r.core.answers import extract_answer
    from p2r.core.bbox import parse_regions
    from p2r.core.grading import GradeItem, grade_rule
    from p2r.core.prompts import AnswerForm
    from p2r.core.rewards import perceiver_penalty
    from p2r.services.client import Client
    from p2r.services.protocol import FORM_TO_PB
    from p2r.trainer.rewards import ImageBytes
    from p2r.v1 import p2r_pb2 as pb

    client, images, calls, verifies = Client(cfg.reasoner_endpoint), ImageBytes(), 0, 0
    params = pb.SamplingParams(temperature=0.0, max_tokens=cfg.frozen_max_tokens)
    started = time.perf_counter()
    for s, group in zip(samples, replies, strict=True):
        for text in group:
            regions = parse_regions(text)
            if perceiver_penalty(regions) is not None:
                continue
            r = client.reasoner.Reason(pb.ReasonRequest(
                image=images(s), question=s.question, answer_form=FORM_TO_PB[s.form], sampling=params,
                regions=[pb.Region(x1=g.x1, y1=g.y1, x2=g.x2, y2=g.y2, label=g.label or "") for g in regions]),
                timeout=600)
            reply = r.completions[0].text
            if s.form is AnswerForm.FREE_FORM:
                client.verifier.Verify(pb.VerifyRequest(question=s.question, ground_truth=s.ground_truth,
                                                        answer=extract_answer(reply)), timeout=600)
                verifies += 1
            else:
                grade_rule(GradeItem(reply, s.ground_truth, s.form))
            calls += 1
    return {REFERENCE: {"seconds": time.perf_counter() - started, "reasoner_requests": calls,
                        "verifier_requests": verifies}}


class Offline:
    """The reward phase's engine work on vLLM's offline engine, with the service's limits."""

    def __init__(self, model: Path) -> None:
        from p2r.core.images import MIN_PIXELS, PixelBounds
        from p2r.eval.inference import EngineVerifier
        from p2r.services.engine import EngineLimits, OfflineEngine

        self.bounds = PixelBounds(MIN_PIXELS, MAX_PIXELS)
        self.engine = OfflineEngine(str(model), EngineLimits(**LIMITS))
        self.verifier = EngineVerifier(self.engine)

    def __call__(self, samples: list[Any], replies: list[list[str]]) -> dict[str, Any]:
        """Build the distinct reasoner requests (timed apart), generate them, grade the replies
        (the free-form ones by the verifier on this engine) - ours' work, without the service."""
        from p2r.core.bbox import parse_regions
        from p2r.core.evidence import build_evidence
        from p2r.core.flow import reasoner_request
        from p2r.core.generation import Sampling
        from p2r.core.grading import GradeItem, grade_batch
        from p2r.core.prompts import AnswerForm
        from p2r.core.rewards import perceiver_penalty
        from p2r.core.source_image import SourceImage

        started = time.perf_counter()
        unique: dict[tuple[int, tuple[Any, ...]], tuple[Any, Any]] = {}
        for i, (s, group) in enumerate(zip(samples, replies, strict=True)):
            source = SourceImage(s.load_image(), self.bounds)  # what the reasoner service caches per image
            for text in group:
                regions = parse_regions(text)
                key = (i, tuple(r.coords for r in regions))
                if perceiver_penalty(regions) is None and key not in unique:
                    unique[key] = (s, reasoner_request(build_evidence(source.image, regions), s.question, s.form,
                                                       self.bounds, source=source))
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        outs = self.engine.generate([r for _, r in unique.values()], Sampling(temperature=0.0, max_tokens=MAX_TOKENS))
        grade_batch([GradeItem(o[0], s.ground_truth, s.form, s.question) for (s, _), o
                     in zip(unique.values(), outs, strict=True)], self.verifier)
        engine_s = time.perf_counter() - started
        counts = {"reasoner_requests": len(unique),
                  "verifier_requests": sum(s.form is AnswerForm.FREE_FORM for s, _ in unique.values())}
        return {OFFLINE: {"seconds": engine_s, **counts}, OFFLINE_BUILT: {"seconds": engine_s + build_s, **counts}}


def ours_rewards(reward: Any, samples: list[Any], replies: list[list[str]]) -> dict[str, Any]:
    started = time.perf_counter()
    _, stats = reward(samples, replies)
    seconds = time.perf_counter() - started
    reasoner = int(stats.extra["reasoner_requests"])
    return {OURS: {"seconds": seconds, "reasoner_requests": reasoner,
                   "verifier_requests": stats.service_items - reasoner, "penalised": stats.penalised,
                   "deduplicated": stats.deduplicated}}


def ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """seconds(a) / seconds(b), repeat by repeat."""
    return summary([x["seconds"] / y["seconds"] for x, y in zip(a, b, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--repeats", type=repeats, default=3, help="measurements per path (at least 3)")
    parser.add_argument("--steps", type=int, default=3, help="trainer steps for the time split")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer.json")
    args = parser.parse_args()
    if args.steps * min(8, args.prompts) > args.prompts:
        parser.error(f"--steps {args.steps} needs {args.steps * min(8, args.prompts)} prompts (8 per step)")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"

    from p2r.data.dataset import load_samples, write_synthetic
    from p2r.models.tiny import write_tiny_model
    from p2r.trainer.config import TrainConfig
    from p2r.trainer.loop import Trainer
    from p2r.trainer.rewards import PerceiverReward

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = write_tiny_model(tmp / "model")
        parquet = write_synthetic(tmp / "data", args.prompts)
        base = load_samples(parquet)
        replies = replies_for(base, args.rollouts, seed=0)
        offline = Offline(model)
        server = start_reasoner(model, tmp)
        try:
            target = server.target
            cfg = TrainConfig(role="perceiver", model=str(model), data=parquet, output=str(tmp / "out"),
                              workdir=tmp / "work", reasoner_endpoint=target, verifier_endpoint=target,
                              frozen_max_tokens=MAX_TOKENS,
                              reward_batch_size=64, reward_concurrency=4, max_pixels=MAX_PIXELS,
                              rollouts_per_prompt=args.rollouts, prompts_per_step=min(8, args.prompts),
                              max_response_tokens=32, max_model_len=LIMITS["max_model_len"], learning_rate=1e-5,
                              save_every=10_000)
            reward = PerceiverReward(cfg)
            # (engine, measurement); a variant is fresh per engine, so ours and reference get different ones.
            paths = [("offline", lambda s, r: offline(s, r)), ("service", lambda s, r: ours_rewards(reward, s, r)),
                     ("service", lambda s, r: reference_rewards(cfg, s, r))]
            variants = image_variants(base, 1 + 2 * args.repeats)
            offline(variants[0][:2], replies[:2])  # warm-up, variant 0 is never measured
            ours_rewards(reward, variants[0][:2], replies[:2])
            load = load_average()
            results: dict[str, list[dict[str, Any]]] = {}
            for rep in range(args.repeats):
                used = {"offline": 0, "service": 0}
                for engine, measure in paths:
                    used[engine] += 1
                    for name, result in measure(variants[2 * rep + used[engine]], replies).items():
                        results.setdefault(name, []).append(result)
            load_end = load_average()
            trainer = Trainer(cfg)
            cfg.max_steps = args.steps
            per_step = cfg.prompts_per_step
            steps = [trainer.step(trainer.shard[i * per_step:(i + 1) * per_step]) for i in range(args.steps)]
            del trainer
        finally:
            server.stop()

    rollouts = args.prompts * args.rollouts
    rows = []
    for name, rs in results.items():
        rows.append({"path": name, "repeats": len(rs), "seconds": summary([r["seconds"] for r in rs]),
                     "rollouts_per_s": summary([rollouts / r["seconds"] for r in rs], 2),
                     **{k: v for k, v in rs[0].items() if k != "seconds"}, "per_repeat": rs})
    ratios = {"ours_over_offline": ratio(results[OURS], results[OFFLINE]),
              "ours_over_offline_built": ratio(results[OURS], results[OFFLINE_BUILT]),
              "speedup_vs_reference": ratio(results[REFERENCE], results[OURS])}
    phases = ("rollout_s", "reward_s", "update_s", "sync_s")
    split = {k: summary([s[k] for s in steps]) for k in phases}
    print(header(f"trainer benchmark: perceiver step reward phase, {args.prompts} prompts x {args.rollouts} rollouts "
                 f"= {rollouts}, reasoner max_tokens {MAX_TOKENS}, max_pixels {MAX_PIXELS}", args.repeats, load))
    cols = f"{'path':52} {'seconds':>22} {'rollouts/s':>22} {'reasoner reqs':>14} {'verifier reqs':>14}"
    print(cols)
    print("-" * len(cols))
    for r in rows:
        print(f"{r['path']:52} {spread(r['seconds'], 3):>22} {spread(r['rollouts_per_s']):>22} "
              f"{r['reasoner_requests']:>14} {r['verifier_requests']:>14}")
    print(f"\nours / offline engine: {spread(ratios['ours_over_offline'], 3)}   ours / offline incl. building: "
          f"{spread(ratios['ours_over_offline_built'], 3)}   reference / ours: "
          f"{spread(ratios['speedup_vs_reference'])}x   (seconds, repeat by repeat); load average at end {load_end}")
    print(f"trainer step split (median (min–max) of {len(steps)} steps, {cfg.prompts_per_step} prompts x "
          f"{args.rollouts}): " + ", ".join(f"{k} {spread(v, 3)}" for k, v in split.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompts": args.prompts, "rollouts": args.rollouts, "repeats": args.repeats,
                                    "load_average_start": load, "load_average_end": load_end, "rows": rows,
                                    **ratios, "step_split": split, "steps": steps, "machine": platform.platform(),
                                    "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
