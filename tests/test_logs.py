"""birdwatch's log lines as ``birdwatch run 2>&1 | jq`` and people read them: in JSON mode every line the process
writes is one JSON object, a fatal error at start and an unexpected crash included; in console mode a fatal error is
one plain ``birdwatch: error: ...`` line; and third-party (standard library) log lines, warnings and uncaught
exceptions come out formatted like birdwatch's own lines in both modes.

The processes are real (``.venv/bin/birdwatch run``, or a Python process that configures logging as ``birdwatch
run`` does); the bad settings are real files and a real busy port.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from birdwatch.log import configure, format_hint
from process import clean_env, run_cli

KUBECONFIG_OK = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""
# Past the flag checks, so that only what a test sets can stop it.
FINE = ["--prometheus-url", "http://127.0.0.1:9", "--health-address", "off"]
KEYS = {"event", "level", "timestamp", "logger"}  # on every line, birdwatch's own and third-party ones
CONSOLE_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[(debug|info|warning|error|critical) *\] ")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line as a JSON object; fails on the first line that is not one."""
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n--- whole output:\n{text}") from None
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def merged(done: Any) -> str:
    return str(done.stdout) + str(done.stderr)


# --- fatal errors of the real process -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["run", "--no-such-flag"], "--no-such-flag"),
        (["run", "--log-format", "xml"], "xml"),
        (["run", "--prometheus-url", "ftp://x"], "ftp://x"),
        (["run", "--kubeconfig", "{kubeconfig}", *FINE], "{kubeconfig}"),
    ],
    ids=["unknown-flag", "unknown-log-format", "bad-url", "kubeconfig-of-words"],
)
def test_json_mode_every_line_is_json_including_the_fatal_error(args: list[str], says: str, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("just words\n")
    args = [a.replace("{kubeconfig}", str(kubeconfig)) for a in args]
    says = says.replace("{kubeconfig}", str(kubeconfig))
    for extra, env in (([], {}), (["--log-format", "json"], {}), ([], {"BIRDWATCH_LOG_FORMAT": "json"})):
        done = run_cli([*args, *extra], env=env)
        assert done.code == 2, done
        entries = json_lines(merged(done))
        fatal = json_lines(done.stderr)
        assert len(fatal) == 1, done
        assert fatal[0] == entries[-1] or fatal[0] in entries
        assert set(fatal[0]) >= KEYS, fatal
        assert (fatal[0]["level"], fatal[0]["reason"], fatal[0]["exit_code"]) == ("error", "BadConfiguration", 2)
        assert says in fatal[0]["detail"], done
        assert "Traceback" not in merged(done), done


def test_json_mode_the_lines_before_a_fatal_error_are_json_too(tmp_path: Path) -> None:
    """A kubeconfig that parses but cannot be used is found after logging has started: the start-up line and the
    fatal line are both JSON, and nothing else is written."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG_OK.replace("current-context: x", "current-context: nope"))
    done = run_cli(["run", "--kubeconfig", str(kubeconfig), *FINE])
    assert done.code == 2, done
    entries = json_lines(merged(done))
    assert [e["event"] for e in entries] == ["birdwatch starting", "birdwatch cannot run"], done
    assert all(set(e) >= KEYS for e in entries), entries


def test_json_mode_an_unexpected_crash_is_one_json_line_with_its_traceback(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG_OK)
    with socket.socket() as busy:  # the health address is taken: binding it fails once birdwatch is running
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli(
            [
                "run",
                "--kubeconfig",
                str(kubeconfig),
                "--prometheus-url",
                "http://127.0.0.1:9",
                "--health-address",
                f"127.0.0.1:{port}",
            ]
        )
    assert done.code == 1, done
    entries = json_lines(merged(done))
    crash = [e for e in entries if e["event"] == "birdwatch stopped on an unexpected error"]
    assert len(crash) == 1, done
    assert crash[0]["level"] == "critical"
    assert crash[0]["reason"] == "Crashed"
    assert "Traceback (most recent call last)" in crash[0]["exception"]
    assert str(port) in crash[0]["detail"] or "address" in crash[0]["detail"].lower(), crash
    assert entries[0]["event"] == "birdwatch starting"


def test_console_mode_a_fatal_error_is_one_plain_line(tmp_path: Path) -> None:
    for args, env in (
        (["run", "--log-format", "console", "--no-such-flag"], {}),
        (["run", "--no-such-flag"], {"BIRDWATCH_LOG_FORMAT": "console"}),
        (["run", "--log-format=console", "--prometheus-url", "ftp://x"], {}),
    ):
        done = run_cli(args, env=env)
        assert done.code == 2, done
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, done
        assert re.match(r"birdwatch( run)?: error: ", lines[0]), done
        assert done.stdout == "", done


def test_the_format_of_a_fatal_error_is_found_before_the_arguments_parse() -> None:
    assert format_hint([], {}) == "json"
    assert format_hint(["run", "--log-format", "console", "--bad"], {}) == "console"
    assert format_hint(["run", "--log-format=console"], {"BIRDWATCH_LOG_FORMAT": "json"}) == "console"
    assert format_hint(["run"], {"BIRDWATCH_LOG_FORMAT": "console"}) == "console"
    assert format_hint(["run", "--log-format", "xml"], {"BIRDWATCH_LOG_FORMAT": "console"}) == "console"
    assert format_hint(["run", "--log-format", "xml"], {}) == "json"
    assert format_hint(["run", "--", "--log-format", "console"], {}) == "json"


# --- third-party lines --------------------------------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, list[str]]]:
    """``configure`` into a buffer for the test (formats appended by the test), restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        yield stream, []
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def test_third_party_lines_are_formatted_like_birdwatchs_own_in_json_mode(
    captured: tuple[io.StringIO, list[str]],
) -> None:
    stream, _ = captured
    configure(fmt="json", level="info", stream=stream)
    structlog.configure(cache_logger_on_first_use=False)
    structlog.get_logger("birdwatch.runner").info("own line", detail="some text")
    logging.getLogger("aiohttp.client").warning("third-party %s", "line")
    try:
        raise ValueError("broken")
    except ValueError:
        logging.getLogger("asyncio").exception("third-party failure")
    logging.getLogger("kubernetes_asyncio").debug("not shown: third-party debug stays out")
    own, third, failure = json_lines(stream.getvalue())
    assert set(own) == KEYS | {"detail"}
    assert set(third) == KEYS
    assert (own["logger"], own["level"], own["event"]) == ("birdwatch.runner", "info", "own line")
    assert (third["logger"], third["level"], third["event"]) == ("aiohttp.client", "warning", "third-party line")
    assert own["timestamp"].endswith("Z")
    assert third["timestamp"].endswith("Z")
    assert len(own["timestamp"]) == len(third["timestamp"])
    # The traceback is text inside the object, as for birdwatch's own lines, not a repr of the exc_info tuple.
    assert failure["exception"].startswith("Traceback (most recent call last)")
    assert "ValueError: broken" in failure["exception"]


def test_third_party_lines_are_formatted_like_birdwatchs_own_in_console_mode(
    captured: tuple[io.StringIO, list[str]],
) -> None:
    stream, _ = captured
    configure(fmt="console", level="debug", stream=stream)
    structlog.configure(cache_logger_on_first_use=False)
    structlog.get_logger("birdwatch.runner").debug("own line", birdwatch="aleph")
    logging.getLogger("aiohttp.client").warning("third-party %s", "line")
    own, third = stream.getvalue().splitlines()
    assert CONSOLE_LINE.match(own), own
    assert CONSOLE_LINE.match(third), third
    assert "[birdwatch.runner]" in own
    assert "birdwatch=aleph" in own
    assert "third-party line" in third
    assert "[aiohttp.client]" in third


PROCESS = """
import logging, threading, warnings
from birdwatch.log import capture_process_output, configure
configure(fmt="{fmt}", level="info")
capture_process_output()
logging.getLogger("aiohttp.access").warning("a third-party line")
warnings.warn("a deprecated thing", DeprecationWarning, stacklevel=1)
thread = threading.Thread(target=lambda: 1 / 0, name="worker")
thread.start()
thread.join()
raise RuntimeError("an uncaught exception")
"""


def test_warnings_and_uncaught_exceptions_of_the_process_are_log_lines() -> None:
    """What Python itself would print to stderr as plain text: a warning, an exception in a thread and one that
    ends the process. In JSON mode each is one JSON line; in console mode each starts like birdwatch's lines."""
    for fmt in ("json", "console"):
        done = subprocess.run(
            [sys.executable, "-W", "always", "-c", PROCESS.format(fmt=fmt)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 1, done
        if fmt == "json":
            entries = json_lines(done.stdout + done.stderr)
            assert [(e["logger"], e["level"]) for e in entries] == [
                ("aiohttp.access", "warning"),
                ("py.warnings", "warning"),
                ("birdwatch.crash", "error"),
                ("birdwatch.crash", "critical"),
            ], entries
            assert "a deprecated thing" in entries[1]["event"]
            assert "ZeroDivisionError" in entries[2]["exception"]
            assert "worker" in entries[2]["event"]
            assert "RuntimeError: an uncaught exception" in entries[3]["exception"]
        else:
            starts = [line for line in done.stdout.splitlines() if CONSOLE_LINE.match(line)]
            assert len(starts) == 4, done.stdout + done.stderr
            assert done.stderr == "", done.stderr
