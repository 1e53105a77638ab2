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


# ------------------------------------------------------- reference details (issue 15, items 1, 3, 10)


@pytest.mark.parametrize(
    ("form", "post"),
    [
        ("mca", "Answer the question with the option's letter from the given choices (e.g., A, B, etc.) directly.\n"),
        ("na", "Answer the question using a numerical value (e.g., 42 or 3.1) directly.\n"),
        ("free_form", "Output the answer simply and directly.\n"),
    ],
)
def test_default_mode_text_is_question_line_then_direct_post(form: str, post: str) -> None:
    """Reference default mode: ``"Question: {question}\\n"`` + the form's direct post."""
    assert prompts.direct_text("Is it red?\nOptions:\nA. yes\nB. no", form) == (
        "Question: Is it red?\nOptions:\nA. yes\nB. no\n" + post)


@pytest.mark.parametrize(
    ("form", "post"),
    [
        ("mca", "answer the question with the option's letter from the given choices (e.g., A, B, etc.) within "
         "the <answer> </answer> tags.\n"),
        ("na", "answer the question using a numerical value (e.g., 42 or 3.1) within the <answer> </answer> tags.\n"),
        ("free_form", "answer the question simply within the <answer> </answer> tags.\n"),
    ],
)
def test_thinking_mode_pre_has_a_space_before_its_newline(form: str, post: str) -> None:
    """Reference thinking mode: ``"Question: {question}\\nThink step by step. \\n"`` (space before
    the newline, unlike the reasoner's no-evidence pre) + the evaluation reasoner post."""
    assert prompts.thinking_text("Q?", form) == "Question: Q?\nThink step by step. \n" + POST_HEAD + post
    assert prompts.thinking_text("Q?", form) != prompts.reasoner_text("Q?", form, with_evidence=False,
                                                                       variant="eval")


def test_policy_layout_puts_newline_text_items_after_each_image() -> None:
    """Reference training layout: ``"<image>\\n" * n + text`` split at the tags, so one image gives
    [image, "\\nQuestion: ..."] and three give [image, "\\n", image, "\\n", image, "\\nQuestion: ..."]."""
    text = "Question: Q?\nThink step by step.\n"
    one = prompts.policy_messages(text, 1)
    assert one[0] == prompts.chat_messages(text, 1)[0]
    assert one[1] == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + text}]}
    three = prompts.policy_messages(text, 3)[1]["content"]
    assert three == [{"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"},
                     {"type": "text", "text": "\n"}, {"type": "image"}, {"type": "text", "text": "\n" + text}]
    # the frozen services and the evaluation keep images back to back, text without the newline
    assert prompts.chat_messages(text, 3)[1]["content"][-1] == {"type": "text", "text": text}


def test_question_from_prompt_removes_tags_with_the_whitespace_after_them() -> None:
    """Reference: ``re.sub(r"<image>\\s*", "", text).strip()``: ``'Look at this: <image> q'`` gives
    ``'Look at this: q'``, not a double space."""
    assert prompts.question_from_prompt("Look at this: <image> q") == "Look at this: q"
    assert prompts.question_from_prompt("<image>\n<image>\nWhich one?") == "Which one?"


def test_eval_prompts_render_token_for_token_through_the_chat_template(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """``p2r eval``'s three modes, rendered by the tiny model's (Qwen ChatML) chat template, equal
    strings built by hand from the notes: system prompt, then the user turn = the image, then
    the text; p2r mode's perceiver and (no-)evidence reasoner use the evaluation variants."""
    from PIL import Image
    from transformers import AutoTokenizer

    from p2r.core.bbox import parse_regions
    from p2r.core.evidence import build_evidence
    from p2r.core.flow import perceiver_request, reasoner_request
    from p2r.core.images import EVAL_BOUNDS
    from p2r.data.dataset import ImageRef
    from p2r.eval.benchmarks import EvalSample
    from p2r.eval.inference import direct_prompt, thinking_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    q = "What colour is the car?\nOptions:\nA. red\nB. blue"
    sample = EvalSample("1", "V*", "attribute", q, "A", AnswerForm.MCA, ImageRef(data=b""), "ABCD")
    image = Image.new("RGB", (640, 480), "white")

    def render(messages: list) -> list[int]:
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        return list(out["input_ids"])

    def by_hand(user: str, images: int = 1) -> list[int]:
        text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                + "<|vision_start|><|image_pad|><|vision_end|>" * images + user
                + "<|im_end|>\n<|im_start|>assistant\n")
        return tok.encode(text, add_special_tokens=False)

    mca_post = ("Provide your detailed reasoning between the <think> </think> tags, and then answer the question "
                "with the option's letter from the given choices (e.g., A, B, etc.) within the <answer> </answer> "
                "tags.\n")
    default = (f"Question: {q}\nAnswer the question with the option's letter from the given choices "
               "(e.g., A, B, etc.) directly.\n")
    thinking = f"Question: {q}\nThink step by step. \n" + mca_post
    perceive = (f"Question: {q}\nLocate the key visual evidence in the image for answering this question. Report "
                'bbox coordinates in JSON format only: [{"bbox_2d": [x1, y1, x2, y2], "label": "<description>"}] '
                "If the question requires the entire image, return an empty list [].")
    reason_plain = f"Question: {q}\nThink step by step.\n" + mca_post
    reason_evidence = (f"Question: {q}\nThe key visual regions have been highlighted and cropped for you. "
                       "Think step by step.\n" + mca_post)
    assert render(prompts.chat_messages(direct_prompt(sample), 1)) == by_hand(default)
    assert render(prompts.chat_messages(thinking_prompt(sample), 1)) == by_hand(thinking)
    assert render(perceiver_request(image, q, EVAL_BOUNDS, "eval").messages) == by_hand(perceive)
    plain = reasoner_request(build_evidence(image, []), q, AnswerForm.MCA, EVAL_BOUNDS, "eval")
    assert render(plain.messages) == by_hand(reason_plain)
    boxes = parse_regions('[{"bbox_2d": [10, 10, 300, 300], "label": "car"}, '
                          '{"bbox_2d": [500, 500, 900, 900], "label": "sign"}]')
    evidence = reasoner_request(build_evidence(image, boxes), q, AnswerForm.MCA, EVAL_BOUNDS, "eval")
    assert len(evidence.images) == 3 and render(evidence.messages) == by_hand(reason_evidence, images=3)

