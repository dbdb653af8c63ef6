"""`thrifty bench serve`: dataset handling, statistics, and a whole run against a fake server."""

from __future__ import annotations

import json

import pytest

from tests.server_process import fake_server
from thrifty.bench.serve import RequestResult, load_sharegpt, sample_requests, summarize
from thrifty.cli import main


def conversation(i: int, human: str, gpt: str) -> dict:
    return {"id": str(i), "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def write_sharegpt(path, records: list[dict], cut: int = 0) -> None:
    text = json.dumps(records, indent=2)
    path.write_text(text[:len(text) - cut] if cut else text)


def test_a_truncated_sharegpt_file_yields_its_complete_conversations(tmp_path):
    records = [conversation(i, f"question {i}", f"answer {i}") for i in range(5)]
    records.insert(2, {"id": "x", "conversations": [{"from": "gpt", "value": "no human turn first"}]})
    write_sharegpt(tmp_path / "d.json", records, cut=40)  # the last record is cut in half
    assert load_sharegpt(tmp_path / "d.json") == [(f"question {i}", f"answer {i}") for i in range(4)]


class WordTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * len(text.split())


def test_sampling_filters_like_vllm():
    pairs = [("a b c", "x y z w"),  # prompt under 4 tokens
             ("a b c d", "x y z"),  # reply under 4 tokens
             ("a b c d " * 5, "x y z w " * 10),  # kept: 20 + 40
             ("a b c d " * 30, "x y z w"),  # prompt over 100
             ("a b c d " * 20, "x y z w " * 20)]  # total over 150
    kept = sample_requests(pairs, WordTokenizer(), num=1, seed=0, max_prompt_len=100, max_total_len=150,
                           max_output_len=16)
    assert [(r.prompt_len, r.output_len) for r in kept] == [(20, 16)]
    with pytest.raises(Exception, match="only 1 conversations pass"):
        sample_requests(pairs, WordTokenizer(), num=2, seed=0, max_prompt_len=100, max_total_len=150,
                        max_output_len=None)


def test_summary_figures():
    results = [RequestResult(ok=True, prompt_len=10, max_tokens=5, output_tokens=5, ttft=0.1 * i, latency=0.1 * i + 0.4)
               for i in range(1, 5)] + [RequestResult(ok=False, prompt_len=3, max_tokens=5, error="HTTP 500")]
    s = summarize(results, duration=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (4, 1, ["HTTP 500"])
    assert s["request_throughput"] == 2.0 and s["output_throughput"] == 10.0
    assert s["ttft_ms"]["p50"] == pytest.approx(250) and s["tpot_ms"]["p99"] == pytest.approx(100)


def test_a_whole_run_against_a_server_writes_json_and_plot(tmp_path, capsys):
    dataset = tmp_path / "sharegpt.json"
    write_sharegpt(dataset, [conversation(i, f"Tell me about topic number {i}, please.",
                                          " ".join(["word"] * (5 + i))) for i in range(8)])
    server = fake_server(step_seconds=0.005, log_path=tmp_path / "server.log")
    try:
        assert main(["bench", "serve", "--base-url", server.base_url, "--dataset", str(dataset), "--num-prompts", "4",
                     "--request-rate", "20", "inf", "--output-dir", str(tmp_path / "out")]) == 0
    finally:
        server.stop()
    report = json.loads(next((tmp_path / "out").glob("serve-*.json")).read_text())
    levels = report["servers"]["server"]["levels"]
    assert [lv["request_rate"] for lv in levels] == [20, "inf"]
    assert all(lv["completed"] == 4 and lv["failed"] == 0 and lv["ttft_ms"]["p50"] > 0 for lv in levels)
    assert next((tmp_path / "out").glob("serve-*.png")).stat().st_size > 10_000
    assert "TTFT p50/90/99" in capsys.readouterr().out
