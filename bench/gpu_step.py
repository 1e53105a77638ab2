"""One stage-1 PRA-GRPO step at the reference shapes on one lent GPU, beside ``p2r train --plan``.

What it checks (issue 23, item 7): that the plan's per-phase GPU memory holds on real hardware,
with the engine inside the training process under vLLM's external launcher (trainer/rollout.py),
the actor offloaded while the engine is awake, the reference gathered once and the policy's
gradients reduce-scattered once per step (trainer/actor.py). The model is a random
``preset:qwen3-vl-2b`` (Qwen3-VL-2B's architecture, small enough to train alone on one 80 GiB
GPU: the 4B's fp32 AdamW state alone would take 33 GiB of it at world size 1); the data are
synthetic perceiver samples whose images are scaled up to ``max_pixels`` (2,097,152), so a prompt
carries ~2,000 visual tokens as the reference's do; the reward is the test plugin
``tests.plugins:starts_with_digit`` (no services). A random policy rarely emits its end token, so
nearly every rollout runs to ``max_response_tokens``: the step's worst case.

It runs the trainer's own loop (``Trainer`` in trainer/loop.py, ``max_steps`` 1, which also
writes the final checkpoint) and prints, per phase (rollout, reference, update, push,
checkpoint), the peak GPU memory the device reports in use (NVML-equivalent
``torch.cuda.mem_get_info``, sampled every 20 ms: the engine's allocations included) and the
torch allocator's peak, beside the plan's phase totals; then the step's time split and the
rollout's tokens per second.

    .venv/bin/python bench/gpu_step.py [--preset qwen3-vl-2b] [--out bench/results/gpu_step.json]

Without a GPU it prints one line and exits 2; ``plan_rows`` (the plan side) runs anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30
PHASES = ("rollout", "reference", "update", "push", "checkpoint")
NO_GPU = "gpu_step: no GPU on this machine (torch.cuda.is_available() is False): nothing was run"


def stage1_config(model: str, data: Path, workdir: Path, prompts: int = 64, rollouts: int = 8, **overrides: Any) -> Any:
    """The reference stage-1 configuration (64 prompts x 8 rollouts, prompt 2,560 + response
    1,024 tokens, kl_coef 0.01, images up to 2,097,152 pixels) on ``model`` and ``data``, one
    step, the plugin reward, no validation."""
    from p2r.trainer.config import TrainConfig

    fields: dict[str, Any] = {
        "role": "perceiver", "model": model, "data": data, "output": str(workdir / "out"), "workdir": workdir / "run",
        "reward_plugin": "tests.plugins:starts_with_digit", "prompts_per_step": prompts,
        "rollouts_per_prompt": rollouts, "kl_coef": 0.01, "max_steps": 1, "val_before_train": False,
        **overrides}
    return TrainConfig(**fields)


def plan_rows(cfg: Any, arch: Any, gpus: int, gpu_memory: int) -> dict[str, Any]:
    """The plan's side: each phase's total (GiB) and the step's collective bytes per rank."""
    from p2r.trainer.plan import estimate

    plan = estimate(cfg, arch, gpus, gpu_memory)
    return {"phases": {p: round(plan.total(p) / GIB, 2) for p in plan.phases}, "fits": plan.fits,
            "peak_phase": plan.peak_phase, "collectives_tb": round(plan.collectives.total / 1e12, 4),
            "host_checkpoint_gib": round(plan.host_checkpoint / GIB, 2)}


class PhaseMemory:
    """Peak device memory in use per phase: a thread samples ``mem_get_info`` every ``period``
    seconds under the current phase's name; the torch allocator's peak is read per phase too."""

    def __init__(self, period: float = 0.02) -> None:
        import torch

        self.torch = torch
        self.period = period
        self.phase = "startup"
        self.device_peak: dict[str, int] = {}
        self.allocator_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            free, total = self.torch.cuda.mem_get_info()
            used = total - free
            self.device_peak[self.phase] = max(self.device_peak.get(self.phase, 0), used)
            time.sleep(self.period)

    def __enter__(self) -> PhaseMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        outer = self.phase
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        self.phase = phase
        try:
            yield
        finally:
            self.torch.cuda.synchronize()
            self.allocator_peak[phase] = max(self.allocator_peak.get(phase, 0),
                                             self.torch.cuda.max_memory_allocated())
            self.phase = outer


def _wrap(obj: Any, name: str, memory: PhaseMemory, phase: str) -> None:
    method: Callable[..., Any] = getattr(obj, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with memory.during(phase):
            return method(*args, **kwargs)

    setattr(obj, name, wrapped)


def reference_data(out: Path, n: int, max_pixels: int) -> Path:
    """``n`` synthetic perceiver samples whose images are scaled up to ``max_pixels``."""
    from PIL import Image

    from p2r.data.dataset import write_synthetic

    path = write_synthetic(out, n)
    for png in sorted((out / "images").glob("*.png")):
        with Image.open(png) as im:
            scale = (max_pixels / (im.width * im.height)) ** 0.5
            big = im.convert("RGB").resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.BICUBIC)
        big.save(png)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-vl-2b")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_step.json")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(NO_GPU)
        raise SystemExit(2)

    from p2r.models.tiny import preset_config, write_preset_model
    from p2r.trainer.loop import Trainer
    from p2r.trainer.plan import arch_from_config

    with tempfile.TemporaryDirectory(prefix="p2r-gpu-step-") as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        model = write_preset_model(work / "model", args.preset)
        cfg = stage1_config(str(model), work / "data" / "train.parquet", work, args.prompts, args.rollouts)
        reference_data(work / "data", args.prompts, cfg.max_pixels)
        prepared_s = time.perf_counter() - t0
        total = torch.cuda.mem_get_info()[1]
        planned = plan_rows(cfg, arch_from_config(preset_config(args.preset), args.preset), 1, total)
        with PhaseMemory() as memory:
            started = time.perf_counter()
            trainer = Trainer(cfg)
            startup_s = time.perf_counter() - started
            _wrap(trainer.engine, "sample", memory, "rollout")
            _wrap(trainer.actor, "_reference_pass", memory, "reference")
            _wrap(trainer.actor, "update", memory, "update")
            _wrap(trainer.engine, "push_weights", memory, "push")
            _wrap(trainer, "save", memory, "checkpoint")
            result = trainer.run()
        row = result["last"]
    tokens = row.get("rollouts", 0) * row.get("response_len", 0.0)
    rollout_s = row.get("rollout_s", 0.0)
    measured = {p: {"device_gib": round(memory.device_peak.get(p, 0) / GIB, 2),
                    "allocator_gib": round(memory.allocator_peak.get(p, 0) / GIB, 2)} for p in PHASES}
    print(f"\ngpu_step: {torch.cuda.get_device_name()} ({total / GIB:.1f} GiB), preset {args.preset}, "
          f"{args.prompts} prompts x {args.rollouts} rollouts, stage 1 (prompt {cfg.max_prompt_tokens} + response "
          f"{cfg.max_response_tokens} tokens), world size 1")
    print(f"{'phase':<12}{'device peak GiB':>17}{'allocator peak GiB':>20}{'--plan GiB':>12}")
    for p in PHASES:
        plan_cell = planned["phases"].get(p)
        print(f"{p:<12}{measured[p]['device_gib']:>17.2f}{measured[p]['allocator_gib']:>20.2f}"
              f"{(f'{plan_cell:.2f}' if plan_cell is not None else '-'):>12}")
    print(f"plan: peak {planned['peak_phase']}, fits {planned['fits']}; rank 0's host at the checkpoint "
          f"{planned['host_checkpoint_gib']} GiB")
    split = {k: round(v, 2) for k, v in row.items() if k.endswith("_s")}
    print(f"step split (s): {split}; start-up {startup_s:.0f} s (model and data written in {prepared_s:.0f} s)")
    print(f"rollout: {tokens:,.0f} response tokens in {rollout_s:.1f} s = {tokens / max(rollout_s, 1e-9):,.0f} "
          f"tokens/s; micro-batches {row.get('micro_batches')}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "memory_gib": round(total / GIB, 1),
                                    "preset": args.preset, "measured": measured, "plan": planned, "split_s": split,
                                    "rollout_tokens": tokens, "rollout_tokens_per_s": tokens / max(rollout_s, 1e-9),
                                    "startup_s": startup_s, "row": row}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
