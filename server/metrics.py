"""Every Prometheus series Offramp exports, in one place.

Names and semantics follow vLLM's (`vllm:x` becomes `offramp_x`), with the same histogram
buckets, plus the early-exit series. `Metrics` is the engine's StatsObserver: the engine calls
`record_step` after each step and `record_finished` once per finished request, from its own
thread (prometheus_client is thread-safe). Each instance owns a CollectorRegistry, so several
apps in one process (tests) never collide.
"""
import collections

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               disable_created_metrics, generate_latest)

from server.engine.stats import FinishedRequestStats, StepStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM v1's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
# Ours: one engine step is milliseconds on a GPU and tens of milliseconds on a CPU.
STEP_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5]
MARGIN_BUCKETS = [round(0.05 * i, 2) for i in range(1, 21)]  # margin = p1 - p2, in [0, 1]

FINISH_REASONS = ("stop", "length", "abort")

disable_created_metrics()  # as vLLM: no *_created series next to every counter and histogram


class Metrics:
    def __init__(self, model_name: str, exit_layers: list[int], num_hidden_layers: int,
                 registry: CollectorRegistry | None = None, process_metrics: bool = True):
        """exit_layers: the head set's layers (may be empty); num_hidden_layers: the final layer L."""
        self.registry = registry or CollectorRegistry()
        if process_metrics:
            ProcessCollector(registry=self.registry)
        self.model_name = model_name
        self.layers = sorted(set(exit_layers) | {num_hidden_layers})
        labels = ["model_name"]
        r = self.registry

        self.num_requests_running = Gauge("offramp_num_requests_running", "Number of requests in model execution batches.",
                                          labels, registry=r).labels(model_name)
        self.num_requests_waiting = Gauge("offramp_num_requests_waiting", "Number of requests waiting to be processed.",
                                          labels, registry=r).labels(model_name)
        self.kv_cache_usage = Gauge("offramp_kv_cache_usage_ratio", "KV-cache usage: used blocks / all blocks (0 to 1).",
                                    labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("offramp_prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("offramp_generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=r).labels(model_name)
        self.num_preemptions = Counter("offramp_num_preemptions", "Cumulative number of preemptions from the engine.",
                                       labels, registry=r).labels(model_name)
        self.request_success = Counter("offramp_request_success", "Count of finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram("offramp_time_to_first_token_seconds", "Time to first token in seconds.",
                                             labels, buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.inter_token_latency = Histogram("offramp_inter_token_latency_seconds", "Inter-token latency in seconds.",
                                             labels, buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e_request_latency = Histogram("offramp_e2e_request_latency_seconds",
                                             "End-to-end request latency in seconds.", labels,
                                             buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.request_queue_time = Histogram("offramp_request_queue_time_seconds",
                                            "Time spent waiting before first scheduled, in seconds.", labels,
                                            buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(model_name)

        self.exit_tokens = Counter("offramp_exit_tokens", "Generated tokens by the layer they left at (L = they ran "
                                   "every layer; some of them skipped the LM head, see offramp_lm_head_skipped_tokens).",
                                   labels + ["exit_layer"], registry=r)
        self.lm_head_skipped = Counter("offramp_lm_head_skipped_tokens", "Generated tokens answered by an exit head "
                                       "(at any layer, the head after the last one included): the full LM head never "
                                       "ran for them.", labels, registry=r).labels(model_name)
        self.decode_flops = Counter("offramp_decode_flops", "FLOPs spent on generated tokens (exit heads and KV fill "
                                    "included).", labels, registry=r).labels(model_name)
        self.decode_flops_full_depth = Counter("offramp_decode_flops_full_depth", "FLOPs the same tokens would have "
                                               "cost at full depth.", labels, registry=r).labels(model_name)
        self.decode_step_seconds = Histogram("offramp_decode_step_seconds", "Engine step latency by the deepest layer "
                                             "a decode row reached in the step.", labels + ["deepest_layer"],
                                             buckets=STEP_BUCKETS, registry=r)
        self.exit_margin = Histogram("offramp_exit_margin", "Exit-head margin (p1 - p2) at each head evaluation.",
                                     labels + ["exit_layer"], buckets=MARGIN_BUCKETS, registry=r)

        # Every labelled series exists from the start, so dashboards and rate() see zeros, not gaps.
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name, reason)
        for k in self.layers:
            self.exit_tokens.labels(model_name, str(k))
            self.decode_step_seconds.labels(model_name, str(k))
        for k in exit_layers:
            self.exit_margin.labels(model_name, str(k))

    def record_step(self, stats: StepStats) -> None:
        self.set_scheduler_state(stats.num_running, stats.num_waiting, stats.kv_cache_usage)
        self.num_preemptions.inc(stats.num_preemptions)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        for layer, count in collections.Counter(stats.exit_layers).items():
            self.exit_tokens.labels(self.model_name, str(layer)).inc(count)
        self.lm_head_skipped.inc(stats.num_lm_head_skipped)
        for layer, margin in stats.exit_margins:
            self.exit_margin.labels(self.model_name, str(layer)).observe(margin)
        self.decode_flops.inc(stats.decode_flops)
        self.decode_flops_full_depth.inc(stats.decode_flops_full_depth)
        if stats.deepest_layer > 0:
            self.decode_step_seconds.labels(self.model_name, str(stats.deepest_layer)).observe(stats.step_seconds)
        for seconds in stats.time_to_first_tokens:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_latencies:
            self.inter_token_latency.observe(seconds)

    def record_finished(self, stats: FinishedRequestStats) -> None:
        self.request_success.labels(self.model_name, stats.finish_reason).inc()
        self.e2e_request_latency.observe(stats.e2e_latency)
        self.request_queue_time.observe(stats.queue_time)

    def set_scheduler_state(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        self.num_requests_running.set(num_running)
        self.num_requests_waiting.set(num_waiting)
        self.kv_cache_usage.set(kv_cache_usage)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
