"""The churn benchmark's summary: its ratios and its verdicts against the issue's goals come from the rows."""

from types import SimpleNamespace

from benchmarks.service_churn import summarize


def rows(churn_p50: float, second_half_threads: int) -> list[dict]:
    out = []
    for phase, n, p50, threads in (("quiet", 4, 3.0, 18), ("steady", 6, 3.4, 36), ("churn", 10, churn_p50, 50),
                                   ("after", 3, 2.9, 29)):
        for i in range(n):
            t = second_half_threads if phase == "churn" and i >= n // 2 else threads
            out.append({"phase": phase, "threads": t, "rss": 290.0, "open": 9, "p50": p50})
    return out


REPORT = {k: 1 for k in ("sessions_created", "sessions_closed", "sessions_expired", "sessions_rolled_back",
                         "sessions_refused_full")}


def test_flat_and_close_is_met(capsys):
    summarize(rows(3.1, 52), SimpleNamespace(started=10, killed=10), REPORT)
    out = capsys.readouterr().out
    assert "churn / quiet 1.03" in out and "(ratio 1.04)" in out
    assert "flat across the churn (second / first half <= 1.2): met" in out and "quiet server: met" in out


def test_a_slow_churn_or_a_thread_leak_is_not_met(capsys):
    summarize(rows(4.5, 80), SimpleNamespace(started=10, killed=10), REPORT)
    out = capsys.readouterr().out
    assert "churn / quiet 1.50" in out
    assert "<= 1.2): NOT met" in out and "quiet server: NOT met" in out
