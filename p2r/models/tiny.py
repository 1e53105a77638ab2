"""A tiny, random-initialised Qwen3-VL checkpoint built locally, for tests and the demo.

Nothing can be downloaded from a model hub here, yet the services, trainer and evaluation must
run against a real engine. This module writes a complete Hugging Face checkpoint that both
``transformers`` and vLLM load: a 2-layer Qwen3-VL (hidden 128, head_dim 64, the smallest
head size vLLM's CPU attention accepts), a byte-level BPE tokenizer trained here that holds the
Qwen special tokens, a Qwen-style chat template and processor configs.

The weights are random, so its answers are noise; what it proves is that every code path
(tokenisation, image placeholders, vision tower, generation, weight sync) works end to end.

``write_bench_model`` writes a larger preset (``BENCH``, ~15M parameters) with the same tokenizer
and processor, for the trainer memory benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
from p2r.core.errors import UserError
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


@dataclass(frozen=True)
class Shape:
    """Sizes of a random Qwen3-VL preset (head_dim is ``HEAD_DIM`` for both towers)."""

    hidden: int = HIDDEN
    intermediate: int = 2 * HIDDEN
    layers: int = LAYERS
    kv_heads: int = HIDDEN // HEAD_DIM
    vision_hidden: int = HIDDEN
    vision_intermediate: int = 2 * HIDDEN
    vision_depth: int = LAYERS
    deepstack: tuple[int, ...] = (1,)


TINY = Shape()
# The trainer memory benchmark's model (bench/trainer_memory.py): ~15M parameters, big enough
# that model state and activations are a real share of the process, small enough that a step of
# 64 prompts x 8 rollouts runs in minutes on 2 CPU cores.
BENCH = Shape(hidden=384, intermediate=1024, layers=6, kv_heads=2, vision_hidden=256,
              vision_intermediate=1024, vision_depth=2)

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


def build_config(tokenizer: PreTrainedTokenizerFast, shape: Shape = TINY) -> Qwen3VLConfig:
    """A Qwen3-VL of ``shape`` (by default the 2-layer tiny one) whose special-token ids match
    ``tokenizer``."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = -(-len(tokenizer) // 64) * 64  # pad the embedding to a multiple of 64
    return Qwen3VLConfig(
        text_config={
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.hidden // HEAD_DIM,
            "num_key_value_heads": shape.kv_heads,
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
            "depth": shape.vision_depth,
            "hidden_size": shape.vision_hidden,
            "intermediate_size": shape.vision_intermediate,
            "num_heads": shape.vision_hidden // HEAD_DIM,
            "out_hidden_size": shape.hidden,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "num_position_embeddings": 576,
            "deepstack_visual_indexes": list(shape.deepstack),
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
    return _write_model(out, TINY, "p2r-tiny-qwen3vl", seed, dtype, init_std)


def write_bench_model(out: Path | str, seed: int = 0) -> Path:
    """Write the ``BENCH`` preset (fp32, random, the tiny model's tokenizer and processor)."""
    return _write_model(out, BENCH, "p2r-bench-qwen3vl", seed, torch.float32, None)


def _bind(out: Path) -> Path:
    """Write the checkpoint's ``manifest.json`` last: a server loads a local directory only
    with the manifest that binds its files (``p2r.services.checkpoints``)."""
    from p2r.services.checkpoints import write_manifest

    write_manifest(out)
    return out


def _write_model(out: Path | str, shape: Shape, kind: str, seed: int, dtype: torch.dtype,
                 init_std: float | None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, shape)
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
    (out / "p2r_tiny.json").write_text(json.dumps({"seed": seed, "kind": kind}))
    return _bind(out)


# ----------------------------------------------------------------- real-architecture presets
# Why: the memory plan (``p2r train --plan``) and a GPU smoke run need the real model's shapes,
# and no hub can be reached. These presets are the published Qwen3-VL configurations (values
# below) with random weights, beside the local tokenizer padded to the real vocabulary with the
# Qwen special tokens at their real ids: prompts, image placeholders, the embedding and the KV
# cache all have the real sizes. The tiny model above is unchanged.

QWEN_VOCAB_SIZE = 151936  # embedding rows (the real tokenizer has 151,669 entries)
QWEN_FIRST_SPECIAL_ID = 151643  # <|endoftext|>; the tokens below follow it in this order
# (token, special): Qwen's added tokens; the tool / think tags are added but not special.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN_TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                  "vision_end_token_id": 151653}
_TEXT = {
    "vocab_size": QWEN_VOCAB_SIZE, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                        "mrope_interleaved": True},
    "bos_token_id": 151643, "eos_token_id": 151645,
}
_VISION = {"num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
           "num_position_embeddings": 2304, "hidden_act": "gelu_pytorch_tanh"}
# Qwen3-VL-4B-Instruct (verified); Qwen3-VL-8B-Instruct (secondary source, vision tower equal to
# transformers' Qwen3VLVisionConfig defaults; untied head assumed, as in Qwen3-8B); Qwen3-VL-2B-Instruct
# (secondary source: torchtitan's experiments/qwen3_vl "2B" flavour - Qwen3-1.7B's text model, hidden
# 2048 x 28 layers, 16 heads / 8 KV heads of 128, MLP 6144, tied head - and the 4B's vision tower
# with out_hidden_size 2048; the one preset small enough to train alone on one 80 GiB GPU).
PRESETS: dict[str, dict] = {
    "qwen3-vl-4b": {
        "text_config": {**_TEXT, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True},
        "vision_config": {**_VISION, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "out_hidden_size": 2560, "deepstack_visual_indexes": [5, 11, 17]},
        "tie_word_embeddings": True,
    },
    "qwen3-vl-8b": {
        "text_config": {**_TEXT, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False},
        "vision_config": {**_VISION, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                          "out_hidden_size": 4096, "deepstack_visual_indexes": [8, 16, 24]},
        "tie_word_embeddings": False,
    },
    "qwen3-vl-2b": {
        "text_config": {**_TEXT, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True},
        "vision_config": {**_VISION, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17]},
        "tie_word_embeddings": True,
    },
}
SHARD_BYTES = 2 * 2**30  # a written shard; peak memory is about twice this (safetensors serialises a shard)


def preset_config(name: str) -> Qwen3VLConfig:
    """The real architecture of preset ``name`` (no weights): what ``--plan`` builds on meta."""
    import copy

    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r} (presets: {', '.join(PRESETS)})")
    return Qwen3VLConfig(**copy.deepcopy(PRESETS[name]), **QWEN_TOKEN_IDS)


def build_padded_tokenizer() -> PreTrainedTokenizerFast:
    """``build_tokenizer``'s BPE with the Qwen special tokens at their real ids.

    The local vocabulary fills ids from 0, unused placeholders (``<p2r_unused_N>``, reachable by
    no merge, so never produced) fill up to 151,643, then Qwen's added tokens follow in Qwen's
    order: ``<|image_pad|>`` is 151655 as the real config says."""
    from tokenizers import AddedToken

    base = json.loads(build_tokenizer().backend_tokenizer.to_str())["model"]
    regular = [t for t, _ in sorted(base["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIAL_TOKENS]
    regular += [f"<p2r_unused_{i}>" for i in range(QWEN_FIRST_SPECIAL_ID - len(regular))]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in base["merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(regular)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for content, special in QWEN_ADDED_TOKENS:  # one at a time: ids are assigned in order
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    for i, (content, _) in enumerate(QWEN_ADDED_TOKENS):
        assert tok.token_to_id(content) == QWEN_FIRST_SPECIAL_ID + i, content
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=262144)


def write_preset_model(out: Path | str, preset: str | Qwen3VLConfig, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16, shard_bytes: int = SHARD_BYTES,
                       progress: bool = False) -> Path:
    """Write a random ``preset`` (a name in ``PRESETS`` or a config with the real token ids) to
    ``out``, shard by shard: the model is built on the meta device and each shard's tensors are
    drawn, written and freed before the next, so a 4B model in bf16 needs ~2 shards of memory,
    not the model's 8.9 GB. Init as transformers' (normal(0, initializer_range) weights, unit
    norms, zero biases); the same ``seed`` gives the same weights."""
    import math

    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = preset_config(preset) if isinstance(preset, str) else preset
    tokenizer = build_padded_tokenizer()
    for attr, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        if getattr(config, attr) != tokenizer.convert_tokens_to_ids(token):
            raise ValueError(f"config {attr} {getattr(config, attr)} is not the tokenizer's {token}")
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    specs = _init_specs(model)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    std = config.text_config.initializer_range
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for name, shard in tqdm(list(zip(names, shards, strict=True)), desc="writing shards", disable=not progress):
        tensors = {key: _init_tensor(shape, kind, dtype, std, generator) for key, shape, kind in shard}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(shards) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for _, shape, _ in specs)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(out)
    generation = GenerationConfig(bos_token_id=config.text_config.bos_token_id,
                                  eos_token_id=[config.text_config.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    generation.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    kind = f"p2r-random-{preset}" if isinstance(preset, str) else "p2r-random-qwen3vl"
    (out / "p2r_tiny.json").write_text(json.dumps({"seed": seed, "kind": kind}))
    return _bind(out)


def _init_specs(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """(checkpoint name, shape, init) of every distinct parameter (a tied head once, as
    ``save_pretrained`` writes it), in state-dict order."""
    seen: set[int] = set()
    specs = []
    for prefix, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if pname == "bias":
                kind = "zeros"
            elif pname == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.Embedding)):
                kind = "normal"
            elif pname == "weight" and "Norm" in type(module).__name__:
                kind = "ones"
            else:
                raise ValueError(f"no init rule for {prefix}.{pname} ({type(module).__name__})")
            specs.append((f"{prefix}.{pname}" if prefix else pname, tuple(param.shape), kind))
    return specs


def _init_tensor(shape: tuple[int, ...], kind: str, dtype: torch.dtype, std: float,
                 generator: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)
    return (torch.ones if kind == "ones" else torch.zeros)(shape, dtype=dtype)
