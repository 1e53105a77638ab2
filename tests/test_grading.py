"""Answer extraction and grading (p2r-method.md §Rewards), with hand-picked cases."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from p2r.core.answers import extract_answer, strip_think
from p2r.core.grading import (
    GradeItem,
    VerifyRequest,
    grade_batch,
    grade_mca,
    grade_na,
    mca_letter,
    verifier_says_yes,
)
from p2r.core.prompts import AnswerForm


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>hmm</think><answer> B </answer>", "B"),
        ("<answer>A</answer> then <answer>B</answer>", "A"),
        ("<answer>\nmulti\nline\n</answer>", "multi\nline"),
        ("  no tags at all  ", "no tags at all"),
        ("<answer>unclosed", "<answer>unclosed"),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("answer", "truth", "correct"),
    [
        ("B", "B", True),
        ("B", "b", True),  # ground truth is upper-cased
        ("(C).", "C", True),
        ("The answer is (C)", "C", True),
        ("Answer: D", "D", True),  # without stripping 'Answer:' its 'A' would be read
        ("Best option: D", "D", True),
        ("The correct option is B", "B", True),
        ("Final Answer: B", "B", True),  # prefixes are removed wherever they stand
        ("B or C", "C", False),  # the first letter counts
        ("b", "B", False),  # only capital letters name options
        ("it is probably the third one but i am not really sure of it", "C", False),
        ("This long explanation goes on and on and on until it names option B", "B", True),
        ("", "A", False),
    ],
)
def test_grade_mca(answer: str, truth: str, correct: bool) -> None:
    assert grade_mca(answer, truth) is correct


def test_mca_letter_range() -> None:
    assert mca_letter("E") == "E"
    assert mca_letter("E", letters="ABCD") is None
    assert mca_letter("F", letters="ABCDEF") == "F"


@pytest.mark.parametrize(
    ("answer", "truth", "correct"),
    [("42", "42", True), ("42.0", "42", True), ("0.5", "\\frac{1}{2}", True), ("1,000", "1000", True),
     ("41", "42", False), ("", "42", False), ("forty-two", "42", False)],
)
def test_grade_na_uses_mathruler(answer: str, truth: str, correct: bool) -> None:
    assert grade_na(answer, truth) is correct


@pytest.mark.parametrize(
    ("reply", "yes"),
    [("Yes", True), ("yes.", True), ("YES", True), ("No", False), ("<think>yes yes</think>No", False),
     ("<think>\nhmm no\n</think>\n\nYes", True), ("", False)],
)
def test_verifier_reply(reply: str, yes: bool) -> None:
    assert verifier_says_yes(reply) is yes


def test_strip_think() -> None:
    assert strip_think("<think>a</think> b <think>c</think>") == "b"


class ExactVerifier:
    """A verifier for unit tests: exact match, and it records each batch it receives."""

    def __init__(self) -> None:
        self.batches: list[list[VerifyRequest]] = []

    def verify_batch(self, requests: Sequence[VerifyRequest]) -> list[bool]:
        self.batches.append(list(requests))
        return [r.answer == r.ground_truth for r in requests]


def test_grade_batch_sends_free_form_in_one_batch() -> None:
    verifier = ExactVerifier()
    items = [
        GradeItem("<answer>A</answer>", "A", AnswerForm.MCA),
        GradeItem("<answer>cat</answer>", "cat", AnswerForm.FREE_FORM, "What animal?"),
        GradeItem("<answer>3</answer>", "4", AnswerForm.NA),
        GradeItem("<think>x</think><answer>dog</answer>", "cat", AnswerForm.FREE_FORM, "What animal?"),
    ]
    assert grade_batch(items, verifier) == [True, True, False, False]
    assert verifier.batches == [
        [VerifyRequest("What animal?", "cat", "cat"), VerifyRequest("What animal?", "cat", "dog")]
    ]


def test_free_form_without_verifier_is_an_error() -> None:
    with pytest.raises(ValueError, match="need a verifier"):
        grade_batch([GradeItem("x", "y", AnswerForm.FREE_FORM)])
    assert grade_batch([GradeItem("<answer>B</answer>", "B", AnswerForm.MCA)]) == [True]


def test_verifier_returning_wrong_count_is_an_error() -> None:
    class Broken:
        def verify_batch(self, requests: Sequence[VerifyRequest]) -> list[bool]:
            return []

    with pytest.raises(RuntimeError, match="0 verdicts for 1"):
        grade_batch([GradeItem("x", "y", AnswerForm.FREE_FORM)], Broken())


def test_verifier_that_cannot_grade_gives_none() -> None:
    class Flaky:
        def verify_batch(self, requests: Sequence[VerifyRequest]) -> list[bool | None]:
            return [None, True]

    items = [GradeItem("a", "a", AnswerForm.FREE_FORM), GradeItem("b", "b", AnswerForm.FREE_FORM),
             GradeItem("<answer>C</answer>", "C", AnswerForm.MCA)]
    assert grade_batch(items, Flaky()) == [None, True, True]
