"""A tiny, random-initialised Qwen3-VL checkpoint built locally, for tests and the demo.

Nothing can be downloaded from a model hub here, yet the services, trainer and evaluation must
run against a real engine. This module writes a complete Hugging Face checkpoint that both
``transformers`` and vLLM load: a 2-layer Qwen3-VL (hidden 128, head_dim 64, the smallest
head size vLLM's CPU attention accepts), a byte-level BPE tokenizer trained here that holds the
Qwen special tokens, a Qwen-style chat template and processor configs.

The weights are random, so its answers are noise; what it proves is that every code path
(tokenisation, image placeholders, vision tower, generation, weight sync) works end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from p2r.core import prompts
from p2r.core.images import RESIZE_FACTOR

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB_SIZE = 2048
HIDDEN = 128
HEAD_DIM = 64
LAYERS = 2
PATCH_SIZE = 16
MERGE_SIZE = 2

# Qwen-style ChatML. Image items render as the vision placeholder triple that the processor
# (and vLLM) expand to one <|image_pad|> per merged patch.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _tokenizer_corpus() -> list[str]:
    """Text the tokenizer is trained on: every prompt form, JSON boxes, digits and answers."""
    corpus = [
        prompts.SYSTEM_PROMPT,
        prompts.VERIFIER_SYSTEM_PROMPT,
        prompts.perceiver_text("What colour is the small square?"),
        prompts.perceiver_text("How many circles are there?", "eval"),
        prompts.verifier_text("What is written?", "cat", "a cat"),
    ]
    for form in prompts.AnswerForm:
        for evidence in (True, False):
            corpus.append(prompts.reasoner_text("Which option?", form, with_evidence=evidence))
    corpus += [
        json.dumps([{"bbox_2d": [i, i + 3, i + 50, i + 77], "label": "red square"}])
        for i in range(0, 900, 37)
    ]
    corpus += [f"<think>step {i}</think><answer>{c}</answer>" for i, c in enumerate("ABCDE")]
    corpus += [" ".join(str(n) for n in range(k, k + 50)) for k in range(0, 1000, 50)]
    corpus.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?()[]{}<>'\"-_/")
    return corpus


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``_tokenizer_corpus`` (deterministic), with Qwen specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )
    return fast


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    """A 2-layer Qwen3-VL whose special-token ids match ``tokenizer``."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = -(-len(tokenizer) // 64) * 64  # pad the embedding to a multiple of 64
    return Qwen3VLConfig(
        text_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HIDDEN // HEAD_DIM,
            "num_key_value_heads": HIDDEN // HEAD_DIM,
            "head_dim": HEAD_DIM,
            "vocab_size": vocab,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            # Interleaved M-RoPE: temporal/height/width sections sum to head_dim / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [12, 10, 10],
                "mrope_interleaved": True,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": LAYERS,
            "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN,
            "num_heads": HIDDEN // HEAD_DIM,
            "out_hidden_size": HIDDEN,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "num_position_embeddings": 576,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLProcessor:
    """Qwen3-VL processor: 16-px patches merged 2x2 (factor 32), wide pixel bounds.

    The bounds are wide because images are already ``smart_resize``-d by ``p2r.core.images``
    with the run's own bounds; the processor must not resize them a second time.
    """
    assert PATCH_SIZE * MERGE_SIZE == RESIZE_FACTOR
    size = {"shortest_edge": 4 * 32 * 32, "longest_edge": 16384 * 32 * 32}
    common = {
        "patch_size": PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    image_processor = Qwen2VLImageProcessor(size=size, **common)
    video_processor = Qwen3VLVideoProcessor(size=size, **common)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def write_tiny_model(out: Path | str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     init_std: float | None = None) -> Path:
    """Write the tiny checkpoint to ``out`` (created if needed) and return the path.

    Same ``seed`` gives the same weights, so tests and the demo are reproducible. With the
    default init (std 0.02) the tied embedding dominates the residual stream and greedy decoding
    repeats the prompt's last token whatever the input; a larger ``init_std`` gives a model whose
    replies depend on the image and question (evaluation tests compare per-sample outputs).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    if init_std is not None:
        config.initializer_range = config.text_config.initializer_range = init_std
        config.vision_config.initializer_range = init_std
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(dtype)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "p2r_tiny.json").write_text(json.dumps({"seed": seed, "kind": "p2r-tiny-qwen3vl"}))
    return out
