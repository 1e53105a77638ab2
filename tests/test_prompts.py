"""The prompt strings are the released checkpoints' interface: pinned here character by character."""

from __future__ import annotations

import pytest

from p2r.core import prompts
from p2r.core.prompts import AnswerForm

PERCEIVER_TRAIN = (
    "Question: Where is the cat?\n"
    "Locate the key visual evidence in the image for answering this question. Report bbox coordinates "
    'in JSON format only: [{"bbox_2d": [x1, y1, x2, y2], "label": "description"}] If the question '
    "requires the entire image, return an empty list []."
)
POST_HEAD = "Provide your detailed reasoning between the <think> </think> tags, and then "


def test_perceiver_text_train_and_eval() -> None:
    assert prompts.perceiver_text("Where is the cat?") == PERCEIVER_TRAIN
    assert prompts.perceiver_text("Where is the cat?", "eval") == PERCEIVER_TRAIN.replace(
        '"label": "description"', '"label": "<description>"'
    )


@pytest.mark.parametrize(
    ("form", "variant", "post"),
    [
        ("mca", "train", "answer the question with the option's letter from the given choices (e.g., A, B, "
         "etc.) within the <answer> </answer> tags.\n"),
        ("na", "eval", "answer the question using a numerical value (e.g., 42 or 3.1) within the "
         "<answer> </answer> tags.\n"),
        ("free_form", "train", "provide your text answer within the <answer> </answer> tags.\n"),
        ("free_form", "eval", "answer the question simply within the <answer> </answer> tags.\n"),
    ],
)
def test_reasoner_text_posts(form: str, variant: str, post: str) -> None:
    with_ev = prompts.reasoner_text("Q?", form, with_evidence=True, variant=variant)  # type: ignore[arg-type]
    without = prompts.reasoner_text("Q?", form, with_evidence=False, variant=variant)  # type: ignore[arg-type]
    assert with_ev == (
        "Question: Q?\nThe key visual regions have been highlighted and cropped for you. "
        "Think step by step.\n" + POST_HEAD + post
    )
    assert without == "Question: Q?\nThink step by step.\n" + POST_HEAD + post


def test_verifier_text() -> None:
    assert prompts.verifier_text("Q", "cat", "a cat") == (
        "Given the question and its ground truth answer, determine if the predicted answer is correct. "
        "Consider semantic equivalence, not just exact string match.\n\nQuestion: Q\nGround truth answer: "
        'cat\nPredicted answer: a cat\n\nIs the predicted answer correct? Reply with only "Yes" or "No".'
    )
    assert prompts.SYSTEM_PROMPT == "You are a helpful assistant."
    assert prompts.VERIFIER_SYSTEM_PROMPT == "You are a helpful grading assistant."


def test_chat_messages_put_images_before_text() -> None:
    msgs = prompts.chat_messages("hello", 3)
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}
    assert [c["type"] for c in msgs[1]["content"]] == ["image", "image", "image", "text"]
    assert msgs[1]["content"][-1]["text"] == "hello"


def test_question_from_prompt_and_options() -> None:
    assert prompts.question_from_prompt("<image>What is it?<image>") == "What is it?"
    assert prompts.with_options("Q", ["A. x", "B. y"]) == "Q\nOptions:\nA. x\nB. y"
    assert prompts.with_options("Q", []) == "Q"


def test_answer_form_parse_rejects_unknown() -> None:
    assert AnswerForm.parse("na") is AnswerForm.NA
    with pytest.raises(ValueError, match="unknown answer form 'mcq'"):
        AnswerForm.parse("mcq")
