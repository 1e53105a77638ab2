"""What a model role is asked to do: chat requests with images, and sampling settings.

The P2R flow, the trainer's reward loop and the evaluation are written against the small
``Generator`` protocol below, so the same code runs over an in-process vLLM engine or over the
gRPC role services.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image


@dataclass
class ChatRequest:
    """Chat messages (image placeholders in order) and the images that fill them."""

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    # Extra chat-template switches, e.g. {"enable_thinking": False} for the verifier.
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling settings; temperature 0 means greedy."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


class Generator(Protocol):
    """Anything that turns chat requests into ``sampling.n`` completions each."""

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[str]]: ...
