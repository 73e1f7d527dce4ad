"""Every speed figure of issue 19 in one table, each a ratio against its reference measured in the
same run.

    .venv/bin/python -m bench [--sections training,sweep,harvest,generation,selection,rating,
        analyze] [--quick] [--json bench.json] [--readme README.md]

Sections (each a module of bench/ with a ``measure`` function returning table rows):

- ``training``: the six architectures against SAELens 6 on identical SmolLM2 layer-10
  activations (d_in 576, d_sae 4608, batch 4096; k 32/64/128 for the TopK family, L0 64 for
  the L1 family), the same steps on both sides, final held-out NMSE and L0 beside the
  throughput (``bench_training.py``);
- ``sweep``: a sweep of N SAEs against one harvest plus N single trainings (``bench_sweep.py``);
- ``harvest``: saeflow's harvest against SAELens' Hugging Face path on the same tokens
  (``bench_harvest.py``);
- ``generation``: steered, sampled generation against the LM's own batched decode, and batched
  against one prompt at a time (``bench_generation.py``);
- ``selection``: per-latent output score and DTC batched against the direct computation
  (``bench_selection.py``);
- ``rating``: the offline judge batched against one question at a time (``bench_rating.py``);
- ``analyze``: ``analyze`` over a synthetic store of ~5,000 runs against the 10-second budget
  (``bench_analyze.py``).

The table is printed as Markdown with the machine, torch version, date and the load average
before and after each section (a busy machine makes every wall time an upper bound);
``--readme`` replaces the README's table between its two markers with it. ``--quick`` shrinks
every section (a smoke run: its figures are not the issue's). A section that fails is reported
in the table and makes the command exit 1 after the others have run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.figures import Figure

README_START = "<!-- bench-table:start (python -m bench --readme README.md) -->"
README_END = "<!-- bench-table:end -->"


def _training(quick: bool) -> list[Figure]:
    from bench import bench_training

    if quick:
        return bench_training.figures(
            bench_training.main(
                [
                    "--gaussian",
                    "--d-in",
                    "64",
                    "--expansion",
                    "4",
                    "--batch",
                    "256",
                    "--steps",
                    "4",
                    "--warmup",
                    "1",
                    "--n-tokens",
                    "4096",
                    "--ks",
                    "8",
                    "--l1-targets",
                    "8",
                ]
            )  # fmt: skip
        )
    return bench_training.measure()


def _sweep(quick: bool) -> list[Figure]:
    from bench import bench_sweep

    if quick:
        return bench_sweep.measure(n_saes=2, n_tokens=4096, training_tokens=8192)
    # Ten SAEs of 32 steps of 2048 on 16k harvested tokens: about 10 minutes here.
    return bench_sweep.measure(n_saes=10, n_tokens=16_384, training_tokens=65_536)


def _harvest(quick: bool) -> list[Figure]:
    from bench import bench_harvest

    return bench_harvest.measure(n_tokens=2048 if quick else 8192)


def _generation(quick: bool) -> list[Figure]:
    from bench import bench_generation

    if quick:
        return bench_generation.measure(n_prompts=4, new_tokens=4, batch_size=4)
    return bench_generation.measure()


def _selection(quick: bool) -> list[Figure]:
    from bench import bench_selection

    return bench_selection.measure(n_latents=2 if quick else 16)


def _rating(quick: bool) -> list[Figure]:
    from bench import bench_rating

    return bench_rating.measure(rows=4, new_tokens=4) if quick else bench_rating.measure()


def _analyze(quick: bool) -> list[Figure]:
    from bench import bench_analyze

    return bench_analyze.measure(repeat=1 if quick else 2)


SECTIONS: dict[str, Callable[[bool], list[Figure]]] = {
    "training": _training,
    "sweep": _sweep,
    "harvest": _harvest,
    "generation": _generation,
    "selection": _selection,
    "rating": _rating,
    "analyze": _analyze,
}


def parse_sections(value: str) -> list[str]:
    """The sections named in ``value`` (comma-separated; ``all``: every one), in table order."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise ValueError(
            f"--sections {value!r}: unknown {unknown or 'empty'}; valid: all or any of "
            f"{', '.join(SECTIONS)}"
        )
    return [s for s in SECTIONS if s in names]


def machine_line() -> str:
    """The CPU model, core count, memory, torch version and threads, for the table's header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{memory}, {gpu}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _met(figure: Figure) -> str:
    if figure.met is None:
        return "–"
    return "yes" if figure.met else "**no**"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a bare | would end the cell)."""
    return text.replace("|", "\\|")


def render_table(
    figures: Sequence[Figure], failures: dict[str, str], loads: dict[str, tuple[float, float]]
) -> str:
    """The Markdown table: one row per figure; a failed section is a row saying why."""
    lines = [
        "| section | what | saeflow | reference | unit | ratio | target | met | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        target = "–" if f.target is None else f"≥ {f.target:g}×"
        lines.append(
            f"| {f.section} | {_cell(f.what)} | {_number(f.saeflow)} | {_number(f.reference)} "
            f"({_cell(f.reference_name)}) | {f.unit} | {f.ratio:.2f}× | {target} | {_met(f)} | "
            f"{_cell(f.note)} |"
        )
    for section, error in failures.items():
        lines.append(f"| {section} | failed: {_cell(error)} | | | | | | **no** | |")
    if loads:
        load_text = "; ".join(f"{s} {a:.1f} → {b:.1f}" for s, (a, b) in loads.items())
        lines.append("")
        lines.append(f"Load average (1 min) before → after each section: {load_text}.")
    return "\n".join(lines)


def replace_between_markers(text: str, table: str) -> str:
    """``text`` with what lies between :data:`README_START` and :data:`README_END` replaced by
    ``table``.

    Raises:
        ValueError: the markers are missing, repeated or out of order (nothing is written).
    """
    starts, ends = text.count(README_START), text.count(README_END)
    if starts != 1 or ends != 1 or text.index(README_START) > text.index(README_END):
        raise ValueError(
            f"the README needs exactly one {README_START!r} followed by one {README_END!r} "
            f"(found {starts} and {ends})"
        )
    head, rest = text.split(README_START)
    _old, tail = rest.split(README_END)
    return f"{head}{README_START}\n{table}\n{README_END}{tail}"


def write_json(
    path: Path,
    header: str,
    figures: Sequence[Figure],
    failures: dict[str, str],
    loads: dict[str, tuple[float, float]],
) -> None:
    payload = {
        "header": header,
        "figures": [f.as_dict() for f in figures],
        "failures": failures,
        "loads": loads,
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")


def run_sections(
    names: Sequence[str], quick: bool, json_path: Path | None = None
) -> tuple[list[Figure], dict[str, str], dict[str, tuple[float, float]]]:
    """Each section in turn; a failing one is recorded (its traceback logged), not raised.
    With ``json_path``, the figures so far are written there after every section (a run cut
    short keeps what it measured)."""
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    loads: dict[str, tuple[float, float]] = {}
    for name in names:
        before = os.getloadavg()[0]
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            rows = SECTIONS[name](quick)
        except Exception as err:  # noqa: BLE001 - one section's failure must not hide the rest
            traceback.print_exc()
            failures[name] = f"{type(err).__name__}: {err}"[:300]
        else:
            figures.extend(rows)
            for row in rows:
                print(f"   {row.what}: {row.ratio:.2f}x ({row.note})", flush=True)
        loads[name] = (before, os.getloadavg()[0])
        print(f"   {name} took {time.perf_counter() - started:.0f} s", flush=True)
        if json_path is not None:
            write_json(json_path, f"partial: sections {list(loads)}", figures, failures, loads)
    return figures, failures, loads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="all")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--readme", type=Path, help="replace this README's benchmark table")
    args = parser.parse_args(argv)
    try:
        names = parse_sections(args.sections)
        if args.readme is not None:  # a README without its markers fails before any work
            replace_between_markers(args.readme.read_text(), "")
    except (ValueError, OSError) as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.WARNING)
    started = dt.datetime.now(dt.UTC)
    figures, failures, loads = run_sections(names, args.quick, args.json)
    minutes = (dt.datetime.now(dt.UTC) - started).total_seconds() / 60
    header = (
        f"`python -m bench{' --quick' if args.quick else ''}`, {started:%Y-%m-%d} "
        f"({minutes:.0f} min): {machine_line()}."
    )
    table = header + "\n\n" + render_table(figures, failures, loads)
    print("\n" + table)
    if args.json is not None:
        write_json(args.json, header, figures, failures, loads)
    if args.readme is not None:
        args.readme.write_text(replace_between_markers(args.readme.read_text(), table))
        print(f"wrote the table into {args.readme}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
