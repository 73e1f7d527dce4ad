"""Claims on units of work: at most one process at a time, on any machine, works on a unit.

A study spread over workers (``analysis/cluster.py``), or two studies started at once against
one tracking server, must train each SAE once and register each version once. MLflow's
"search, then create" cannot promise that: two workers both find nothing and both train. A
claim can: whoever holds the unit's claim checks whether the unit is done (a FINISHED run of
the same config), resumes what a dead holder left, or does it; the others wait, then find it
done.

Two backends, chosen by where the work runs:

- **PostgreSQL advisory locks** (the coordination database, ``$SAEFLOW_COORDINATION_DB``,
  which ``scripts/server.sh`` prints; the password from ``$PGPASSWORD`` as libpq reads it): a
  session lock on a 64-bit key of the unit. A holder that dies loses its session and with it
  the claim: at once when its process is killed, within about a minute (TCP keepalives) when
  its machine vanishes. A holder whose session is lost while it lives (the database
  restarted) takes the claim again before registering and checks whether the unit was done
  meanwhile (:meth:`Claim.confirm`).
- **File locks** (``fcntl``) in ``$SAEFLOW_CLAIMS_DIR`` (default ``$SAEFLOW_CACHE_DIR/claims``, ``~/.cache/saeflow/claims``)
  when no coordination database is configured: processes of one machine only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COORDINATION_DB_ENV = "SAEFLOW_COORDINATION_DB"
CLAIMS_DIR_ENV = "SAEFLOW_CLAIMS_DIR"


def unit_key(*parts: str) -> str:
    """A unit's name: its kind and a digest of everything that makes it that unit."""
    kind, *rest = parts
    return f"{kind}:{hashlib.sha256(chr(0).join(rest).encode()).hexdigest()[:24]}"


def _lock_id(unit: str) -> int:
    """The unit's signed 64-bit advisory lock key."""
    return int.from_bytes(hashlib.sha256(unit.encode()).digest()[:8], "big", signed=True)


def coordination_database() -> str | None:
    """The coordination database URL from the environment, or None (file locks)."""
    url = os.environ.get(COORDINATION_DB_ENV, "").strip()
    return url or None


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://...`` (SQLAlchemy's spelling) as libpq takes it."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise ValueError(
            f"{COORDINATION_DB_ENV}={without_password(url)!r} must be a PostgreSQL URL, "
            "postgresql+psycopg://USER@HOST:PORT/DB (password in PGPASSWORD)"
        )
    return f"postgresql://{rest}"


def without_password(url: str) -> str:
    """``url`` with its password shown as ``***``, for messages, logs and tags."""
    head, sep, tail = url.partition("://")
    user, at, host = tail.rpartition("@")
    if at and ":" in user:
        return f"{head}{sep}{user.split(':', 1)[0]}:***@{host}"
    return url


def check_coordination_database(url: str) -> None:
    """Connect once; ValueError naming the URL (never its password) if that fails."""
    import psycopg

    try:
        with psycopg.connect(libpq_url(url), connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as err:
        raise ValueError(
            f"coordination database {without_password(url)!r} cannot be reached: {err}"
        ) from err


class Claim:
    """A held claim. :meth:`confirm` before an irreversible step (registering a version)."""

    def confirm(self) -> bool:
        """True if the claim was held throughout; False if it was lost (the coordination
        database restarted) and has been taken again, so that what the unit found at the
        start must be checked again: another worker may have done it meanwhile."""
        return True


class _AdvisoryClaim(Claim):
    def __init__(self, unit: str, url: str, poll_seconds: float) -> None:
        self.unit, self.url, self.poll_seconds = unit, url, poll_seconds
        self.key = _lock_id(unit)
        self.conn: Any = None

    def acquire(self) -> None:
        import psycopg

        # keepalives on both ends: the server notices a vanished holder within about a
        # minute and frees its claim (the kernel default would be two hours).
        self.conn = psycopg.connect(
            libpq_url(self.url),
            autocommit=True,
            connect_timeout=30,
            keepalives=1,
            keepalives_idle=20,
            keepalives_interval=5,
            keepalives_count=4,
            options="-c tcp_keepalives_idle=20 -c tcp_keepalives_interval=5 "
            "-c tcp_keepalives_count=4",
        )
        waited = False
        while not self.conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]:
            if not waited:
                log.info("unit %s is claimed by another worker: waiting", self.unit)
                waited = True
            time.sleep(self.poll_seconds)

    def confirm(self) -> bool:
        import psycopg

        try:
            self.conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            log.warning(
                "the claim on unit %s was lost with its session: taking it again", self.unit
            )
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            for attempt in range(30):  # the database may still be coming back
                try:
                    self.acquire()
                    return False
                except psycopg.OperationalError:
                    time.sleep(min(2.0 * (attempt + 1), 10.0))
            raise

    def release(self) -> None:
        import psycopg

        if self.conn is None:
            return
        # A lost connection has released the lock already.
        with contextlib.suppress(psycopg.Error):
            self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        self.conn.close()


@contextmanager
def claim(unit: str, *, poll_seconds: float = 2.0, database: str | None = None) -> Iterator[Claim]:
    """Hold ``unit``'s claim for the body of the ``with``; waits while another process holds
    it (logging who waits for what once). ``database``: a PostgreSQL URL (default
    :func:`coordination_database`); without one, a file lock on this machine."""
    url = database or coordination_database()
    if url:
        held = _AdvisoryClaim(unit, url, poll_seconds)
        try:
            held.acquire()
            yield held
        finally:
            held.release()
    else:
        with _file_lock(unit):
            yield Claim()


@contextmanager
def _file_lock(unit: str) -> Iterator[None]:
    cache = os.environ.get("SAEFLOW_CACHE_DIR") or Path.home() / ".cache" / "saeflow"
    folder = Path(os.environ.get(CLAIMS_DIR_ENV) or Path(cache) / "claims").expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (unit.replace(":", "-").replace("/", "_") + ".lock")
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("unit %s is claimed by another process: waiting", unit)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
