"""`thrifty bench speed --rounds N`: medians over rounds and the per-round thrifty/peer ratios."""

from thrifty.bench.speed import median_result, round_ratios


def _run(prefill: float, decode1: float, rss: float) -> dict:
    return {"prefill": {512: prefill}, "decode": {1: decode1, 16: 4 * decode1}, "peak_rss_mb": rss,
            "rss_loaded_mb": rss - 80, "weights": "auto"}


def test_median_result_takes_each_figures_median_and_the_worst_rss():
    runs = [_run(900, 70, 650), _run(600, 60, 675), _run(700, 82, 655)]
    merged = median_result(runs)
    assert merged["prefill"] == {512: 700} and merged["decode"] == {1: 70, 16: 280}
    assert merged["peak_rss_mb"] == 655 and merged["peak_rss_mb_max"] == 675
    assert merged["rss_loaded_mb"] == 575  # every number is a median, so the breakdown adds up
    assert merged["weights"] == "auto"


def test_round_ratios_pair_the_rounds_and_skip_figures_a_peer_lacks():
    ours, theirs = [_run(900, 70, 0), _run(600, 60, 0)], [_run(300, 140, 0), _run(200, 100, 0)]
    assert round_ratios(ours, theirs, "prefill", 512) == [3.0, 3.0]
    assert round_ratios(ours, theirs, "decode", 1) == [0.5, 0.6]
    for peer in theirs:
        del peer["decode"][16]  # llama.cpp is measured at batch 1 only
    assert round_ratios(ours, theirs, "decode", 16) == []


def test_a_peer_killed_by_a_signal_is_named_as_crashed_with_the_rebuild_hint(monkeypatch):
    import subprocess

    from thrifty.bench import speed

    def crashed(*args, **kwargs):
        return subprocess.CompletedProcess(args, -11, "", "")

    monkeypatch.setattr(speed.subprocess, "run", crashed)
    monkeypatch.setattr(speed, "MODULES", {})  # as if every peer were installed
    skipped = speed._run_system("llama.cpp", {"model": "smollm2-135m"})["skipped"]
    assert skipped.startswith("llama.cpp crashed (SIGSEGV)")
    assert "-DGGML_AMX_INT8=OFF" in skipped and "-DGGML_AVX512=ON" in skipped  # AMX off, the rest kept
    assert speed._run_system("transformers", {"model": "smollm2-135m"})["skipped"] == "transformers crashed (SIGSEGV)"
