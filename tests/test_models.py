"""The tiny Qwen3-VL checkpoint: loadable by transformers and by vLLM (CPU), image+text in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from p2r.core import prompts
from p2r.core.generation import ChatRequest, Sampling
from p2r.models.tiny import HEAD_DIM, SPECIAL_TOKENS


def _request(text: str = "What colour is this?") -> ChatRequest:
    image = Image.new("RGB", (256, 192), (200, 30, 30))
    return ChatRequest(prompts.chat_messages(text, 1), [image])


def test_checkpoint_files_and_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (tiny_model_dir / name).is_file(), name
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen3_vl" and config.text_config.head_dim == HEAD_DIM
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tok = processor.tokenizer
    for token in SPECIAL_TOKENS:  # each special token is one id, never split into bytes
        assert len(tok.encode(token, add_special_tokens=False)) == 1, token
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    text = tok.apply_chat_template(prompts.chat_messages("hi", 1), tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(tok.encode("Question: 12 ÷ 4 = 3 ✓")) == "Question: 12 ÷ 4 = 3 ✓"  # byte-level
    assert json.loads((tiny_model_dir / "p2r_tiny.json").read_text())["seed"] == 0


def test_transformers_generates_from_image_and_text(tiny_model_dir: Path) -> None:
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    req = _request()
    text = processor.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=req.images, return_tensors="pt")
    # 256x192 px -> 16x12 patches of 16 px -> 8x6 merged tokens
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 16]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 48
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8 or out[0, -1] == model.config.text_config.eos_token_id


@pytest.mark.engine
def test_vllm_generates_from_image_and_text(engine) -> None:  # type: ignore[no-untyped-def]
    [[a, b]] = engine.generate([_request()], Sampling(n=2, temperature=1.0, max_tokens=16, seed=7))
    assert isinstance(a, str) and isinstance(b, str) and (a or b)
    greedy = engine.generate([_request(), _request()], Sampling(max_tokens=16))
    assert greedy[0] == greedy[1]  # temperature 0 is deterministic


@pytest.mark.engine
def test_vllm_matches_transformers_greedy(engine, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """vLLM and transformers load the same weights and images the same way: same greedy tokens."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    req = _request("Describe the image.")
    text = processor.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=req.images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    hf_text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    [[vllm_text]] = engine.generate([req], Sampling(max_tokens=6))
    assert vllm_text == hf_text


@pytest.mark.engine
def test_vllm_rejects_too_many_images(engine) -> None:  # type: ignore[no-untyped-def]
    images = [Image.new("RGB", (64, 64))] * 5
    with pytest.raises(ValueError, match="5 images, over the limit of 4"):
        engine.generate([ChatRequest(prompts.chat_messages("x", 5), images)], Sampling())
