"""The load test's verdict (bench/load.py) without a server: it reads the engine's real idle line, and each
check fails on what it is there to catch (a test that cannot fail is a defect)."""

from __future__ import annotations

from bench.load import IDLE, KINDS, LEAK_WARNING, Idle, LoadReport, LoadSpec, Outcome, percentile


def idle(blocks: int = 0, held: int = 0) -> Idle:
    return Idle(held, 0, 0, blocks, 100, 10, 50, line=f"engine idle: {held} requests held, {blocks} blocks")


def clean_report() -> LoadReport:
    report = LoadReport(LoadSpec(requests=5))
    for kind in KINDS:
        report.main.add(Outcome(kind, "steady", "ok", 200, tokens=8, seconds=1.0))
    report.main.add(Outcome("chat-stream", "leaver", "left", 200, tokens=3))
    report.main.add(Outcome("chat", "impatient", "hung up", None))
    report.pings = [5.0] * 98 + [150.0] * 2
    report.rss_warm, report.rss_end = 1000 << 20, 1040 << 20
    report.idle_warm = report.idle_end = idle()
    return report


def test_the_parser_reads_the_engine_s_own_line(engine):
    m = IDLE.search("2026-12-01 03:45:40,907 INFO serve.engine.engine: " + engine.idle_summary())
    assert m, engine.idle_summary()
    parsed = Idle(*(int(g) for g in m.groups()), line="")
    assert (parsed.held, parsed.rows, parsed.blocks, parsed.pool) == (0, 0, 0, engine.pool.num_blocks)
    assert parsed.clean


def test_a_clean_run_passes_and_prints_its_figures():
    report = clean_report()
    assert report.problems() == []
    table = report.table()
    assert "| chat-stream | 1 | 1 | 0 | 0 | 0 |" in table and "p99 150 ms" in table and "(+4.00%)" in table
    assert "checks: all passed" in table


def test_each_check_fails_on_what_it_catches():
    cases = {
        "errors for clients that stayed": lambda r: r.main.add(Outcome("generate", "steady", "error", 500, detail="boom")),
        "still holds something after the run": lambda r: setattr(r, "idle_end", idle(blocks=3)),
        "never said it was idle after the warm-up": lambda r: setattr(r, "idle_warm", None),
        "leak warnings": lambda r: setattr(r, "engine_warnings", ["WARNING serve.engine.engine: reclaiming 4 KV blocks"]),
        "/ping p99": lambda r: setattr(r, "pings", [5.0] * 98 + [250.0] * 2),
        "pings failed": lambda r: setattr(r, "ping_failures", ["status 503"]),
        "beyond 5%": lambda r: setattr(r, "rss_end", 1060 << 20),
        "requests within": lambda r: setattr(r.spec, "requests", 50),
        "no completions request answered": lambda r: r.main.outcomes.__setitem__(2, Outcome("completions", "steady", "refused", 429)),
    }
    for expected, spoil in cases.items():
        report = clean_report()
        spoil(report)
        problems = report.problems()
        assert len(problems) == 1 and expected in problems[0], (expected, problems)


def test_leak_warnings_are_found_in_the_log():
    log = ("2026-12-01 03:45:40,907 INFO serve.engine.engine: engine idle: 0 requests held\n"
           "2026-12-01 03:45:41,000 WARNING serve.engine.engine: reclaiming 5 KV blocks of a dropped batch\n"
           "2026-12-01 03:45:52,000 WARNING serve.engine.engine: engine idle: 0 requests held (0 queued), 0 rows, "
           "KV blocks held by rows 5 of 99\n")
    assert [w.split(": ", 1)[1][:10] for w in LEAK_WARNING.findall(log)] == ["reclaiming", "engine idl"]


def test_percentile_is_nearest_rank():
    assert percentile(list(range(1, 101)), 99) == 99 and percentile([3.0], 50) == 3.0
    assert percentile([], 50) != percentile([], 50)  # nan
