"""Live serving metrics through ``ray.serve.metrics``; the speculative-decoding counters carry vLLM's names.

Ray exports each on every node's metrics port (``ray start --metrics-export-port``) in Prometheus format with
its ``ray_`` prefix, counters with a ``_total`` suffix: ``ray_spec_decode_num_drafts_total``,
``ray_spec_decode_num_draft_tokens_total``, ``ray_spec_decode_num_accepted_tokens_total``,
``ray_spec_decode_num_accepted_tokens_per_pos_total{position="0"}``, ``ray_fastdraft_requests_total{status}``,
``ray_fastdraft_generated_tokens_total``, ``ray_fastdraft_refused_requests_total``,
``ray_fastdraft_client_errors_total{code}``, and the histograms
``ray_fastdraft_time_to_first_token_seconds_*`` and ``ray_fastdraft_request_latency_seconds_*``. Serve adds its
``deployment`` / ``replica`` / ``application`` tags. vLLM's dashboards query ``vllm:spec_decode_…_total{model_name}``:
the relabelling rules of ``cluster/prometheus/vllm_names.yml`` rename Ray's series to those at scrape time.
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class DecoderMetrics:
    """The decoder replica's counters and histograms, tagged with the served model and the decoding mode
    (``speculative`` / ``target``)."""

    def __init__(self, model: str):
        tags = ("model", "mode")
        self.num_drafts = metrics.Counter(
            "spec_decode_num_drafts", description="Speculative steps that proposed draft tokens.", tag_keys=tags
        )
        self.num_draft_tokens = metrics.Counter(
            "spec_decode_num_draft_tokens", description="Draft tokens proposed.", tag_keys=tags
        )
        self.num_accepted_tokens = metrics.Counter(
            "spec_decode_num_accepted_tokens", description="Draft tokens the target accepted.", tag_keys=tags
        )
        self.accepted_per_pos = metrics.Counter(
            "spec_decode_num_accepted_tokens_per_pos",
            description="Draft tokens accepted at each position of the proposal (0 = first).",
            tag_keys=(*tags, "position"),
        )
        self.requests = metrics.Counter(
            "fastdraft_requests",
            description="Generations by how they ended: finished, cancelled (client gone) or error.",
            tag_keys=(*tags, "status"),
        )
        self.generated_tokens = metrics.Counter(
            "fastdraft_generated_tokens", description="Tokens generated.", tag_keys=tags
        )
        self.time_to_first_token = metrics.Histogram(
            "fastdraft_time_to_first_token_seconds",
            description="Seconds from the decoder receiving a request to its first generated token.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tags,
        )
        self.latency = metrics.Histogram(
            "fastdraft_request_latency_seconds",
            description="Seconds from the decoder receiving a request to its end.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tags,
        )
        for metric in vars(self).values():
            metric.set_default_tags({"model": model})

    def step(self, mode: str, proposed: int, accepted: int, tokens: int) -> None:
        """Count one decoding step."""
        tags = {"mode": mode}
        if tokens:
            self.generated_tokens.inc(tokens, tags)
        if proposed:
            self.num_drafts.inc(1, tags)
            self.num_draft_tokens.inc(proposed, tags)
        if accepted:  # Ray's counters refuse an increment of 0
            self.num_accepted_tokens.inc(accepted, tags)
            for position in range(accepted):
                self.accepted_per_pos.inc(1, {"mode": mode, "position": str(position)})

    def finished(self, mode: str, status: str, latency_s: float, first_token_s: float | None) -> None:
        """Count one request's end."""
        tags = {"mode": mode}
        self.requests.inc(1, {"mode": mode, "status": status})
        self.latency.observe(latency_s, tags)
        if first_token_s is not None:
            self.time_to_first_token.observe(first_token_s, tags)


class IngressMetrics:
    """Requests the HTTP ingress answered without decoding: refusals (queue full, 503) and client errors."""

    def __init__(self, model: str):
        self.refused = metrics.Counter(
            "fastdraft_refused_requests",
            description="Requests refused with 503 because every decoder queue was full.",
            tag_keys=("model",),
        )
        self.client_errors = metrics.Counter(
            "fastdraft_client_errors",
            description="Requests answered with a 4xx error, by HTTP status.",
            tag_keys=("model", "code"),
        )
        self.refused.set_default_tags({"model": model})
        self.client_errors.set_default_tags({"model": model})
