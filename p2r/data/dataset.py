"""The P2R-10k training layout (veRL parquet): writing it, and reading it strictly.

Columns: ``data_source``; ``prompt`` (chat messages whose user content holds one ``<image>`` tag
per image and the question); ``images`` (a list of ``{"bytes": ...}`` or ``{"path": ...}``, paths
relative to an image prefix and never leaving it: an absolute path or a ``..`` segment is refused,
so a data file cannot make the trainer read ``/etc`` or another tenant's files; the check is on
the path as written, so a prefix may hold symlinks to the disk the images live on);
``reward_model.ground_truth``; ``extra_info.answer_form`` and ``extra_info.index``. Synthetic rows
add ``extra_info.gt_bboxes`` and ``extra_info.category``.

A malformed row is a ``DataError`` that names the row and the field, because a training run
that silently skips or mis-reads rows corrupts its reward signal without anyone noticing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from p2r.core.errors import UserError
from p2r.core.images import (
    TRAIN_BOUNDS,
    ImageError,
    PixelBounds,
    decode_image,
    displayed_size,
    encode_image,
    model_size,
)
from p2r.core.prompts import IMAGE_TAG, AnswerForm, question_from_prompt
from p2r.data.synth import DATA_SOURCE, make_task_sample

REQUIRED_COLUMNS = ("prompt", "images", "reward_model", "extra_info")


class DataError(UserError):
    """A row of a data file that does not follow the layout; the message names row and field."""


@dataclass(frozen=True)
class ImageRef:
    """An image as the parquet holds it: inline bytes, or a path under the image prefix."""

    data: bytes | None = None
    path: Path | None = None

    def load(self) -> Image.Image:
        if self.data is not None:
            return decode_image(self.data)
        assert self.path is not None
        return decode_image(self.path.read_bytes(), field=str(self.path))

    def size(self) -> tuple[int, int]:
        """(width, height) from the header alone, without decoding the pixels (prompt-length
        checks over a whole data set at load)."""
        import io

        with Image.open(io.BytesIO(self.data) if self.data is not None else self.path) as im:  # type: ignore[arg-type]
            return displayed_size(im)


@dataclass
class Sample:
    """One training/eval question, validated."""

    index: int
    question: str
    ground_truth: str
    form: AnswerForm
    images: list[ImageRef]
    data_source: str = ""
    category: str = ""
    gt_bboxes: list[list[float]] = field(default_factory=list)
    row: int = 0

    def load_image(self) -> Image.Image:
        """The sample's (first) image, decoded; errors name the row."""
        try:
            return self.images[0].load()
        except (ImageError, OSError) as e:
            raise DataError(f"row {self.row}: field 'images[0]': {e}") from None


# ---------------------------------------------------------------------------------- writing


def synth_rows(
    out: Path, n: int, seed: int = 0, image_mode: str = "path", progress: bool = False, task: str = "objects"
) -> list[dict[str, Any]]:
    """Build ``n`` synthetic rows; with ``image_mode="path"`` the PNGs go to ``out/images``."""
    if image_mode not in ("path", "bytes"):
        raise ValueError(f"image_mode must be 'path' or 'bytes', got {image_mode!r}")
    rows = []
    for i in tqdm(range(n), desc="synthesising", disable=not progress, unit="sample"):
        s = make_task_sample(task, i, seed)
        png = encode_image(s.image)
        if image_mode == "path":
            rel = f"images/{i:06d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(png)
            image = {"bytes": None, "path": rel}
        else:
            image = {"bytes": png, "path": None}
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": "<image>" + s.question}],
                "images": [image],
                "ability": "fine-grained-perception",
                "reward_model": {"ground_truth": s.answer, "style": "rule"},
                "extra_info": {
                    "answer_form": s.form.value,
                    "index": i,
                    "category": s.category,
                    "gt_bboxes": s.gt_boxes,
                    "question": s.question,
                },
            }
        )
    return rows


def write_synthetic(
    out: Path | str, n: int, seed: int = 0, image_mode: str = "path", progress: bool = False, task: str = "objects"
) -> Path:
    """Write ``out/train.parquet`` (and ``out/images/`` for path mode) of synthetic ``task``
    (``p2r.data.synth.TASKS``); return the parquet path."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(synth_rows(out, n, seed, image_mode, progress, task))
    path = out / "train.parquet"
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------------------------- reading


def _get(row: dict[str, Any], i: int, dotted: str, kind: type | tuple[type, ...]) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value or value[part] is None:
            raise DataError(f"row {i}: field '{dotted}' is missing")
        value = value[part]
    if not isinstance(value, kind):
        raise DataError(f"row {i}: field '{dotted}' has type {type(value).__name__}")
    return value


def _user_text(prompt: Any, i: int) -> str:
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise DataError(f"row {i}: field 'prompt' must be a non-empty list of chat messages")
    for message in prompt:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            raise DataError(f"row {i}: field 'prompt' user message content must be a string")
    raise DataError(f"row {i}: field 'prompt' has no user message")


def _image_ref(item: Any, i: int, j: int, prefix: Path) -> ImageRef:
    name = f"images[{j}]"
    if not isinstance(item, dict):
        raise DataError(f"row {i}: field '{name}' must be a {{'bytes'|'path': ...}} struct")
    data, path = item.get("bytes"), item.get("path")
    if data:
        if not isinstance(data, (bytes, bytearray)):
            raise DataError(f"row {i}: field '{name}.bytes' must be binary")
        return ImageRef(data=bytes(data))
    if path:
        if not isinstance(path, str):
            raise DataError(f"row {i}: field '{name}.path' must be a string")
        parts = PurePosixPath(path).parts
        if path.startswith("/") or ".." in parts or "\\" in path or "\x00" in path:
            raise DataError(f"row {i}: field '{name}.path': {path!r} is outside the image prefix (absolute or "
                            "'..'); image paths are relative to --image-prefix")
        full = prefix / path
        if not full.is_file():
            raise DataError(f"row {i}: field '{name}.path': no file at {full}")
        return ImageRef(path=full)
    raise DataError(f"row {i}: field '{name}' has neither bytes nor path")


def _boxes(value: Any, i: int) -> list[list[float]]:
    """``extra_info.gt_bboxes``: absent, or a list of ``[x1, y1, x2, y2]`` with finite numeric
    coordinates and ``x1 <= x2``, ``y1 <= y2``. The perceiver's reward compares predictions with
    these boxes, so one bad value would score every rollout of its prompt wrongly (or crash the
    step); it is an error naming the row and the box instead."""
    if value is None:
        return []
    field_name = "extra_info.gt_bboxes"
    if not isinstance(value, (list, tuple)):
        raise DataError(f"row {i}: field '{field_name}' must be a list of [x1, y1, x2, y2] boxes, "
                        f"got {type(value).__name__}")
    boxes = []
    for k, box in enumerate(value):
        name = f"{field_name}[{k}]"
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise DataError(f"row {i}: field '{name}' must be [x1, y1, x2, y2], got {box!r}")
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in box):
            raise DataError(f"row {i}: field '{name}' must hold numbers, got {list(box)!r}")
        x1, y1, x2, y2 = (float(c) for c in box)
        if not all(math.isfinite(c) for c in (x1, y1, x2, y2)):
            raise DataError(f"row {i}: field '{name}' has a non-finite coordinate: {list(box)!r}")
        if x1 > x2 or y1 > y2:
            raise DataError(f"row {i}: field '{name}' must have x1 <= x2 and y1 <= y2, got {list(box)!r}")
        boxes.append([x1, y1, x2, y2])
    return boxes


def parse_row(row: dict[str, Any], i: int, image_prefix: Path) -> Sample:
    """Validate one row and turn it into a Sample: ``p2r data check``, the trainer and the
    evaluation of the synthetic set all read rows through here, so they refuse the same rows."""
    user_text = _user_text(row.get("prompt"), i)
    question = question_from_prompt(user_text)
    if not question:
        raise DataError(f"row {i}: field 'prompt' holds no question text")
    images = row.get("images")
    if not isinstance(images, (list, tuple)) or not images:
        raise DataError(f"row {i}: field 'images' must be a non-empty list")
    tags = user_text.count(IMAGE_TAG)
    if tags != len(images):
        raise DataError(f"row {i}: field 'prompt' has {tags} {IMAGE_TAG} tag(s) for {len(images)} image(s); "
                        "the layout has one tag per image")
    refs = [_image_ref(item, i, j, image_prefix) for j, item in enumerate(images)]
    truth = _get(row, i, "reward_model.ground_truth", (str, int, float))
    if isinstance(truth, bool) or not str(truth).strip():
        raise DataError(f"row {i}: field 'reward_model.ground_truth' is empty")
    form_text = _get(row, i, "extra_info.answer_form", str)
    try:
        form = AnswerForm.parse(form_text)
    except ValueError as e:
        raise DataError(f"row {i}: field 'extra_info.answer_form': {e}") from None
    index = _get(row, i, "extra_info.index", int)
    extra = row["extra_info"]
    boxes = _boxes(extra.get("gt_bboxes"), i)
    return Sample(
        index=index,
        question=question,
        ground_truth=str(truth).strip(),
        form=form,
        images=refs,
        data_source=str(row.get("data_source") or ""),
        category=str(extra.get("category") or ""),
        gt_bboxes=boxes,
        row=i,
    )


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a parquet file as plain dicts, one record batch at a time."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    for batch in parquet.iter_batches(batch_size=256):
        yield from batch.to_pylist()


def load_samples(path: Path | str, image_prefix: Path | str | None = None) -> list[Sample]:
    """Every row of a P2R-10k-layout parquet, validated; image paths resolve under the prefix
    (default: the parquet's folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    prefix = Path(image_prefix) if image_prefix is not None else path.parent
    return [parse_row(row, i, prefix) for i, row in enumerate(iter_rows(path))]



def check_images(samples: Iterable[Sample], bounds: PixelBounds | None = None,
                 progress: bool = False) -> int:
    """Decode every image of every sample (not only its header) and check the model can resize
    it; the first failure is a ``DataError`` naming the row and the image. Returns how many
    images decoded. ``p2r data check`` runs this: a file whose bytes are garbage past a valid
    header passes a header-only check and then kills training at the step that draws it.
    One image is decoded at a time, so memory stays at one image whatever the data set's size."""
    bounds = bounds or TRAIN_BOUNDS
    decoded = 0
    for s in tqdm(samples, desc="decoding images", unit="row", disable=not progress):
        for j, ref in enumerate(s.images):
            try:
                image = ref.load()
                model_size(image.width, image.height, bounds)
            except (ImageError, OSError) as e:
                raise DataError(f"row {s.row}: field 'images[{j}]': {e}") from None
            image.close()
            decoded += 1
    return decoded
