"""`python -m bench`: the table it prints and writes into the README, and its bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.__main__ import (
    README_END,
    README_START,
    main,
    parse_sections,
    render_table,
    replace_between_markers,
)
from bench.figures import Figure, met_target, speedup_from_seconds

ROOT = Path(__file__).resolve().parents[2]


def _figure(**overrides: object) -> Figure:
    fields = dict(
        section="rating",
        what="offline rating",
        saeflow=0.1,
        reference=1.3,
        reference_name="one question at a time",
        unit="s a completion",
        ratio=13.0,
        target=10.0,
        met=True,
        note="identical ratings 1.000",
    )
    fields.update(overrides)
    return Figure(**fields)  # type: ignore[arg-type]


def test_met_needs_the_ratio_and_the_quality_condition() -> None:
    assert met_target(13.0, 10.0) is True
    assert met_target(9.9, 10.0) is False
    assert met_target(13.0, 10.0, quality_ok=False) is False  # faster but learns worse
    assert met_target(13.0, None) is None
    assert speedup_from_seconds(2.0, 10.0) == 5.0
    with pytest.raises(ValueError, match="saeflow_s=0"):
        speedup_from_seconds(0, 1.0)


def test_table_has_a_row_per_figure_and_a_row_per_failed_section() -> None:
    table = render_table(
        [_figure(), _figure(what="generation share", target=0.6, ratio=0.5, met=False)],
        {"sweep": "RuntimeError: boom"},
        {"rating": (1.0, 2.0)},
    )
    lines = table.splitlines()
    assert lines[0].startswith("| section | what |")
    assert "| 13.00× | ≥ 10× | yes |" in lines[2]
    assert "| 0.50× | ≥ 0.6× | **no** |" in lines[3]
    assert lines[4].startswith("| sweep | failed: RuntimeError: boom |")
    assert "rating 1.0 → 2.0" in table
    # A | inside a note is escaped: every row keeps the header's 9 cells.
    piped = render_table([_figure(note="max |diff| 0")], {}, {}).splitlines()[2]
    assert "max \\|diff\\| 0" in piped
    assert piped.replace("\\|", "").count("|") == 10


def test_readme_table_is_replaced_between_the_markers_only() -> None:
    text = f"intro\n{README_START}\nold table\n{README_END}\noutro\n"
    out = replace_between_markers(text, "new table")
    assert out == f"intro\n{README_START}\nnew table\n{README_END}\noutro\n"
    assert replace_between_markers(out, "again").count("again") == 1
    for bad in ("no markers", f"{README_END}\n{README_START}", f"{README_START}{README_START}"):
        with pytest.raises(ValueError, match="exactly one"):
            replace_between_markers(bad, "x")


def test_the_repository_readme_has_the_markers() -> None:
    replace_between_markers((ROOT / "README.md").read_text(), "x")


def test_unknown_section_is_a_clear_error_before_any_work() -> None:
    assert parse_sections("all")[0] == "training"
    assert parse_sections("rating,generation") == ["generation", "rating"]  # table order
    with pytest.raises(ValueError, match="unknown \\['trainng'\\]; valid: all or any of"):
        parse_sections("trainng")
    with pytest.raises(SystemExit):
        main(["--sections", "trainng"])


def test_readme_without_markers_fails_before_any_section_runs(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no table here\n")
    with pytest.raises(SystemExit):
        main(["--sections", "generation", "--readme", str(readme)])
    assert readme.read_text() == "no table here\n"


def test_quick_generation_section_runs_end_to_end(tmp_path: Path) -> None:
    """`python -m bench` as a user runs it: a real section on the embedded SmolLM2 writes its
    figures (shapes tiny; the numbers are not the issue's)."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{README_START}\n{README_END}\n")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--sections",
            "generation",
            "--quick",
            "--json",
            str(out),
            "--readme",
            str(readme),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert [f["section"] for f in payload["figures"]] == ["generation", "generation"]
    share, batched = payload["figures"]
    assert share["target"] == 0.6 and share["reference_name"] == "the LM's plain batched decode"
    assert share["saeflow"] > 0 and share["reference"] > 0
    assert batched["note"].endswith("greedy continuations identical")
    assert "| generation |" in readme.read_text()


def test_saelens_jumprelu_starts_at_the_asked_l0() -> None:
    """The training bench's data init puts SAELens' JumpReLU at the asked L0 (its scalar
    default fires on about half the latents), with no negative threshold."""
    from sae_lens.saes import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    from bench.bench_training import start_jumprelu_at

    torch.manual_seed(0)
    cfg = JumpReLUTrainingSAEConfig(
        d_in=32, d_sae=256, jumprelu_sparsity_loss_mode="quadratic", target_l0=8.0
    )
    sae = JumpReLUTrainingSAE(cfg)
    x_ND = torch.randn(2048, 32)
    dense_l0 = float((sae.encode(x_ND) > 0).sum(dim=-1).float().mean())
    assert dense_l0 > 100
    start_jumprelu_at(sae, x_ND, 64.0)
    assert float(sae.threshold.min()) >= 0
    l0 = float((sae.encode(x_ND) > 0).sum(dim=-1).float().mean())
    assert abs(l0 - 64.0) < 2.0
    start_jumprelu_at(sae, x_ND, 1000.0)  # capped at half the latents
    assert abs(float((sae.encode(x_ND) > 0).sum(dim=-1).float().mean()) - 128.0) < 4.0
