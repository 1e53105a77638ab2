"""Validation during a PRA-GRPO stage, as the reference runs it: before training and every
``val_every`` steps, greedy (temperature 0, n = 1) on ``val_data`` with the role's own reward,
reported as accuracy overall, per data source and per answer form (``val/...`` keys in
metrics.jsonl; ``p2r_train_val_accuracy{group, name}`` in Prometheus). Also the optional
per-sample rollout dumps, for users who need to see what the policy does.

Every engine (a TP group of ranks, trainer/rollout.py) validates its strided share of the set in
chunks of ``val_batch_size`` samples: the images of one chunk are decoded and in flight at a time,
not a rank's whole share (about 100 GB for a 2,000-sample stage-2 set at 2,097,152 pixels). The
first rank of each group contributes the rows; rank 0 gathers them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from p2r.core.answers import extract_answer
from p2r.core.bbox import parse_regions
from p2r.core.generation import ChatRequest, Sampling
from p2r.data.dataset import Sample
from p2r.trainer.rewards import RewardStats
from p2r.trainer.rollout import RolloutTopology

RequestBuilder = Callable[[list[Sample], RewardStats], list[ChatRequest]]


def accuracy_rows(rows: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
    """``val/accuracy``, ``val/accuracy/source/<s>``, ``val/accuracy/form/<f>``, ``val/samples``
    and ``val/dropped`` from per-sample rows (a row without a reward does not count as wrong:
    its service call failed, so it says nothing about the policy)."""
    scored = [r for r in rows if r["reward"] is not None]
    out: dict[str, float | int | None] = {
        "val/samples": len(rows), "val/dropped": len(rows) - len(scored),
        "val/accuracy": float(np.mean([r["reward"] for r in scored])) if scored else None}
    for key, prefix in (("data_source", "source"), ("form", "form")):
        groups: dict[str, list[float]] = defaultdict(list)
        for r in scored:
            groups[r[key] or "unknown"].append(r["reward"])
        for name, values in sorted(groups.items()):
            out[f"val/accuracy/{prefix}/{name}"] = float(np.mean(values))
    return out


def validate(samples: Sequence[Sample], requests: RequestBuilder, engine: Any, reward: Any,
             max_tokens: int, topology: RolloutTopology, batch_size: int) -> dict[str, float | int | None]:
    """Greedy rollouts on this engine's share, chunk by chunk, scored with the role's reward; a
    collective over every rank."""
    mine = list(samples[topology.dp_rank :: topology.dp])
    rows: list[dict[str, Any]] = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        built = requests(chunk, RewardStats())
        outs = engine.sample(built, Sampling(n=1, temperature=0.0, max_tokens=max_tokens))
        del built  # the chunk's decoded images go before the next chunk's are made
        if topology.tp_rank:
            continue  # the group's first rank scores and reports what the shared engine produced
        rewards, _ = reward(chunk, [[g[0].text] for g in outs])
        rows += [{"data_source": s.data_source, "form": s.form.value, "reward": r[0]}
                 for s, r in zip(chunk, rewards, strict=True)]
    gathered: list[list[dict[str, Any]] | None] = [None] * topology.world
    dist.all_gather_object(gathered, rows)
    return accuracy_rows([row for part in gathered if part for row in part])


def dump_rollouts(path: Path, step: int, batch: Sequence[Sample], rollouts: Sequence[Sequence[Any]],
                  rewards: Sequence[Sequence[float | None]], role: str) -> None:
    """One JSONL line per rollout: sample index, response, extracted answer, bbox count,
    reward, and why it has no reward when it has none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for s, group, group_rewards in zip(batch, rollouts, rewards, strict=True):
            for k, (r, reward) in enumerate(zip(group, group_rewards, strict=True)):
                f.write(json.dumps({
                    "step": step, "index": s.index, "rollout": k, "data_source": s.data_source,
                    "form": s.form.value, "response": r.text,
                    "answer": extract_answer(r.text) if role != "perceiver" else None,
                    "bbox_count": len(parse_regions(r.text)) if role == "perceiver" else None,
                    "reward": reward,
                    "dropped": None if reward is not None else "no reward: the service call failed after retries",
                }) + "\n")
