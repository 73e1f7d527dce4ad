"""How far a judge agrees with careful reading, on a hand-rated gold file (issue 13).

    .venv/bin/python bench/judge_agreement.py ../shared/data/judge_gold_dev.jsonl [--judge offline]
    .venv/bin/python bench/judge_agreement.py ../shared/data/judge_gold_latent_dev.jsonl
    .venv/bin/python bench/judge_agreement.py GOLD.jsonl --judge hf --option model=/path/to/chat-model
    OPENAI_API_KEY=... .venv/bin/python bench/judge_agreement.py GOLD.jsonl --judge openai \\
        --option model=gpt-4o-mini

Prints, per rating kind (concept, instruct, fluency): exact agreement, quadratic-weighted Cohen's
κ (scikit-learn), Spearman ρ, the number of items rated 0 by hand that the judge credits and the
confusion matrix; per steering method the mean harmonic-mean score by hand and by the judge;
and the per-item Spearman ρ of that score. A gold file that rates only the concept (the
latent-first items: token-list explanations) gets the concept figures only; the offline judge
then reads its tokens against its default reference windows (stdlib chunks). ``--lm`` is the
unsteered LM whose likelihood the offline judge reads for fluency (default: the embedded
SmolLM2; ``none`` for none). ``--save-agreement`` stores the figures in the package's
``agreement.json`` under the judge's identity, which is what steering reports print; a
concept-only file's figures are stored as ``latent_*`` beside those of the full gold file
(measure that one first).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from project.judges import JUDGE_NAMES, build_judge
from project.judges.agreement import (
    agreement_key,
    agreement_report,
    format_report,
    gold_kinds,
    load_gold,
    rate_items,
)
from project.lm import DEFAULT_LM, load_lm

AGREEMENT_JSON = Path(__file__).resolve().parents[1] / "project" / "judges" / "agreement.json"


def _options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {pair!r} is not KEY=VALUE")
        options[key] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gold", type=Path, help="JSON-lines gold file")
    parser.add_argument("--judge", default="offline", choices=JUDGE_NAMES)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--lm", default=DEFAULT_LM, help="offline: fluency LM, or 'none'")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--save-agreement", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = load_gold(args.gold)
    kinds = gold_kinds(rows)
    lm = None
    if args.judge == "offline" and args.lm.lower() != "none":
        lm = load_lm(args.lm)
    judge = build_judge(args.judge, lm=lm, **_options(args.option))
    started = time.perf_counter()
    ratings = rate_items(judge, rows, kinds)
    seconds = time.perf_counter() - started
    report = agreement_report(rows, ratings)
    identity = judge.identity()
    print(f"gold {args.gold} ({len(rows)} items), judge {json.dumps(identity)}")
    print(f"rated in {seconds:.1f} s, {judge.parse_failures} unparsed answers (counted as 0)\n")
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps({"identity": identity, **report}, indent=1))
    if args.save_agreement:
        stored = json.loads(AGREEMENT_JSON.read_text()) if AGREEMENT_JSON.is_file() else {}
        key = agreement_key(identity)
        if len(kinds) < 3:
            if key not in stored:
                raise SystemExit(f"no figures of {key} in {AGREEMENT_JSON}: measure the full gold")
            concept = report["kinds"]["concept"]
            stored[key].update(
                {
                    "latent_gold": args.gold.name,
                    "latent_n": report["n"],
                    "latent_concept_kappa": round(concept["kappa"], 3),
                    "latent_concept_exact": round(concept["exact"], 3),
                    "latent_hand_zero_credited": concept["hand_zero_credited"],
                    "latent_hand_zero": sum(concept["confusion"][0]),
                }
            )
        else:
            stored[key] = {
                "gold": args.gold.name,
                "n": report["n"],
                **{f"{kind}_kappa": round(k["kappa"], 3) for kind, k in report["kinds"].items()},
                **{f"{kind}_exact": round(k["exact"], 3) for kind, k in report["kinds"].items()},
                "score_spearman": round(report["score_spearman"], 3),
                "mean_score": {m: round(v["judge"], 3) for m, v in report["methods"].items()},
                "mean_score_by_hand": {
                    m: round(v["hand"], 3) for m, v in report["methods"].items()
                },
            }
        AGREEMENT_JSON.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        print(f"\nagreement figures saved to {AGREEMENT_JSON}")


if __name__ == "__main__":
    main()
