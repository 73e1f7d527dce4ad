"""Claims (project/claims.py): one holder at a time per unit, on PostgreSQL advisory locks (the
real stack's coordination database) or file locks; a killed holder's claim is free at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SECRETS

from project.claims import COORDINATION_DB_ENV, check_coordination_database, claim, unit_key


def _contend(unit: str, **kwargs: object) -> list[str]:
    """Two threads claim ``unit``; the first holds it 1 s. The order of events."""
    events: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with claim(unit, poll_seconds=0.1, **kwargs):
            events.append("first in")
            first_in.set()
            time.sleep(1.0)
            events.append("first out")

    def second() -> None:
        first_in.wait()
        with claim(unit, poll_seconds=0.1, **kwargs):
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return events


def test_file_claims_exclude_each_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COORDINATION_DB_ENV, raising=False)
    monkeypatch.setenv("SAEFLOW_CLAIMS_DIR", str(tmp_path))
    assert _contend(unit_key("train", "a")) == ["first in", "first out", "second in"]
    # Other units do not wait on each other.
    with claim(unit_key("train", "a")), claim(unit_key("train", "b")):
        pass


def test_advisory_claims_exclude_each_other_and_die_with_their_holder(
    stack: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", SECRETS["SAEFLOW_PG_PASSWORD"])
    url = stack["coordination"]
    check_coordination_database(url)
    unit = unit_key("train", "advisory")
    assert _contend(unit, database=url) == ["first in", "first out", "second in"]

    # A holder SIGKILLed while it holds the claim: the server drops its session, and the
    # claim with it, so a retry does not wait.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom project.claims import claim\n"
         f"with claim({unit!r}, database={url!r}):\n    print('held', flush=True)\n"
         "    time.sleep(300)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    acquired = threading.Event()

    def waiter() -> None:
        with claim(unit, poll_seconds=0.1, database=url):
            acquired.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not acquired.wait(1.5), "the claim was taken while its holder lived"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert acquired.wait(15), "the claim of a killed holder was not freed"
    thread.join()


def test_a_bad_coordination_database_is_named_without_its_password() -> None:
    with pytest.raises(ValueError, match="must be a PostgreSQL URL") as err:
        check_coordination_database("mysql://me:hunter2@db/x")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ValueError, match="cannot be reached") as err:
        check_coordination_database("postgresql://me:hunter2@127.0.0.1:1/x")
    assert "hunter2" not in str(err.value)
