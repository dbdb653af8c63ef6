"""Speculation stats of the engine reach /metrics: counters by proposer that only move forward, rates as gauges."""

from thrifty.server.metrics import ServerMetrics

BASE = {"num_running": 0, "num_waiting": 0, "kv_blocks_used": 0, "kv_blocks_free": 4, "kv_blocks_total": 4,
        "num_preemptions": 0}


def _sample(metrics: ServerMetrics, name: str, proposer: str) -> float:
    return metrics.registry.get_sample_value(name, {"proposer": proposer})


def test_speculation_stats_are_exported_per_proposer():
    metrics = ServerMetrics()
    stats = {**BASE, "spec_draft_drafts": 3, "spec_draft_draft_tokens": 12, "spec_draft_accepted_tokens": 9,
             "spec_draft_acceptance_rate": 0.75, "spec_draft_mean_accepted_length": 3.0,
             "spec_ngram_drafts": 1, "spec_ngram_draft_tokens": 4, "spec_ngram_accepted_tokens": 0,
             "spec_ngram_acceptance_rate": 0.0, "spec_ngram_mean_accepted_length": 0.0}
    metrics.update_engine_stats(stats)
    metrics.update_engine_stats({**stats, "spec_draft_drafts": 5, "spec_draft_draft_tokens": 20,
                                 "spec_draft_accepted_tokens": 13, "spec_draft_acceptance_rate": 0.65})
    assert _sample(metrics, "thrifty_spec_drafts_total", "draft") == 5
    assert _sample(metrics, "thrifty_spec_draft_tokens_total", "draft") == 20
    assert _sample(metrics, "thrifty_spec_accepted_tokens_total", "draft") == 13
    assert _sample(metrics, "thrifty_spec_acceptance_rate", "draft") == 0.65
    assert _sample(metrics, "thrifty_spec_mean_accepted_length", "draft") == 3.0
    assert _sample(metrics, "thrifty_spec_draft_tokens_total", "ngram") == 4
    assert b'thrifty_spec_acceptance_rate{proposer="ngram"} 0.0' in metrics.render()
