"""Prometheus metrics of the server: latencies, queue depth, KV blocks, tokens, outcomes."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from thrifty.engine.outputs import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bucket edges as vLLM uses them, so dashboards built for vLLM read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)

# Keys of LLMEngine.stats() from thrifty.spec.speculator: spec_<proposer>_<what>.
_SPEC_KEY = re.compile(r"spec_(\w+?)_(drafts|draft_tokens|accepted_tokens|acceptance_rate|mean_accepted_length)")


class ServerMetrics:
    """One registry per server (not the global one), so several apps can live in one process.

    The engine thread calls `observe` with each step's outputs and `update_engine_stats` after
    each step; prometheus_client's metrics are thread-safe, and /metrics reads the registry.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("thrifty_time_to_first_token_seconds",
                              "Time from arrival to the first generated token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("thrifty_inter_token_latency_seconds",
                             "Time between successive output steps of a request", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("thrifty_e2e_request_latency_seconds",
                             "Time from arrival to the last token", buckets=E2E_BUCKETS, registry=r)
        self.running = Gauge("thrifty_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("thrifty_num_requests_waiting", "Sequences waiting for a slot", registry=r)
        self.kv_used = Gauge("thrifty_kv_blocks_used", "KV cache blocks held by sequences", registry=r)
        self.kv_free = Gauge("thrifty_kv_blocks_free", "KV cache blocks free (some may hold a cached prefix)",
                             registry=r)
        self.kv_total = Gauge("thrifty_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.prompt_tokens = Counter("thrifty_prompt_tokens", "Prompt tokens of requests that started", registry=r)
        self.cached_prompt_tokens = Counter("thrifty_prompt_tokens_cached",
                                            "Prompt tokens served from the prefix cache", registry=r)
        self.generation_tokens = Counter("thrifty_generation_tokens", "Generated tokens", registry=r)
        self.preemptions = Counter("thrifty_num_preemptions", "Sequences preempted for lack of KV blocks",
                                   registry=r)
        self.finished = Counter("thrifty_requests_finished", "Finished requests by the finish reason of their "
                                "first choice (abort: the client went away)", ["finish_reason"], registry=r)
        self.rejected = Counter("thrifty_requests_rejected", "Requests refused before reaching the engine",
                                ["reason"], registry=r)
        self.spec_drafts = Counter("thrifty_spec_drafts", "Speculative drafts verified, by proposer",
                                   ["proposer"], registry=r)
        self.spec_draft_tokens = Counter("thrifty_spec_draft_tokens", "Speculative tokens proposed, by proposer",
                                         ["proposer"], registry=r)
        self.spec_accepted_tokens = Counter("thrifty_spec_accepted_tokens",
                                            "Speculative tokens the target accepted, by proposer", ["proposer"],
                                            registry=r)
        self.spec_acceptance = Gauge("thrifty_spec_acceptance_rate",
                                     "Accepted / proposed speculative tokens since start, by proposer",
                                     ["proposer"], registry=r)
        self.spec_accepted_length = Gauge("thrifty_spec_mean_accepted_length",
                                          "Accepted tokens per draft since start, by proposer", ["proposer"], registry=r)
        self._last_token_time: dict[str, float] = {}
        self._preemptions_seen = 0
        self._spec_seen: dict[tuple[str, str], float] = {}

    def observe(self, output: RequestOutput, now: float) -> None:
        """Account one output of one request (engine thread). `now` is on the time.monotonic clock."""
        new_tokens = sum(len(c.delta_token_ids) for c in output.outputs)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            last = self._last_token_time.get(output.request_id)
            if last is None:
                self.prompt_tokens.inc(len(output.prompt_token_ids))
                self.cached_prompt_tokens.inc(output.num_cached_prompt_tokens)
                first = output.metrics.first_token_time or now
                self.ttft.observe(first - output.metrics.arrival_time)
            else:
                self.itl.observe(now - last)
            self._last_token_time[output.request_id] = now
        if output.finished:
            self._last_token_time.pop(output.request_id, None)
            self.e2e.observe((output.metrics.finished_time or now) - output.metrics.arrival_time)
            self.finished.labels(output.outputs[0].finish_reason or "stop").inc()

    def observe_abort(self, request_id: str) -> None:
        self._last_token_time.pop(request_id, None)
        self.finished.labels("abort").inc()

    def update_engine_stats(self, stats: dict[str, float]) -> None:
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_used.set(stats["kv_blocks_used"])
        self.kv_free.set(stats["kv_blocks_free"])
        self.kv_total.set(stats["kv_blocks_total"])
        # The engine keeps a running total; a Counter only moves forward, so add the difference.
        self.preemptions.inc(max(0, stats["num_preemptions"] - self._preemptions_seen))
        self._preemptions_seen = max(self._preemptions_seen, stats["num_preemptions"])
        self._update_speculation(stats)

    def _update_speculation(self, stats: dict[str, float]) -> None:
        counters = {"drafts": self.spec_drafts, "draft_tokens": self.spec_draft_tokens,
                    "accepted_tokens": self.spec_accepted_tokens}
        for key, value in stats.items():
            match = _SPEC_KEY.fullmatch(key)
            if match is None:
                continue
            proposer, what = match.groups()
            if what in counters:
                seen = self._spec_seen.get((proposer, what), 0)
                counters[what].labels(proposer).inc(max(0, value - seen))
                self._spec_seen[(proposer, what)] = max(seen, value)
            elif what == "acceptance_rate":
                self.spec_acceptance.labels(proposer).set(value)
            else:
                self.spec_accepted_length.labels(proposer).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
