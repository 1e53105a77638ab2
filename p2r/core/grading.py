"""Grading an extracted answer against the ground truth, by answer form.

``mca`` and ``na`` are graded by rule; ``free_form`` by a verifier model behind the
``FreeFormVerifier`` interface (the verifier service in production, any object with
``verify_batch`` in tests). The rules are p2r-method.md §Rewards, reproduced to the letter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mathruler.grader import grade_answer

from p2r.core.answers import extract_answer, strip_think
from p2r.core.prompts import AnswerForm

MCA_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
    "Answer:",
    "Option:",
    "The correct answer",
    "The correct option",
)
TRAIN_LETTERS = "ABCDE"
MCA_MAX_WORDS_WITHOUT_LETTER = 10


def mca_letter(answer: str, letters: str = TRAIN_LETTERS) -> str | None:
    """The option letter an extracted answer names, or None.

    The prefixes are removed wherever they occur (as lmms-eval's rule does), because their
    capitals - the ``A`` of ``Answer:`` - would otherwise be read as the chosen option.
    """
    for prefix in MCA_PREFIXES:
        answer = answer.replace(prefix, "")
    pattern = f"[{re.escape(letters)}]"
    match = re.search(pattern, answer)
    if len(answer.split()) > MCA_MAX_WORDS_WITHOUT_LETTER and match is None:
        return None
    return match.group(0) if match else None


def grade_mca(answer: str, ground_truth: str, letters: str = TRAIN_LETTERS) -> bool:
    """Correct iff the first option letter found equals the (upper-cased) ground truth."""
    letter = mca_letter(answer, letters)
    return letter is not None and letter == ground_truth.strip().upper()


def grade_na(answer: str, ground_truth: str) -> bool:
    """Numeric answers: ``mathruler.grader.grade_answer`` (sympy-based equivalence)."""
    return bool(grade_answer(answer, ground_truth))


def verifier_says_yes(reply: str) -> bool:
    """The verifier's verdict: any ``<think>`` block stripped, correct iff ``yes`` appears."""
    return "yes" in strip_think(reply).lower()


@dataclass(frozen=True)
class VerifyRequest:
    """One free-form answer to grade."""

    question: str
    ground_truth: str
    answer: str


class FreeFormVerifier(Protocol):
    """Grades free-form answers in batches (one network round trip for many samples). A verdict
    of None means "could not be graded" (the service kept failing): the caller drops that sample
    rather than scoring it."""

    def verify_batch(self, requests: Sequence[VerifyRequest]) -> list[bool | None]: ...


@dataclass(frozen=True)
class GradeItem:
    """A reply to grade: raw model text (the answer is extracted here), truth and form."""

    reply: str
    ground_truth: str
    form: AnswerForm
    question: str = ""
    answer: str | None = None
    """The answer already extracted (the evaluation's per-mode rule); None: extracted from
    ``reply`` with the training rule (first ``<answer>`` or else the whole text)."""

    @property
    def extracted(self) -> str:
        return extract_answer(self.reply) if self.answer is None else self.answer


def grade_rule(item: GradeItem, letters: str = TRAIN_LETTERS) -> bool:
    """Grade an ``mca`` or ``na`` item; free-form needs a verifier (see ``grade_batch``)."""
    answer = item.extracted
    if item.form is AnswerForm.MCA:
        return grade_mca(answer, item.ground_truth, letters)
    if item.form is AnswerForm.NA:
        return grade_na(answer, item.ground_truth)
    raise ValueError("free_form answers are graded by the verifier: use grade_batch")


def grade_batch(
    items: Sequence[GradeItem],
    verifier: FreeFormVerifier | None = None,
    letters: str = TRAIN_LETTERS,
) -> list[bool | None]:
    """Grade many replies; all free-form ones go to the verifier in one batch call. None where
    the verifier could not grade."""
    results: list[bool | None] = [None] * len(items)
    free: list[int] = []
    for i, item in enumerate(items):
        if item.form is AnswerForm.FREE_FORM:
            free.append(i)
        else:
            results[i] = grade_rule(item, letters)
    if free:
        if verifier is None:
            raise ValueError(
                f"{len(free)} free_form answer(s) need a verifier, but none is configured"
            )
        verdicts = verifier.verify_batch(
            [
                VerifyRequest(items[i].question, items[i].ground_truth, items[i].extracted)
                for i in free
            ]
        )
        if len(verdicts) != len(free):
            raise RuntimeError(f"verifier returned {len(verdicts)} verdicts for {len(free)} answers")
        for i, verdict in zip(free, verdicts, strict=True):
            results[i] = None if verdict is None else bool(verdict)
    return results
