"""/metrics: every series present before traffic, vLLM's buckets, and counts that add up after it."""

from server.engine.stats import FinishedRequestStats, StepStats
from server.metrics import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, Metrics
from tests.api.helpers import metric_values, sse_events

SERIES = ["offramp_num_requests_running", "offramp_num_requests_waiting", "offramp_kv_cache_usage_ratio",
          "offramp_prompt_tokens_total", "offramp_generation_tokens_total", "offramp_request_success_total",
          "offramp_num_preemptions_total", "offramp_time_to_first_token_seconds_count",
          "offramp_inter_token_latency_seconds_count", "offramp_e2e_request_latency_seconds_count",
          "offramp_request_queue_time_seconds_count", "offramp_exit_tokens_total", "offramp_decode_flops_total",
          "offramp_decode_flops_full_depth_total", "offramp_decode_step_seconds_count", "offramp_exit_margin_count"]


async def scrape(client) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_every_series_exists_before_traffic(client):
    text = await scrape(client)
    for name in SERIES:
        assert metric_values(text, name), name
    assert set(metric_values(text, "offramp_exit_tokens_total")) == {
        f'{{exit_layer="{k}",model_name="tiny"}}' for k in (2, 4, 6)}
    assert set(metric_values(text, "offramp_request_success_total")) == {
        f'{{finished_reason="{r}",model_name="tiny"}}' for r in ("abort", "length", "stop")}
    assert len(metric_values(text, "offramp_exit_margin_count")) == 2  # one per head
    assert "_created" not in text


def test_buckets_are_vllms():
    text = Metrics("m", [3], 8, process_metrics=False).exposition().decode()
    for name, buckets in [("offramp_time_to_first_token_seconds", TTFT_BUCKETS),
                          ("offramp_inter_token_latency_seconds", ITL_BUCKETS),
                          ("offramp_e2e_request_latency_seconds", REQUEST_LATENCY_BUCKETS),
                          ("offramp_request_queue_time_seconds", REQUEST_LATENCY_BUCKETS)]:
        les = [label.split('le="')[1].split('"')[0] for label in metric_values(text, name + "_bucket")]
        assert les == [str(float(b)) for b in buckets] + ["+Inf"], name
    assert TTFT_BUCKETS[:3] == [0.001, 0.005, 0.01] and TTFT_BUCKETS[-1] == 2560.0
    assert REQUEST_LATENCY_BUCKETS[0] == 0.3 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0


def test_observer_turns_stats_into_series():
    metrics = Metrics("m", [3], 8, process_metrics=False)
    metrics.record_step(StepStats(num_running=2, num_waiting=1, kv_cache_usage=0.25, num_preemptions=1,
                                  num_prompt_tokens=7, num_generation_tokens=3, step_seconds=0.004, deepest_layer=8,
                                  exit_layers=[3, 8, 3], exit_margins=[(3, 0.7), (3, 0.1)], decode_flops=30.0,
                                  decode_flops_full_depth=50.0, time_to_first_tokens=[0.02],
                                  inter_token_latencies=[0.01, 0.011]))
    metrics.record_finished(FinishedRequestStats("stop", e2e_latency=0.9, queue_time=0.05, num_prompt_tokens=7,
                                                 num_generation_tokens=3))
    text = metrics.exposition().decode()
    label = '{model_name="m"}'
    assert metric_values(text, "offramp_num_requests_running")[label] == 2
    assert metric_values(text, "offramp_kv_cache_usage_ratio")[label] == 0.25
    assert metric_values(text, "offramp_num_preemptions_total")[label] == 1
    assert metric_values(text, "offramp_prompt_tokens_total")[label] == 7
    assert metric_values(text, "offramp_exit_tokens_total") == {'{exit_layer="3",model_name="m"}': 2,
                                                               '{exit_layer="8",model_name="m"}': 1}
    assert metric_values(text, "offramp_exit_margin_count") == {'{exit_layer="3",model_name="m"}': 2}
    assert metric_values(text, "offramp_decode_step_seconds_count")['{deepest_layer="8",model_name="m"}'] == 1
    assert metric_values(text, "offramp_inter_token_latency_seconds_count")[label] == 2
    assert metric_values(text, "offramp_request_success_total")['{finished_reason="stop",model_name="m"}'] == 1


async def test_counts_add_up_after_traffic(client):
    usages = []
    for body in [dict(max_tokens=12, exit_epsilon=0.9), dict(max_tokens=7, n=2), dict(max_tokens=5, early_exit=False),
                 dict(max_tokens=9, stream=True, stream_options={"include_usage": True})]:
        response = await client.post("/v1/completions", json={"prompt": "the cat sat", "temperature": 0,
                                                               "ignore_eos": True, **body})
        assert response.status_code == 200
        if body.get("stream"):
            usages.append(sse_events(response.text)[-2]["usage"])
        else:
            usages.append(response.json()["usage"])
    text = await scrape(client)
    label = '{model_name="tiny"}'
    generated = metric_values(text, "offramp_generation_tokens_total")[label]
    assert generated == sum(u["completion_tokens"] for u in usages) == 12 + 14 + 5 + 9
    assert sum(metric_values(text, "offramp_exit_tokens_total").values()) == generated
    # prefill tokens computed: each of the n=2 sequences computes the prompt once
    prompt_len = usages[0]["prompt_tokens"]
    assert metric_values(text, "offramp_prompt_tokens_total")[label] == 5 * prompt_len
    assert metric_values(text, "offramp_request_success_total")['{finished_reason="length",model_name="tiny"}'] == 4
    assert metric_values(text, "offramp_e2e_request_latency_seconds_count")[label] == 4
    assert metric_values(text, "offramp_time_to_first_token_seconds_count")[label] == 4
    flops = metric_values(text, "offramp_decode_flops_total")[label]
    full = metric_values(text, "offramp_decode_flops_full_depth_total")[label]
    saved = [u["exit"]["compute_saved"] for u in usages]
    assert 0 < flops < full and min(saved) <= 1 - flops / full <= max(saved)
    assert metric_values(text, "offramp_exit_margin_count")['{exit_layer="2",model_name="tiny"}'] > 0
    assert sum(metric_values(text, "offramp_decode_step_seconds_count").values()) > 0
    assert metric_values(text, "offramp_kv_cache_usage_ratio")[label] == 0.0
    assert metric_values(text, "offramp_num_requests_running")[label] == 0.0
