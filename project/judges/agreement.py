"""How far a judge agrees with hand ratings (issue 13): the statistics behind
``bench/judge_agreement.py`` and the figures shipped in ``agreement.json``.

A gold file is JSON lines with ``concept``, ``instruction``, ``completion``, ``method`` and the
hand ratings ``concept_rating``, ``instruct_rating``, ``fluency_rating`` (0/1/2), the format of
the hand-rated steering completions described in the project's README. A file may rate fewer
kinds (the latent-first items rate the concept only: ``concept_rating``); the report then
covers those kinds and has no harmonic-mean score.

The offline judge's shipped figures (``agreement.json``, rules 5 and 6): on ``judge_gold_dev.jsonl``
(prose concepts, 120 items) concept κ 0.839, instruct κ 0.883, fluency κ 0.796 with SmolLM2's
likelihood; on ``judge_gold_latent_dev.jsonl`` (token-list explanations of latents, 30 items,
default reference windows: stdlib chunks) ``latent_concept_kappa`` 0.902, exact 0.967, no
hand-0 item credited (rule 4: κ 0.086, 10 of 27 credited).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from project.judges.base import Judge
from project.judges.prompts import RATING_KINDS

GOLD_FIELDS = {
    "concept": "concept_rating",
    "instruct": "instruct_rating",
    "fluency": "fluency_rating",
}
_REQUIRED = ("concept", "instruction", "completion")


def harmonic_score(concept: float, instruct: float, fluency: float) -> float:
    """AxBench's steering score ``3 / (1/C + 1/I + 1/F)``, 0 when any rating is <= 0 (range
    [0, 2])."""
    if min(concept, instruct, fluency) <= 0:
        return 0.0
    return 3.0 / (1.0 / concept + 1.0 / instruct + 1.0 / fluency)


def load_gold(path: str | Path, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of a gold JSON-lines file, checked for the fields the benchmark needs: the
    hand rating of every kind in ``kinds`` (None: the kinds the first row rates, which must
    include the concept)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if kinds is None:
                kinds = [k for k, field in GOLD_FIELDS.items() if field in row] or ["concept"]
            required = (*_REQUIRED, *(GOLD_FIELDS[k] for k in kinds))
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{n} lacks field(s) {missing}; required: {required}")
            for field in (GOLD_FIELDS[k] for k in kinds):
                if row[field] not in (0, 1, 2):
                    raise ValueError(f"{path}:{n}: {field}={row[field]!r} is not 0, 1 or 2")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def gold_kinds(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rating kinds every row of a gold file rates by hand."""
    return [k for k, field in GOLD_FIELDS.items() if all(field in r for r in rows)]


def rate_items(
    judge: Judge, rows: Sequence[Mapping[str, Any]], kinds: Sequence[str] = RATING_KINDS
) -> list[dict[str, int]]:
    """The judge's ratings of each row's completion on ``kinds``; an unparsed answer counts as
    0, as AxBench counts it."""
    ratings = []
    for row in rows:
        references = {"concept": row["concept"], "instruct": row["instruction"], "fluency": ""}
        rated = {}
        for kind in kinds:
            value = judge.rate(kind, row["completion"], references[kind])
            rated[kind] = int(value) if value is not None else 0
        ratings.append(rated)
    return ratings


def kind_agreement(hand: Sequence[int], judge: Sequence[int]) -> dict[str, Any]:
    """Exact agreement, quadratic-weighted Cohen's κ, Spearman ρ (NaN where a side is
    constant), the 3x3 confusion matrix (rows: hand 0/1/2, columns: judge 0/1/2) and
    ``hand_zero_credited``, the number of items rated 0 by hand that the judge rates > 0
    (free credit)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    if len(hand) != len(judge) or not hand:
        raise ValueError(
            f"need equally many hand and judge ratings, got {len(hand)} and {len(judge)}"
        )
    varied = len(set(hand)) > 1 and len(set(judge)) > 1
    return {
        "n": len(hand),
        "exact": sum(a == b for a, b in zip(hand, judge, strict=True)) / len(hand),
        "kappa": float(cohen_kappa_score(hand, judge, weights="quadratic", labels=[0, 1, 2]))
        if varied
        else math.nan,
        "spearman": float(spearmanr(hand, judge).statistic) if varied else math.nan,
        "confusion": confusion_matrix(hand, judge, labels=[0, 1, 2]).tolist(),
        "hand_zero_credited": sum(a == 0 and b > 0 for a, b in zip(hand, judge, strict=True)),
    }


def agreement_report(
    rows: Sequence[Mapping[str, Any]], ratings: Sequence[Mapping[str, int]]
) -> dict[str, Any]:
    """Per rated kind :func:`kind_agreement`; where all three kinds are rated, per method the
    mean hand and judge score and the per-item Spearman ρ of the harmonic-mean score."""
    from scipy.stats import spearmanr

    report: dict[str, Any] = {"n": len(rows), "kinds": {}, "methods": {}}
    kinds = [k for k in GOLD_FIELDS if ratings and k in ratings[0]]
    for kind in kinds:
        hand = [int(r[GOLD_FIELDS[kind]]) for r in rows]
        report["kinds"][kind] = kind_agreement(hand, [int(x[kind]) for x in ratings])
    if len(kinds) < len(GOLD_FIELDS):
        return report  # no harmonic-mean score without all three ratings
    hand_scores = [
        harmonic_score(r["concept_rating"], r["instruct_rating"], r["fluency_rating"]) for r in rows
    ]
    judge_scores = [harmonic_score(x["concept"], x["instruct"], x["fluency"]) for x in ratings]
    report["score_spearman"] = float(spearmanr(hand_scores, judge_scores).statistic)
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row, h, j in zip(rows, hand_scores, judge_scores, strict=True):
        by_method[str(row.get("method", "all"))].append((h, j))
    for method, pairs in sorted(by_method.items()):
        report["methods"][method] = {
            "n": len(pairs),
            "hand": sum(h for h, _ in pairs) / len(pairs),
            "judge": sum(j for _, j in pairs) / len(pairs),
        }
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as the plain-text tables the benchmark prints."""
    lines = [
        f"{report['n']} items",
        "",
        "kind      exact  kappa(q)  spearman  hand-0 credited   confusion (rows hand 0/1/2, "
        "cols judge)",
    ]
    for kind, k in report["kinds"].items():
        confusion = " | ".join(" ".join(f"{c:3d}" for c in row) for row in k["confusion"])
        zeros = sum(k["confusion"][0])
        credited = f"{k['hand_zero_credited']} of {zeros}"
        lines.append(
            f"{kind:<9} {k['exact']:5.3f}  {k['kappa']:8.3f}  {k['spearman']:8.3f}  "
            f"{credited:>15}   {confusion}"
        )
    if "score_spearman" not in report:
        return "\n".join(lines)
    lines += ["", f"harmonic-mean score, per item: spearman {report['score_spearman']:.3f}", ""]
    lines.append("method              n   mean score by hand   by judge")
    for method, m in report["methods"].items():
        lines.append(f"{method:<18} {m['n']:3d}   {m['hand']:18.3f}   {m['judge']:8.3f}")
    return "\n".join(lines)


def measured_agreement(identity: Mapping[str, str]) -> dict[str, Any] | None:
    """The agreement figures shipped in ``agreement.json`` for a judge of this identity (the
    offline judge's on the dev gold file, measured by ``bench/judge_agreement.py``), or None
    when that judge was never measured."""
    key = agreement_key(identity)
    return AGREEMENT.get(key)


def agreement_key(identity: Mapping[str, str]) -> str:
    """The key of a judge in :data:`AGREEMENT`: its kind, model and calibration hash."""
    return "|".join(identity.get(k, "") for k in ("kind", "model", "fluency_lm", "calibration"))


def _load_agreement() -> dict[str, dict[str, Any]]:
    path = resources.files("project.judges").joinpath("agreement.json")
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


# Measured figures keyed by :func:`agreement_key`; what steering reports print as "how far to
# trust this judge".
AGREEMENT: dict[str, dict[str, Any]] = _load_agreement()
