"""benchmarks/serve_load.py refuses bad settings before starting anything, and a failed run (a
server that refused to start, a server not reached, most requests failed) ends with one line and
a non-zero status, leaving the previous results in place."""

from __future__ import annotations

import json

import pytest
from test_benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("serve_load")


@pytest.mark.parametrize(
    "option",
    [
        ["--k", "0"],
        ["--concurrency", "0"],
        ["--rounds", "0"],
        ["--requests", "-1"],
        ["--max-duration", "0"],
        ["--configs", "a,b"],
        ["--configs", "32,0"],
    ],
)
def test_bad_settings_are_usage_errors(bench, option, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--url", "http://127.0.0.1:9", *option])
    assert stop.value.code == 2 and option[0] in capsys.readouterr().err


def test_configs_parse_to_batch_sizes(bench, tmp_path):
    assert bench.parse_args(["--url", "http://127.0.0.1:9"]).configs == [32, 1]
    (tmp_path / "meta.json").write_text("{}")
    assert bench.parse_args(["--index", str(tmp_path), "--configs", "8,1"]).configs == [8, 1]
    with pytest.raises(SystemExit):
        bench.parse_args(["--index", str(tmp_path / "nope")])


def _previous(out):
    out.mkdir()
    (out / "serve_load.json").write_text('{"results": "a 10-minute measurement"}')
    (out / "serve_load.md").write_text("| earlier |\n")


def test_an_unreachable_server_fails_and_keeps_the_previous_results(bench, tmp_path, capsys):
    from server_helpers import free_port

    out = tmp_path / "out"
    _previous(out)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    argv = ["--url", url, "--requests", "6", "--concurrency", "2", "--out", str(out)]
    assert bench.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "6 of 6 requests failed" in err[0]
    assert json.loads((out / "serve_load.json").read_text()) == {
        "results": "a 10-minute measurement"
    }
    assert (out / "serve_load.md").read_text() == "| earlier |\n"


def test_more_than_half_failed_is_no_measurement(bench):
    def result(errors, requests=10):
        return bench.LoadResult("x", 1, requests, 2, 1.0, errors, 1.0, 1, 1, 1, None, "count")

    assert bench.failure([result(0), result(5)]) is None  # half: still a measurement
    assert "6 of 10 requests failed" in bench.failure([result(0), result(6)])
    assert "0 of 0 requests failed" in bench.failure([result(0, requests=0)])


def test_a_server_that_refuses_to_start_is_one_line_with_its_reason(bench, tmp_path):
    index = tmp_path / "idx"
    index.mkdir()
    (index / "meta.json").write_text("{}")  # an index directory in name only
    out = tmp_path / "out"
    _previous(out)
    argv = ["--index", str(index), "--requests", "2", "--configs", "1", "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: serve exited with 2: ") and "bad index metadata" in message
    assert (out / "serve_load.md").read_text() == "| earlier |\n"


def test_the_machine_is_recorded_as_every_benchmark_does(bench):
    env = bench.environment()
    assert env["cpu_model"] and env["cpu_count"] >= 1 and len(env["loadavg_1_5_15"]) == 3
    assert "torch" not in env  # the server's torch runs in its own process
