"""Server configuration: a YAML file, overridden by ``P2R_*`` environment variables.

Everything a deployment tunes lives here with its default; the Helm chart's values map onto
these names one to one (``P2R_MAX_IN_FLIGHT``, ``P2R_LIMITS__MAX_MODEL_LEN``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from p2r.core.errors import UserError
from p2r.core.prompts import VERIFIER_MAX_TOKENS
from p2r.services.checkpoints import DEFAULT_CACHE
from p2r.services.security import is_loopback

Role = Literal["perceiver", "reasoner", "verifier", "gateway"]
ROLES: tuple[Role, ...] = ("perceiver", "reasoner", "verifier", "gateway")


class Limits(BaseModel):
    """Engine limits of this server's model (vLLM arguments of the same names)."""

    max_model_len: int = Field(8192, ge=256)
    max_num_seqs: int | None = Field(
        None, ge=1, description="concurrent sequences; null: 16 on CPU, vLLM's default for the GPU")
    max_images_per_prompt: int = Field(4, ge=1, description="reasoner needs 1 + max crops = 4")
    kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of each GPU vLLM may take")
    tensor_parallel_size: int | None = Field(
        None, ge=1, description="GPUs one engine spans; null: every GPU the pod was given (its gpus), 1 on CPU")
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of shared prompt prefixes")
    enforce_eager: bool | None = Field(None, description="null: eager on CPU, CUDA graphs on GPU")


class TLS(BaseModel):
    """TLS of every port of this server, from files a ``kubernetes.io/tls`` Secret (e.g. made by
    cert-manager) mounts: ``tls.crt``, ``tls.key`` and ``ca.crt``. With ``ca_file`` set, clients
    must present a certificate it signed (mutual TLS) on the admin port, and on every port when
    ``require_client_cert`` is true."""

    cert_file: Path | None = Field(None, description="tls.crt; set with key_file to turn TLS on")
    key_file: Path | None = Field(None, description="tls.key")
    ca_file: Path | None = Field(None, description="ca.crt: the CA client certificates must chain to")
    require_client_cert: bool = Field(False, description="mTLS on the public ports too (needs ca_file)")

    @model_validator(mode="after")
    def _check(self) -> TLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: cert_file and key_file go together")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class ConfigFileMissing(UserError, FileNotFoundError):
    """``--config`` names no file: a user error, and still a FileNotFoundError to callers."""


class YamlSettings(BaseSettings):
    """Settings read from a YAML file, overridden by environment variables, overridden by
    explicit values (command-line flags)."""

    _yaml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_file))
        return tuple(sources)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: object) -> Self:
        if path is not None and not path.is_file():
            raise ConfigFileMissing(f"--config: no such file {path}")
        cls._yaml_file = path
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            cls._yaml_file = None


class ServeConfig(YamlSettings):
    """``p2r serve`` settings. Env: ``P2R_<FIELD>``, nested with ``__``."""

    model_config = SettingsConfigDict(env_prefix="P2R_", env_nested_delimiter="__", extra="forbid")

    roles: list[Role] = Field(default_factory=lambda: ["gateway"])
    model: str | None = Field(None, description="checkpoint dir, file:// or s3:// URI; none for a remote gateway")
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="gRPC; 0 picks a free port")
    metrics_port: int | None = Field(9090, ge=0, le=65535, description="Prometheus; null disables")
    http_port: int | None = Field(None, ge=0, le=65535, description="gateway HTTP facade; null disables")
    seed: int = 0
    limits: Limits = Field(default_factory=Limits)

    # Input and overload protection
    max_in_flight: int = Field(
        256, ge=1, description="admitted completions (items x n); beyond -> RESOURCE_EXHAUSTED, a single call "
        "asking for more than this can never run -> INVALID_ARGUMENT")
    max_batch_items: int = Field(
        64, ge=1, description="items per batch call (the trainer's reward_batch_size must fit); with "
        "max_image_bytes it sizes the gRPC receive limit")
    max_n: int = Field(64, ge=1, description="completions per request (sampling.n)")
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(100_000_000, ge=1, description="decoded width x height")
    max_question_chars: int = Field(16_384, ge=1)
    decoded_image_cache_bytes: int = Field(
        1024**3, ge=0, description="budget in decoded bytes, as Pillow stores them (RGB: 4 a pixel; with the "
        "resize and its intermediate pass), of every decoded image alive: the cache by content hash, the images "
        "requests hold, a non-RGB original while it converts, a reasoner request's annotated copy and crops "
        "while they are built; past it the cache is evicted, then the request is RESOURCE_EXHAUSTED (a request "
        "alone may exceed it); a bigger image is not cached; 0 disables the cache and the bound")
    prepare_workers: int = Field(
        0, ge=0, description="threads for decoding, evidence and resizing; 0 = half the CPUs of the container's "
                             "CPU quota (cgroup cpu.max), else of the affinity mask, at least 1")

    # Model-side resize (Qwen smart_resize) and defaults per role
    min_pixels: int = Field(4 * 32 * 32, ge=1)
    max_pixels: int = Field(2_097_152, ge=1)
    perceive_max_tokens: int = Field(2048, ge=1)
    reason_max_tokens: int = Field(2048, ge=1)
    verify_max_tokens: int = Field(VERIFIER_MAX_TOKENS, ge=1)
    structured_perceiver: bool = Field(False, description="constrain perceiver output to the bbox JSON schema")

    # Gateway: where perceiver / reasoner live. "local" = the engine in this process.
    perceiver_endpoint: str = "local"
    reasoner_endpoint: str = "local"

    # Gateway: the OpenAI-compatible chat API (services/openai_api.py) on the HTTP port.
    openai_model: str = Field("p2r", min_length=1, description="the model id /v1/models lists and requests name")
    image_url_allowlist: list[str] = Field(
        default_factory=list,
        description="http(s) URL prefixes (scheme://host[:port]/path) the chat API may fetch an image_url from; "
                    "empty: data: URLs only")
    image_url_timeout_s: float = Field(10.0, gt=0, description="fetching one allow-listed image_url")

    grace_period_s: float = Field(30.0, ge=0, description="SIGTERM: drain in-flight requests this long")
    # A client channel holds its HTTP/2 connections until they close; closing each after this
    # age (gRPC sends GOAWAY, the client re-resolves its dns:/// target and reconnects) is what
    # spreads long-lived gateway and trainer channels over the pods a scale-up added.
    max_connection_age_s: float | None = Field(
        300.0, gt=0, description="close each client connection after this long (+-10 % jitter); null: never")
    max_connection_age_grace_s: float = Field(
        600.0, ge=0, description="RPCs in flight on a closing connection get this long to finish; "
                                 "longer than the longest client deadline (300 s), so none is cut")

    # Connections: what a peer may hold before it has sent a request, or proved who it is
    # (services/http_transport.py for the HTTP port, gRPC's own options for the gRPC ports).
    # Sized for the reference deployment: 4 trainer ranks' batch calls (64 prompts x 8 rollouts)
    # arrive over gRPC on a handful of long-lived HTTP/2 connections; HTTP carries interactive
    # users (a browser opens up to 6 connections) and an ingress's keep-alive pool.
    http_max_connections: int = Field(
        1024, ge=1, description="open HTTP connections; past it the oldest idle one (no request in progress) is "
        "closed for the new one, and when none is idle the new one may only ask /healthz or /readyz (others "
        "get 503) - up to 64 more, beyond which it is closed at once")
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must send a complete request head within this after it opens "
        "(the TLS handshake included) or after its previous response has been sent and it sends a byte; "
        "else it is closed")
    http_keep_alive_s: float = Field(
        75.0, gt=0, description="an idle keep-alive connection (no byte since its last response) is closed after "
        "this; longer than a proxy's own idle timeout for its upstream connections (ingress-nginx: 60 s), so a "
        "proxy never sends a request on a connection the server is closing (a 502)")
    http_body_timeout_s: float = Field(
        120.0, gt=0, description="a request's whole body must arrive within this after its head (a maximal "
        "chat body, ~45 MB, needs 3 Mbit/s); else the connection is closed")
    http_max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="request line and header fields of one request, in bytes; larger -> 431")
    http_max_headers: int = Field(100, ge=8, description="header fields of one request; more -> 431")
    http_body_budget_bytes: int = Field(
        256 * 1024**2, ge=1, description="request bodies of all requests in progress together, counted from each "
        "one's Content-Length (a chunked one at max_http_body_bytes) until its answer is sent; a request that "
        "would pass it -> 429. At least max_http_body_bytes, so one maximal body always fits")
    grpc_keepalive_s: float = Field(
        60.0, gt=0, description="gRPC pings a connection idle this long, and closes it when the ping is not "
        "answered within grpc_keepalive_timeout_s (a peer gone without a FIN)")
    grpc_keepalive_timeout_s: float = Field(20.0, gt=0, description="see grpc_keepalive_s")
    grpc_max_connection_idle_s: float | None = Field(
        120.0, gt=0, description="a gRPC connection with no call in progress for this long is closed (GOAWAY; "
        "a client reconnects on its next call); null: never")
    grpc_handshake_timeout_s: float = Field(
        10.0, gt=0, description="a gRPC connection must finish its TLS and HTTP/2 handshake within this")

    # Security (services/security.py). Secrets come from files mounted from Kubernetes Secrets,
    # or inline (env P2R_API_KEY / P2R_ADMIN_TOKEN) for local use.
    tls: TLS = Field(default_factory=TLS)
    api_keys_file: Path | None = Field(None, description="API keys of the public ports, one per line")
    api_key: SecretStr | None = Field(None, description="API keys inline, comma-separated")
    admin: bool | None = Field(None, description="serve Admin on admin_port; null: on unless only the gateway runs")
    admin_port: int = Field(50052, ge=0, le=65535, description="Admin gRPC (LoadCheckpoint, Status); 0 picks one")
    admin_token_file: Path | None = Field(None, description="bearer token the admin port requires")
    admin_token: SecretStr | None = Field(None, description="admin token inline")
    checkpoint_cache: Path = Field(
        DEFAULT_CACHE, description="model cache root; each role set downloads into its own subdirectory (model_cache)")
    allow_unverified_local: bool = Field(
        False, description="load a local model directory that has no manifest.json (a developer's own directory); "
                           "remote models (s3://) always need one, and a manifest present is always enforced")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        engine_roles = {"perceiver", "reasoner", "verifier"} & set(self.roles)
        local_gateway = "gateway" in self.roles and "local" in (self.perceiver_endpoint, self.reasoner_endpoint)
        if (engine_roles or local_gateway) and not self.model:
            raise ValueError("a model is required for the perceiver, reasoner and verifier roles and a local gateway")
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        if self.http_body_budget_bytes < self.max_http_body_bytes:
            raise ValueError(f"http_body_budget_bytes ({self.http_body_budget_bytes}) must be at least "
                             f"max_http_body_bytes ({self.max_http_body_bytes}, from max_image_bytes), "
                             "or no maximal body could ever be read")
        if self.admin_enabled and not is_loopback(self.host) and not self.admin_credentials_configured:
            raise ValueError("admin on a non-loopback host needs admin_token(_file) or tls.ca_file (mTLS): "
                             "LoadCheckpoint swaps the served model")
        return self

    @property
    def admin_enabled(self) -> bool:
        """Admin is off on a gateway-only server unless asked for: it has no engine to reload and
        is the public entry point."""
        return self.admin if self.admin is not None else set(self.roles) != {"gateway"}

    @property
    def admin_credentials_configured(self) -> bool:
        return bool(self.admin_token_file or self.admin_token or (self.tls.enabled and self.tls.ca_file))

    @property
    def max_item_bytes(self) -> int:
        """The largest valid item of a call: one image at the image limit plus the other fields
        (question text at 4 bytes a character, regions, sampling)."""
        return self.max_image_bytes + 4 * self.max_question_chars + 64 * 1024

    @property
    def max_receive_bytes(self) -> int:
        """gRPC receive limit of the batch methods (and the server-wide one gRPC enforces before
        a message is buffered): a full batch of items at the limit. Capped below gRPC's 2 GiB
        ceiling."""
        return min(2**31 - 1, self.max_batch_items * self.max_item_bytes + 1024 * 1024)

    @property
    def max_unary_receive_bytes(self) -> int:
        """gRPC receive limit of the single-item methods (Answer, Perceive, Reason, Verify, ...):
        one item's worth (services/wire.py checks it on the serialized length, before parsing)."""
        return self.max_item_bytes + 64 * 1024

    @property
    def max_http_body_bytes(self) -> int:
        """HTTP request body limit: one image at the image limit, base64-encoded (the OpenAI
        routes take data URLs), plus the question and form overhead."""
        return (self.max_image_bytes * 4 + 2) // 3 + 4 * self.max_question_chars + 64 * 1024

    @property
    def model_cache(self) -> Path:
        """This server's own cache directory, ``checkpoint_cache/<roles joined by '-'>``: servers
        of different roles that share one volume never write into the same directory, and a
        restarted pod finds what its role downloaded before (kept when the sha256 still matches)."""
        return self.checkpoint_cache / "-".join(self.roles)


def connection_age_options(config: ServeConfig) -> list[tuple[str, int]]:
    """The gRPC server options of ``max_connection_age_s`` / ``max_connection_age_grace_s``."""
    if config.max_connection_age_s is None:
        return []
    return [("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000))]


def connection_options(config: ServeConfig) -> list[tuple[str, int]]:
    """The gRPC server options of the ``grpc_*`` connection settings: keepalive pings (a peer
    gone without a FIN is found and its connection closed), closing connections idle past
    ``grpc_max_connection_idle_s``, and a handshake deadline. Clients may ping as often as the
    server does (``min_recv_ping_interval``), so a client's keepalive never earns a GOAWAY."""
    keepalive_ms = round(config.grpc_keepalive_s * 1000)
    options = [("grpc.keepalive_time_ms", keepalive_ms),
               ("grpc.keepalive_timeout_ms", round(config.grpc_keepalive_timeout_s * 1000)),
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.min_recv_ping_interval_without_data_ms", min(keepalive_ms, 300_000)),
               ("grpc.server_handshake_timeout_ms", round(config.grpc_handshake_timeout_s * 1000))]
    if config.grpc_max_connection_idle_s is not None:
        options.append(("grpc.max_connection_idle_ms", round(config.grpc_max_connection_idle_s * 1000)))
    return options


def load_config(path: Path | None = None, **overrides: object) -> ServeConfig:
    """Config from ``path`` (YAML), then env, then ``overrides`` (command-line flags)."""
    return ServeConfig.load(path, **overrides)
