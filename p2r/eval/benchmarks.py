"""Benchmark loaders: each published layout (p2r-method.md §Evaluation) becomes ``EvalSample``s.

The layouts differ in every detail - column names, how options are stored, whether images are
bytes, base64 text or paths, what the categories are called - and the reference scores depend
on the question text being rebuilt exactly, so each benchmark has one small parser here and the
rest of the evaluation sees only ``EvalSample``. A row that does not parse raises ``DataError``
naming the file, row index and field; the caller decides (``skip_bad``) whether to skip it.

Files are found under a local directory or an ``s3://`` prefix (mirrored to a cache first):
``*.parquet`` (Hugging Face datasets), ``*.jsonl`` and ``*.tsv`` (the benchmarks' own releases).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from p2r.core.prompts import AnswerForm, with_options
from p2r.data.dataset import DataError, ImageRef, parse_row

TASKS = ("V-Star", "HR-Bench", "MME-RealWorld", "MME-RealWorld-lite", "synthetic")
LETTERS = {"V-Star": "ABCD", "HR-Bench": "ABCD", "MME-RealWorld": "ABCDEF", "MME-RealWorld-lite": "ABCDEF"}
"""Option letters the ``mca`` rule looks for, per benchmark."""

# The published category names, mapped to the names the paper's table uses.
V_STAR_CATEGORIES = {"direct_attributes": "attribute", "relative_position": "spatial"}
HR_BENCH_CATEGORIES = {"single": "FSP", "cross": "FCP", "fsp": "FSP", "fcp": "FCP"}
V_STAR_SUFFIX_RE = re.compile(r"\s*Answer with the option'?s letter from the given choices directly\.?\s*$")
"""The answer line V* Bench appends to every ``text``, removed from the question (the reference's regex)."""
HR_BENCH_SUBSETS = {"hrbench_4k": "4K", "hr_bench_4k": "4K", "4k": "4K", "hrbench_8k": "8K", "hr_bench_8k": "8K",
                    "8k": "8K"}


@dataclass(frozen=True)
class EvalSample:
    """One benchmark question, normalised. ``uid`` is unique within a task (subset-qualified)."""

    uid: str
    subset: str
    category: str
    question: str
    answer: str
    form: AnswerForm
    image: ImageRef
    letters: str = "ABCDE"


# ------------------------------------------------------------------------------------- files


def _data_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: no such file or directory")
    files = sorted(p for ext in ("parquet", "jsonl", "tsv") for p in root.rglob(f"*.{ext}"))
    if not files:
        raise DataError(f"{root}: no .parquet, .jsonl or .tsv files")
    return files


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of one data file as dicts, streamed (HR-Bench-8K's base64 TSV is several GB)."""
    if path.suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{path}: not a readable parquet file: {e}") from None
        for batch in parquet.iter_batches(batch_size=64):
            yield from batch.to_pylist()
    elif path.suffix == ".jsonl":
        with path.open() as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: row {i}: not JSON: {e}") from None
    else:
        csv.field_size_limit(sys.maxsize)
        with path.open(newline="") as f:
            yield from csv.DictReader(f, delimiter="\t")


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: field '{name}': missing or empty")
    return value


def _image(value: Any, where: str, name: str, base: Path) -> ImageRef:
    """Any published image encoding: raw bytes, ``{"bytes", "path"}`` (HF Image), base64 text,
    or a path relative to the data file."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef(data=bytes(value["bytes"]))
        if value.get("path"):
            value = value["path"]
        else:
            raise DataError(f"{where}: field '{name}': image struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, str):
        candidate = base / value
        if _is_file(candidate):
            return ImageRef(path=candidate)
        try:
            return ImageRef(data=base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise DataError(f"{where}: field '{name}': neither an existing path nor base64 image data") from None
    raise DataError(f"{where}: field '{name}': unsupported image value of type {type(value).__name__}")


def _is_file(path: Path) -> bool:
    """``Path.is_file`` that is False, not an OSError, for a name the OS cannot hold: base64
    image text is tried as a path first, and over 255 bytes it is "name too long"."""
    try:
        return path.is_file()
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False


# ------------------------------------------------------------------------------------ parsers


def _v_star(row: dict[str, Any], where: str, base: Path, _subset: str) -> EvalSample:
    question = V_STAR_SUFFIX_RE.sub("", str(_field(row, "text", where))).strip()
    label = str(_field(row, "label", where)).strip().upper()
    if label not in LETTERS["V-Star"]:
        raise DataError(f"{where}: field 'label': {label!r} is not an option letter A-D")
    category = str(_field(row, "category", where))
    return EvalSample(
        uid=str(_field(row, "question_id", where)), subset="V*",
        category=V_STAR_CATEGORIES.get(category, category), question=question, answer=label,
        form=AnswerForm.MCA, image=_image(_field(row, "image", where), where, "image", base),
        letters=LETTERS["V-Star"],
    )


def _hr_bench(row: dict[str, Any], where: str, base: Path, subset: str) -> EvalSample:
    """As the reference: options are the letters whose value is present and not blank; every
    row is scored, an answer outside A-D simply never matches."""
    options = [f"{letter}. {row[letter]}" for letter in LETTERS["HR-Bench"]
               if row.get(letter) is not None and str(row[letter]).strip()]
    answer = str(row.get("answer") if row.get("answer") is not None else "").strip().upper()
    category = str(_field(row, "category", where))
    return EvalSample(
        uid=f"{subset}-{_field(row, 'index', where)}", subset=subset,
        category=HR_BENCH_CATEGORIES.get(category.lower(), category),
        question=with_options(str(_field(row, "question", where)), options), answer=answer,
        form=AnswerForm.MCA, image=_image(_field(row, "image", where), where, "image", base),
        letters=LETTERS["HR-Bench"],
    )


def _mme_options(value: Any, where: str) -> list[str]:
    """``multi-choice options`` is a list in parquet and its Python repr in the TSV/JSON dumps;
    the options are kept as given (not stripped), as the reference joins them."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: field 'multi-choice options': not a list") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, str) for o in value):
        raise DataError(f"{where}: field 'multi-choice options': expected a list of strings")
    return list(value)


def _mme_realworld(row: dict[str, Any], where: str, base: Path, subset: str) -> EvalSample:
    options = _mme_options(_field(row, "multi-choice options", where), where)
    answer = str(_field(row, "answer", where)).strip().strip("()").upper()
    if answer not in LETTERS["MME-RealWorld"]:
        raise DataError(f"{where}: field 'answer': {answer!r} is not an option letter A-F")
    return EvalSample(
        uid=str(_field(row, "index", where)), subset=subset, category=str(_field(row, "category", where)),
        question=with_options(str(_field(row, "question", where)), options), answer=answer,
        form=AnswerForm.MCA, image=_image(_field(row, "bytes", where), where, "bytes", base),
        letters=LETTERS["MME-RealWorld"],
    )


def _synthetic(row: dict[str, Any], where: str, base: Path, _subset: str) -> EvalSample:
    """The P2R-10k layout (``p2r data synth``), validated by the training data's own parser
    (whose messages start with the row; the file name is added here)."""
    index = int(where.rsplit("row ", 1)[1])
    try:
        s = parse_row(row, index, base)
    except DataError as e:
        raise DataError(f"{where.split(': row')[0]}: {e}") from None
    return EvalSample(uid=str(s.index), subset="synthetic", category=s.category or s.form.value,
                      question=s.question, answer=s.ground_truth, form=s.form, image=s.images[0])


Parser = Callable[[dict[str, Any], str, Path, str], EvalSample]
_PARSERS: dict[str, Parser] = {"V-Star": _v_star, "HR-Bench": _hr_bench, "MME-RealWorld": _mme_realworld,
                               "MME-RealWorld-lite": _mme_realworld, "synthetic": _synthetic}


def _subset(task: str, path: Path) -> str:
    if task == "HR-Bench":
        for part in [path.stem.lower(), *(p.lower() for p in reversed(path.parent.parts))]:
            for key, name in HR_BENCH_SUBSETS.items():
                if key in part:
                    return name
        raise DataError(f"{path}: cannot tell the HR-Bench subset (expected 4k or 8k in the file or folder name)")
    return task


def load_benchmark(task: str, root: Path | str, *, skip_bad: bool = False,
                   on_skip: Callable[[str], None] | None = None) -> list[EvalSample]:
    """Every sample of ``task`` under ``root`` (a file or a directory), in file then row order.

    A malformed row raises ``DataError`` naming file, row and field, unless ``skip_bad``: then
    it is reported through ``on_skip`` and left out."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} (expected one of: {', '.join(TASKS)})")
    parse = _PARSERS[task]
    samples: list[EvalSample] = []
    seen: set[str] = set()
    root = Path(root)
    files = _data_files(root)
    if task == "synthetic":
        files = [f for f in files if f.suffix == ".parquet"]
    for path in files:
        subset = _subset(task, path)
        for i, row in enumerate(_rows(path)):
            where = f"{path.name}: row {i}"
            try:
                sample = parse(row, where, path.parent, subset)
                if sample.uid in seen:
                    raise DataError(f"{where}: duplicate id {sample.uid!r}")
            except DataError as e:
                if not skip_bad:
                    raise
                if on_skip is not None:
                    on_skip(str(e))
                continue
            seen.add(sample.uid)
            samples.append(sample)
    if not samples:
        raise DataError(f"{root}: no {task} samples found")
    return samples
