"""Evidence benchmark: the reasoner's image work per request, plain vs shared per image.

One run, same machine, the synthetic images, ground-truth boxes jittered per rollout:

  plain   - ``reasoner_request(build_evidence(image, boxes))``: the annotated full-resolution copy
            is resized whole for every request
  shared  - the same with ``source=SourceImage(...)`` (what the reasoner service caches per
            image): only the outline strips are recomputed; the pixels are checked identical.
            The one-time pass-order check of the first image's geometry is included here.
  per image - decoding the image and its ``SourceImage`` resize (with the first pass kept once the
            geometry is verified), paid once per image by the service

    .venv/bin/python bench/evidence.py [--images 64] [--rollouts 8] [--max-pixels 65536]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--max-pixels", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "evidence.json")
    args = parser.parse_args()

    import numpy as np

    from p2r.core.bbox import Region
    from p2r.core.evidence import build_evidence
    from p2r.core.flow import reasoner_request
    from p2r.core.images import MIN_PIXELS, PixelBounds
    from p2r.core.source_image import SourceImage
    from p2r.data.dataset import load_samples, write_synthetic

    bounds = PixelBounds(MIN_PIXELS, args.max_pixels)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        samples = load_samples(write_synthetic(Path(d), args.images))
        decode_s = prepare_s = plain_s = shared_s = 0.0
        requests = 0
        sizes = set()
        for s in samples:
            started = time.perf_counter()
            image = s.load_image()
            decode_s += time.perf_counter() - started
            started = time.perf_counter()
            source = SourceImage(image, bounds)
            source.resized()  # on a verified geometry this also keeps the first pass
            prepare_s += time.perf_counter() - started
            sizes.add((image.size, source.size))
            for _ in range(args.rollouts):
                regions = [Region(*(min(1000, max(0, c + rng.randint(-15, 15))) for c in b), "object")
                           for b in s.gt_bboxes]
                regions = [r for r in regions if r.x1 < r.x2 and r.y1 < r.y2]
                evidence = build_evidence(image, regions)
                started = time.perf_counter()
                plain = reasoner_request(evidence, s.question, s.form, bounds)
                plain_s += time.perf_counter() - started
                started = time.perf_counter()
                shared = reasoner_request(evidence, s.question, s.form, bounds, source=source)
                shared_s += time.perf_counter() - started
                if any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain.images, shared.images,
                                                                                        strict=True)):
                    raise SystemExit("shared resize differs from the plain resize")
                requests += 1

    rows = [
        {"path": "plain: resize the annotated copy whole", "ms_per_request": 1000 * plain_s / requests},
        {"path": "shared: SourceImage strips", "ms_per_request": 1000 * shared_s / requests},
    ]
    per_image = {"decode_ms": 1000 * decode_s / len(samples), "prepare_source_ms": 1000 * prepare_s / len(samples)}
    print(f"\nevidence benchmark: {len(samples)} images x {args.rollouts} box sets = {requests} reasoner requests, "
          f"max_pixels {args.max_pixels}, sizes {sorted(sizes)}, {os.cpu_count()} CPU cores\n")
    print(f"{'path':44} {'ms/request':>11}")
    for r in rows:
        r["ms_per_request"] = round(r["ms_per_request"], 2)
        print(f"{r['path']:44} {r['ms_per_request']:>11}")
    ratio = rows[0]["ms_per_request"] / rows[1]["ms_per_request"]
    print(f"\nshared is {ratio:.2f}x faster per request (pixels identical); per image, paid once: "
          f"decode {per_image['decode_ms']:.1f} ms, SourceImage resize "
          f"{per_image['prepare_source_ms']:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": len(samples), "rollouts": args.rollouts, "max_pixels": args.max_pixels,
                                    "rows": rows, "speedup": ratio, "per_image": per_image,
                                    "machine": platform.platform(), "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
