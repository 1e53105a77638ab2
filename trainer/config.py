"""``p2r train`` configuration (YAML file; ``P2R_TRAIN_*`` environment overrides).

Defaults are the reference runs (p2r-method.md §Training hyper-parameters) where they apply
to every machine; batch sizes and lengths are set per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from p2r.services.config import YamlSettings
from p2r.trainer.grpo import Aggregation

TrainRole = Literal["perceiver", "reasoner", "baseline"]
"""What ``p2r train`` trains: stage 1 (perceiver), stage 2 (reasoner), or ``baseline`` - the
reference's plain single-turn GRPO on the same data, for comparing P2R with vanilla GRPO: the
original image, the no-evidence reasoner prompt, the role's own answer graded (no frozen role)."""

# The reference's lengths per role (p2r-method.md, training hyper-parameters). The baseline
# answers like the reasoner (2,048 response tokens) and gets the reasoner's lengths.
ROLE_LENGTHS: dict[str, dict[str, int]] = {
    "perceiver": {"max_prompt_tokens": 2560, "max_response_tokens": 1024, "max_model_len": 4096},
    "reasoner": {"max_prompt_tokens": 8704, "max_response_tokens": 2048, "max_model_len": 12288},
    "baseline": {"max_prompt_tokens": 8704, "max_response_tokens": 2048, "max_model_len": 12288},
}


class TrainConfig(YamlSettings):
    model_config = SettingsConfigDict(env_prefix="P2R_TRAIN_", env_nested_delimiter="__", extra="forbid")

    role: TrainRole
    model: str = Field(description="initial policy checkpoint (dir, file:// or s3://); latest:ROOT is the "
                       "newest complete step-N under ROOT (stage 2 from stage 1's output)")
    data: Path = Field(description="P2R-10k-layout parquet")
    image_prefix: Path | None = None
    output: str = Field(description="checkpoint root: a directory, file:// or s3:// URI")
    workdir: Path = Field(Path("p2r-train"), description="local scratch: metrics, checkpoint staging")

    # Frozen services (host:port). Perceiver stage needs the reasoner; reasoner stage the perceiver.
    reasoner_endpoint: str | None = None
    perceiver_endpoint: str | None = None
    verifier_endpoint: str | None = None
    reward_plugin: str | None = Field(None, description="module:function(sample, response) -> float; "
                                                        "replaces the role reward")

    # GRPO
    rollouts_per_prompt: int = Field(8, ge=1)
    prompts_per_step: int = Field(64, ge=1, description="global, across ranks")
    learning_rate: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0, description="AdamW, decoupled (the reference's 0.01)")
    max_grad_norm: float = Field(1.0, gt=0)
    kl_coef: float = Field(0.01, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    clip_ratio_c: float = Field(3.0, gt=1, description="dual-clip bound for negative advantages (veRL)")
    norm_adv_by_std: bool = True
    aggregation: Aggregation = "token-mean"
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    seed: int = 0

    # Memory and precision of the update (trainer/actor.py)
    micro_batch_size: int = Field(8, ge=1, description="at most this many responses of one prompt per "
                                  "forward/backward; the update does not depend on it, peak memory does")
    max_tokens_per_micro_batch: int | None = Field(
        16384, ge=1, description="token budget of a micro-batch (veRL's dynamic batch size, its default "
        "ppo_max_token_len_per_gpu): responses of one "
        "prompt are packed while responses x (prompt + longest response) stays within it (one response always "
        "goes); null: micro_batch_size alone")
    gradient_checkpointing: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="forward/backward dtype; weights and AdamW state stay fp32. auto: bf16 on GPU")
    ref_cpu_offload: bool = Field(False, description="keep the reference model's shards in host memory")
    actor_offload: bool = Field(True, description="GPU: policy / reference shards and AdamW state in host "
                                "memory while the engine is awake (the engine then has its share)")

    # Lengths and images. Unset, they are the reference's per role (ROLE_LENGTHS); an unset
    # max_prompt_tokens never exceeds what max_model_len leaves after the response.
    max_response_tokens: int = Field(1024, ge=1)
    max_model_len: int = Field(4096, ge=256)
    max_prompt_tokens: int = Field(2560, ge=1, description="longer prompts (engine tokens, images expanded) "
                                   "are dropped at load and counted")
    max_pixels: int = Field(2_097_152, ge=1024)
    frozen_max_tokens: int = Field(2048, ge=1, description="frozen perceiver/reasoner: temperature 0")

    # Reward calls
    reward_batch_size: int = Field(64, ge=1, description="items per batch RPC")
    reward_concurrency: int = Field(4, ge=1, description="batch RPCs in flight at once")
    reward_retries: int = Field(3, ge=0, le=4, description="retries of a reward RPC on UNAVAILABLE or "
                                "RESOURCE_EXHAUSTED only (the client's RetryPolicy; gRPC allows 5 attempts)")
    service_timeout_s: float = Field(600.0, gt=0)
    reward_timeout_s: float = Field(900.0, gt=0, description="how long one step's reward calls may take in "
                                    "all: a batch refused with RESOURCE_EXHAUSTED (the service's admission is "
                                    "full) waits with backoff until then; a batch still unanswered is dropped")
    reward_batch_bytes: int = Field(64 * 1024**2, ge=1, description="bytes per batch RPC (images and requests; "
                                    "a sample's image counts once per batch); at most half the message limit "
                                    "(the smaller of the client's and the server's Admin.Status max_receive_bytes)")
    max_dropped_fraction: float = Field(0.1, ge=0, le=1, description="a step (or validation) whose share of "
                                        "rewards that could not be computed is above this fails the run, naming "
                                        "the service and its gRPC status")
    service_wait_s: float = Field(300.0, gt=0, description="how long a reward service may take to accept a "
                                  "connection at start-up (it may be starting); then the run fails naming it")
    reward_image_cache_bytes: int = Field(512 * 1024**2, ge=0, description="encoded sample images kept for "
                                          "reward calls (least recently used evicted past it; 0: none kept)")

    # Validation (trainer/validation.py): greedy, n = 1, the role's reward
    val_data: Path | None = Field(None, description="P2R-10k-layout parquet for validation")
    val_every: int = Field(10, ge=1, description="validate after every N steps (the reference's 10)")
    val_before_train: bool = True
    val_batch_size: int = Field(64, ge=1, description="validation samples per engine call: the images of one "
                                "chunk are decoded and in flight at a time, not a rank's whole share")
    dump_rollouts_every: int | None = Field(None, ge=1, description="per-sample rollout JSONL every N steps "
                                            "(workdir/rollouts/); null: never")

    save_every: int = Field(30, ge=1)
    step_timeout_s: float = Field(1800.0, gt=0, description="how long a step's collectives wait for the slowest "
                                  "rank (trainer/failures.py); a failing rank stops the others at once anyway")
    checkpoint_timeout_s: float = Field(3600.0, gt=0, description="how long start-up, validation and checkpoint "
                                        "collectives wait (downloads and uploads of tens of GiB)")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus on rank 0; null disables")
    metrics_host: str = Field("127.0.0.1", description="metrics bind address; 0.0.0.0 in a pod, so Prometheus "
                              "can scrape it")
    kv_cache_gib: int = Field(1, ge=1, description="CPU engine's KV cache (VLLM_CPU_KVCACHE_SPACE)")

    # The colocated rollout engine (GPU settings are ignored on CPU)
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1, description="share of each GPU the engine "
                                          "takes while awake (the reference's 0.8; it sleeps during the update)")
    enable_sleep_mode: bool = Field(True, description="GPU: free the engine's memory during the update")
    sleep_level: Literal[1, 2] = Field(2, description="2: the engine's weights are dropped while it sleeps, since "
                                       "the push after the update overwrites every one of them; 1: they are also "
                                       "backed up to host memory and restored first (wasted work each step)")
    rollout_tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int = Field(1024, ge=1, description="engine batch: 64 prompts x 8 rollouts fit at once")
    enforce_eager: bool | None = Field(None, description="null: CUDA graphs on GPU, eager on CPU")

    @model_validator(mode="before")
    @classmethod
    def _role_lengths(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("role") in ROLE_LENGTHS:
            defaults = ROLE_LENGTHS[data["role"]]
            data = {**data}
            for key in ("max_response_tokens", "max_model_len"):
                data.setdefault(key, defaults[key])
            if "max_prompt_tokens" not in data:
                room = int(data["max_model_len"]) - int(data["max_response_tokens"])
                data["max_prompt_tokens"] = max(1, min(defaults["max_prompt_tokens"], room))
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.max_prompt_tokens + self.max_response_tokens > self.max_model_len:
            raise ValueError(f"max_prompt_tokens {self.max_prompt_tokens} + max_response_tokens "
                             f"{self.max_response_tokens} exceed max_model_len {self.max_model_len}")
        if self.reward_plugin is None:
            if self.role == "perceiver" and not self.reasoner_endpoint:
                raise ValueError("the perceiver stage needs reasoner_endpoint (or a reward_plugin)")
            if self.role == "reasoner" and not self.perceiver_endpoint:
                raise ValueError("the reasoner stage needs perceiver_endpoint (or a reward_plugin)")
        return self


def load_train_config(path: Path | None, **overrides: object) -> TrainConfig:
    return TrainConfig.load(path, **overrides)
