"""The README's recipes, run as written, so they cannot drift from what the repository does.

"Against the sandbox, by hand" is run by bash, line for line: ``make sandbox-up``, ``. .sandbox/env``, kubectl, then
``birdwatch run``, which must find the sandbox from what ``.sandbox/env`` exported (no kubeconfig of the person's
own to fall back on: HOME is empty) and become ready. The sandbox is one of its own (``BIRDWATCH_SANDBOX``), in a
folder that mirrors the repository through links, so a person's sandbox in the same checkout is left alone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from birdwatch_sandbox.envtest.assets import REPO, Assets
from birdwatch_sandbox.envtest.controlplane import free_port

README = REPO / "README.md"
# What `make sandbox-up` and birdwatch need from the checkout; everything else stays out of the mirror.
MIRRORED = ("Makefile", "setup.cfg", "pyproject.toml", "src", "sandbox", "tests", "hack", "deploy")


def recipe(heading: str) -> str:
    """The first ```sh block after the line that starts with ``heading``."""
    text = README.read_text()
    at = text.index(heading)
    found = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    assert found, f"no ```sh block after {heading!r} in README.md"
    return found.group(1)


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the command: state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def test_the_sandbox_recipe_runs_as_written(tmp_path: Path, assets: Assets) -> None:
    script = recipe("Against the sandbox, by hand")
    assert "birdwatch run" in script.splitlines()[-1], "the recipe no longer ends by running birdwatch"
    mirror = tmp_path / "checkout"
    mirror.mkdir()
    for name in MIRRORED:
        (mirror / name).symlink_to(REPO / name)
    # The session's virtual env, already installed: its parts linked, and a fresh stamp, so make does not try to
    # build it again through the links.
    venv = mirror / ".venv"
    venv.mkdir()
    for part in (REPO / ".venv").iterdir():
        if part.name != ".installed":
            (venv / part.name).symlink_to(part)
    (venv / ".installed").touch()
    home = tmp_path / "home"
    home.mkdir()
    health = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KUBECONFIG", "PROMETHEUS_", "BIRDWATCH_", "KUBECTL", "SLACK_"))
    }
    env.update(
        HOME=str(home),
        BIRDWATCH_SANDBOX=str(mirror / ".sandbox"),
        # The binaries stay where they were built (HOME is empty here), and birdwatch's port is a free one.
        BIRDWATCH_CACHE=str(assets.folder.parent),
        BIRDWATCH_HEALTH_ADDRESS=f"127.0.0.1:{health}",
    )
    started = time.monotonic()
    shell = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=mirror,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(shell.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 120
        ready = False
        while not ready:
            assert shell.poll() is None, "the recipe stopped early:\n" + "".join(lines)
            assert time.monotonic() < deadline, "birdwatch never became ready:\n" + "".join(lines)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2) as answer:
                    ready = answer.status == 200
            except OSError:
                time.sleep(0.2)
        print(f"the recipe reached a ready birdwatch in {time.monotonic() - started:.1f}s")
        out = "".join(lines)
        # kubectl listed the CRDs the sandbox installed; birdwatch listed (zero) BirdWatches on it.
        assert "birdwatches.otomato.link" in out, out
        assert "virtualservices.networking.istio.io" in out, out
        assert re.search(r"listed birdwatches .*count=0", out), out
        # Stopped as a person stops it, so the shell sees how birdwatch exits.
        for pid in session_pids(shell.pid):
            if b"birdwatch" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
    finally:
        try:
            shell.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
        subprocess.run(
            [str(REPO / ".venv" / "bin" / "birdwatch-sandbox"), "down"],
            cwd=mirror,
            env=env,
            check=False,
            capture_output=True,
        )
    assert shell.returncode == 0, "birdwatch did not stop cleanly on SIGTERM:\n" + "".join(lines)


@pytest.mark.parametrize("name", ["KUBECONFIG", "PROMETHEUS_URL", "KUBECTL", "BIRDWATCH_PROM_TARGETS"])
def test_the_sandbox_env_file_exports_what_it_sets(tmp_path: Path, name: str) -> None:
    from birdwatch_sandbox.envtest.sandbox import env_file, read_env

    path = tmp_path / "env"
    path.write_text(env_file({name: "/a path/with spaces", "OTHER": "x"}))
    # Sourced, then seen by a child process (what `. .sandbox/env` followed by `birdwatch run` relies on).
    seen = subprocess.run(
        ["bash", "-c", f'. "{path}" && python3 -c "import os; print(os.environ[\'{name}\'])"'],
        env={k: v for k, v in os.environ.items() if k != name},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert seen == "/a path/with spaces\n"
    assert read_env(path) == {name: "/a path/with spaces", "OTHER": "x"}
