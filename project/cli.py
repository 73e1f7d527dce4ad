"""Command-line plumbing shared by every entry point (train, sweep, evaluate, import_sae): flags
from a config dataclass, exit codes.

Exit codes: 0 done; 2 bad input (a ``ValueError`` raised before the entry point called
:func:`mark_work_started`, or a :class:`BadInputError` at any time); 3 some items of a batch
failed and the others finished (:class:`PartialFailureError`, e.g. a sweep where one SAE
failed); 1 any other failure, including a ``ValueError`` raised once work has started (it is
then a failure of the work, not of the user's input).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

log = logging.getLogger("saeflow")

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_PARTIAL = 3


class BadInputError(ValueError):
    """The user's input is wrong, even if found after work started (exit code 2)."""


class PartialFailureError(RuntimeError):
    """Some items of a batch (SAEs of a sweep, versions of an evaluation) failed while the
    others finished; ``failed`` names them (exit code 3)."""

    def __init__(self, message: str, failed: list[str]) -> None:
        super().__init__(message)
        self.failed = failed


_work_started = False


def mark_work_started() -> None:
    """Call once input validation is over: from here on a ``ValueError`` is a failure of the
    work (exit 1), not bad input (exit 2)."""
    global _work_started
    _work_started = True


def work_started() -> bool:
    return _work_started


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use true or false)")


def parse_int(text: str) -> int:
    """Integers as MLflow may pass them: "4", "4.0", "1e6"."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    return int(value)


def parse_list(text: str, cast: Callable[[str], Any], name: str, kind: str) -> tuple[Any, ...]:
    """Comma-separated values (empty parts skipped), each through ``cast``.

    Raises:
        ValueError: a part ``cast`` rejects, naming it, the list and what was expected
            (``kind``: "number", "integer", ...).
    """
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(cast(part))
        except (ValueError, argparse.ArgumentTypeError):
            article = "an" if kind[:1] in "aeiou" else "a"
            raise ValueError(f"{name}: {part!r} in {text!r} is not {article} {kind}") from None
    return tuple(values)


def parse_optional_list(
    text: str, cast: Callable[[str], Any], name: str, kind: str, off: str = "none"
) -> tuple[Any, ...]:
    """:func:`parse_list`, or ``()`` where ``text`` is empty or ``off`` (``none``, ``auto``):
    an option whose values may be left out."""
    if text.strip().lower() in ("", off):
        return ()
    return parse_list(text, cast, name, f"{kind} (or {off})")


def parse_prefixed_options(extra: list[str], prefix: str = "judge") -> dict[str, str]:
    """``--<prefix>.<option> VALUE`` / ``--<prefix>.<option>=VALUE`` pairs left over by argparse
    (``-P judge.model=NAME`` through ``mlflow run``).

    Raises:
        ValueError: an argument without the prefix, or an option without a value.
    """
    flag = f"--{prefix}."
    out: dict[str, str] = {}
    rest = list(extra)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith(flag):
            raise ValueError(
                f"unexpected argument {arg!r}; {prefix} options look like {flag}model NAME"
            )
        key, eq, value = arg[len(flag) :].partition("=")
        if not eq:
            if not rest:
                raise ValueError(f"{arg} needs a value")
            value = rest.pop(0)
        out[key] = value
    return out


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, config_cls: type, exclude: frozenset[str] = frozenset()
) -> None:
    """One ``--field`` flag per dataclass field, typed from the field's default value."""
    for field in fields(config_cls):
        if field.name in exclude:
            continue
        default = field.default if field.default is not MISSING else field.default_factory()  # type: ignore[misc]
        kind: Callable[[str], Any] = type(default)
        if isinstance(default, bool):
            kind = parse_bool
        elif isinstance(default, int):
            kind = parse_int
        parser.add_argument(f"--{field.name}", type=kind, default=default)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_entry_point(main: Callable[[], None]) -> None:
    """Run ``main`` and exit with the code of what happened (see the module docstring)."""
    global _work_started
    _work_started = False
    setup_logging()
    try:
        main()
    except PartialFailureError as err:
        log.error("partly failed: %s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_PARTIAL)
    except ValueError as err:
        if _work_started and not isinstance(err, BadInputError):
            log.exception("failed after work started: %s", err)
            print(f"error (after work started): {err}", file=sys.stderr)
            sys.exit(EXIT_FAILED)
        log.error("bad input: %s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except Exception as err:  # noqa: BLE001 - the run is already marked FAILED; report and exit
        log.exception("failed: %s", err)
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


def _convert(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered not in {"true", "false", "1", "0", "yes", "no"}:
            raise ValueError(f"{text!r} is not a boolean (use true or false)")
        return lowered in {"true", "1", "yes"}
    if isinstance(default, int):
        value = float(text)
        if not value.is_integer():
            raise ValueError(f"{text!r} is not an integer")
        return int(value)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, tuple):
        return tuple(_convert(p, default[0] if default else "") for p in text.split(",") if p)
    return text


def config_from_overrides(config_cls: type, overrides: dict[str, str], eval_name: str) -> Any:
    """An eval config with string overrides (from the command line) converted by field type."""
    defaults = config_cls()
    names = [f.name for f in fields(config_cls) if f.init]  # init=False fields are derived
    values = {}
    for key, text in overrides.items():
        if key not in names:
            raise ValueError(f"{eval_name} has no config field {key!r}; fields: {', '.join(names)}")
        try:
            values[key] = _convert(text, getattr(defaults, key))
        except ValueError as err:
            raise ValueError(f"{eval_name}.{key}={text!r}: {err}") from None
    return config_cls(**values)
