"""The layout: every MLproject entry point answers ``--help``; dependencies run one way
(selection feeds steering, never the reverse; project/ imports no evaluation, analysis or
training module); the README's Layout section names only what the tree holds."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# One process runs every entry point's ``--help`` in turn as ``python -m`` would (runpy,
# ``__main__``), so torch and mlflow are imported once, not once per entry point.
_HELP_DRIVER = """
import contextlib, io, json, runpy, sys
out = {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException as err:
        buffer.write(f"{type(err).__name__}: {err}")
        code = 1
    out[module] = [code, buffer.getvalue()]
print(json.dumps(out))
"""


def entry_points() -> dict[str, tuple[str, list[str]]]:
    """MLproject entry point → (module of its ``python -m`` command, the flags it passes)."""
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    out = {}
    for name, entry in spec["entry_points"].items():
        command = " ".join(entry["command"].split())
        match = re.match(r"python -m ([\w.]+)", command)
        assert match, f"entry point {name}: command {command!r} is not `python -m MODULE ...`"
        out[name] = (match[1], re.findall(r"--(\w+)", command))
    return out


def test_every_entry_point_answers_help() -> None:
    points = entry_points()
    assert {"main", "train", "evaluate", "steer", "analyze", "tune_dtc"} <= set(points)
    modules = sorted({module for module, _ in points.values()})
    done = subprocess.run(
        [sys.executable, "-c", _HELP_DRIVER, *modules],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (module, flags) in points.items():
        code, text = results[module]
        assert code == 0, f"-e {name}: python -m {module} --help exited {code}:\n{text[-2000:]}"
        missing = [f for f in flags if f"--{f}" not in text]
        assert not missing, f"-e {name}: python -m {module} does not take {missing}"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for name in sorted(_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


def test_selection_feeds_steering_never_the_reverse() -> None:
    assert _offending("evaluation/selection", ("evaluation.steering",)) == []


def test_interpretability_stands_alone() -> None:
    others = ("evaluation.steering", "evaluation.selection", "evaluation.probing_regimes")
    assert _offending("evaluation/interpretability", others) == []


def test_project_imports_no_evaluation_analysis_or_training() -> None:
    assert _offending("project", ("evaluation", "analysis", "training")) == []


def test_readme_layout_names_what_the_tree_holds() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1]
    block = section.split("```", 2)[1]
    # What a file holds is said in brackets (some span lines): blank them, keep the lines.
    block = re.sub(r"\([^()]*\)", lambda m: re.sub(r"[^\n]", " ", m[0]), block)
    top, missing = None, []
    for line in block.splitlines():
        head = re.match(r"^(\w+)/\s", line)
        if head:
            top = REPO / head[1]
            assert top.is_dir(), f"README Layout names {head[1]}/, which is not in the tree"
        if top is None:
            continue
        for name in re.findall(r"\b([\w/]+\.py|\w+/)(?=[\s,;.]|$)", line):
            name = name.rstrip("/")
            if name == top.name:
                continue
            if "/" in name:  # a path: from the repository root or from the folder
                found = (REPO / name).exists() or (top / name).exists()
            else:  # a name: anywhere in the folder
                found = any(top.rglob(name))
            if not found:
                missing.append(f"{top.name}/: {name}")
    assert missing == [], f"README Layout names what the tree lacks: {missing}"
