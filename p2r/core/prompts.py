"""Prompt strings of the P2R method, and the chat messages built from them.

The strings are part of the released checkpoints' interface (the reference implementation's
prompts): a one-character drift changes what a trained perceiver or reasoner does. They live here
and nowhere else; every service, the trainer and the evaluation import them.

A chat message is a plain ``{"role": ..., "content": [...]}`` dict whose content items are
``{"type": "image"}`` placeholders (in order) followed by one ``{"type": "text", ...}`` item, as
the Qwen chat template expects. The images themselves travel beside the messages.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

SYSTEM_PROMPT = "You are a helpful assistant."
VERIFIER_SYSTEM_PROMPT = "You are a helpful grading assistant."
VERIFIER_MAX_TOKENS = 64
"""The verifier runs at temperature 0 with at most 64 new tokens, thinking disabled."""

Variant = Literal["train", "eval"]
"""Training and evaluation differ in two strings (perceiver label placeholder, free-form post)."""


class AnswerForm(StrEnum):
    """How an answer is graded: multiple choice, numeric, or free text (by the verifier)."""

    MCA = "mca"
    NA = "na"
    FREE_FORM = "free_form"

    @classmethod
    def parse(cls, value: str) -> AnswerForm:
        """Parse a user- or data-supplied answer form, with a message naming the valid ones."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(f.value for f in cls)
            raise ValueError(f"unknown answer form {value!r} (expected one of: {valid})") from None


_PERCEIVER_INSTRUCTION = (
    "Locate the key visual evidence in the image for answering this question. "
    "Report bbox coordinates in JSON format only: "
    '[{{"bbox_2d": [x1, y1, x2, y2], "label": "{placeholder}"}}] '
    "If the question requires the entire image, return an empty list []."
)

_REASONER_PRE_EVIDENCE = (
    "Question: {question}\n"
    "The key visual regions have been highlighted and cropped for you. Think step by step.\n"
)
_REASONER_PRE_PLAIN = "Question: {question}\nThink step by step.\n"

_POST_HEAD = "Provide your detailed reasoning between the <think> </think> tags, and then "
_REASONER_POST = {
    AnswerForm.MCA: _POST_HEAD
    + "answer the question with the option's letter from the given choices (e.g., A, B, etc.) "
    "within the <answer> </answer> tags.\n",
    AnswerForm.NA: _POST_HEAD
    + "answer the question using a numerical value (e.g., 42 or 3.1) "
    "within the <answer> </answer> tags.\n",
}
_FREE_FORM_POST = {
    "train": _POST_HEAD + "provide your text answer within the <answer> </answer> tags.\n",
    "eval": _POST_HEAD + "answer the question simply within the <answer> </answer> tags.\n",
}

_VERIFIER_TEMPLATE = (
    "Given the question and its ground truth answer, determine if the predicted answer is "
    "correct. Consider semantic equivalence, not just exact string match.\n\n"
    "Question: {question}\nGround truth answer: {ground_truth}\nPredicted answer: {answer}\n\n"
    'Is the predicted answer correct? Reply with only "Yes" or "No".'
)

# Placeholder the perceiver prompt shows as the label; a policy that copies it back earns no
# reward (p2r-method.md §Rewards), so rewards.py imports this constant rather than a literal.
LABEL_PLACEHOLDER = {"train": "description", "eval": "<description>"}


def perceiver_text(question: str, variant: Variant = "train") -> str:
    """The perceiver's user text for ``question``."""
    placeholder = LABEL_PLACEHOLDER[variant]
    return f"Question: {question}\n" + _PERCEIVER_INSTRUCTION.format(placeholder=placeholder)


def reasoner_text(
    question: str, form: AnswerForm | str, *, with_evidence: bool, variant: Variant = "train"
) -> str:
    """The reasoner's user text: the with-evidence pre only when crops were actually built."""
    form = _form(form)
    pre = _REASONER_PRE_EVIDENCE if with_evidence else _REASONER_PRE_PLAIN
    post = _FREE_FORM_POST[variant] if form is AnswerForm.FREE_FORM else _REASONER_POST[form]
    return pre.format(question=question) + post


# Evaluation prompts of the two baseline modes (p2r-method.md, Reference details). Default
# mode answers directly; thinking mode has its own pre - note the space before its newline,
# which the reference has and the P2R reasoner's no-evidence pre does not - and the P2R
# reasoner's evaluation posts.
_DIRECT_POST = {
    AnswerForm.MCA: "Answer the question with the option's letter from the given choices (e.g., A, B, etc.) "
    "directly.\n",
    AnswerForm.NA: "Answer the question using a numerical value (e.g., 42 or 3.1) directly.\n",
    AnswerForm.FREE_FORM: "Output the answer simply and directly.\n",
}
_THINKING_PRE = "Question: {question}\nThink step by step. \n"


def _form(form: AnswerForm | str) -> AnswerForm:
    return AnswerForm.parse(form) if isinstance(form, str) else form


def _eval_post(form: AnswerForm) -> str:
    return _FREE_FORM_POST["eval"] if form is AnswerForm.FREE_FORM else _REASONER_POST[form]


def direct_text(question: str, form: AnswerForm | str) -> str:
    """The default-mode user text: ``Question: {question}\\n`` then the direct-answer line."""
    return f"Question: {question}\n" + _DIRECT_POST[_form(form)]


def thinking_text(question: str, form: AnswerForm | str) -> str:
    """The thinking-mode user text: its own pre (``Think step by step. \\n``), the eval post."""
    return _THINKING_PRE.format(question=question) + _eval_post(_form(form))


def verifier_text(question: str, ground_truth: str, answer: str) -> str:
    """The verifier's user text (no image)."""
    return _VERIFIER_TEMPLATE.format(question=question, ground_truth=ground_truth, answer=answer)


def chat_messages(
    user_text: str, num_images: int, system: str = SYSTEM_PROMPT
) -> list[dict[str, Any]]:
    """System turn, then a user turn holding ``num_images`` image items first, then the text.

    The layout of every frozen-service call and of the evaluation; the trained policy's own
    prompt is ``policy_messages``."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": user_text})
    return _with_system(content, system)


IMAGE_TAG = "<image>"
_IMAGE_SPLIT_RE = re.compile(f"({re.escape(IMAGE_TAG)})")


def policy_messages(user_text: str, num_images: int, system: str = SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """The trained role's own prompt, laid out as the reference's veRL dataset builds it.

    The user content is the string ``"<image>\\n" * num_images + user_text``, split at each tag
    into an image item per tag and a text item per non-empty segment: one image gives [image,
    ``"\\n" + text``], three give [image, ``"\\n"``, image, ``"\\n"``, image, ``"\\n" + text``]. The
    policy was trained on these newlines; the frozen services' prompts have none.
    """
    content: list[dict[str, Any]] = []
    for part in _IMAGE_SPLIT_RE.split(f"{IMAGE_TAG}\n" * num_images + user_text):
        if part == IMAGE_TAG:
            content.append({"type": "image"})
        elif part:
            content.append({"type": "text", "text": part})
    return _with_system(content, system)


def _with_system(content: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": content},
    ]


_IMAGE_TAG_RE = re.compile(r"<image>\s*")


def question_from_prompt(user_text: str) -> str:
    """A P2R-10k prompt's question: every ``<image>`` tag and the whitespace after it removed
    (regex ``<image>\\s*``), then stripped: ``'Look at this: <image> q'`` -> ``'Look at this: q'``."""
    return _IMAGE_TAG_RE.sub("", user_text).strip()


def with_options(question: str, options: list[str]) -> str:
    """Append multiple-choice options the way the evaluation does: ``\\nOptions:\\n`` + lines."""
    if not options:
        return question
    return question + "\nOptions:\n" + "\n".join(options)
