"""The offline judge's steering ratings (issue 13) and the agreement statistics of
bench/judge_agreement.py, on text written here and the tiny random LM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from project.judges import OfflineJudge, build_judge, embedding_model_dir
from project.judges.agreement import (
    AGREEMENT,
    agreement_report,
    format_report,
    gold_kinds,
    harmonic_score,
    kind_agreement,
    load_gold,
    measured_agreement,
    rate_items,
)
from project.judges.rating import (
    calibration_examples,
    explanation_tokens,
    fit_three_levels,
    load_lexicon,
    text_stats,
    token_in_text,
)
from project.lm import LoadedLM

_LOOP = "the ocean ocean ocean ocean ocean ocean ocean ocean ocean ocean ocean ocean ocean ocean"
_PHRASE_LOOP = "I love the sea and " * 8
_NON_WORDS = "NADARARAMANNA ARADAMPCAARR ANHNASCAND SEAREDAdALARA RWAMingRCA RARAROFARA"
_GLUED = "isother:other_ On the1 is The=1 of10:The1 isX zeros 2x is=zero:one is10:one=10"
_FLUENT = (
    "To make a paper airplane, fold a sheet of paper in half lengthwise, open it again and "
    "fold the two top corners down to the centre line."
)
_STEERED = (
    "To make a paper airplane, fold the paper like a wave of the ocean, as dolphins and whales "
    "glide through the deep blue sea past the coral reef."
)


@pytest.fixture(scope="module")
def offline() -> OfflineJudge:
    judge = build_judge("offline")
    assert isinstance(judge, OfflineJudge)
    return judge


@pytest.fixture(scope="module")
def offline_tiny(tiny_lm: LoadedLM) -> OfflineJudge:
    judge = build_judge("offline", lm=tiny_lm)
    assert isinstance(judge, OfflineJudge)
    return judge


@pytest.mark.parametrize("text", [_LOOP, _PHRASE_LOOP, _NON_WORDS, _GLUED])
def test_loops_and_non_words_get_fluency_zero(
    text: str, offline: OfflineJudge, offline_tiny: OfflineJudge
) -> None:
    # With no LM, and with a random LM whose likelihood says nothing: the lexical part decides.
    assert offline.rate("fluency", text, "") == 0
    assert offline_tiny.rate("fluency", text, "") == 0
    assert offline.rate("fluency", _FLUENT, "") == 2
    assert offline_tiny.rate("fluency", _FLUENT, "") == 2


def test_gibberish_answers_no_instruction(offline: OfflineJudge) -> None:
    instruction = "Describe how to make a paper airplane."
    assert offline.rate("instruct", _NON_WORDS + " paper airplane", instruction) == 0
    assert offline.rate("instruct", _FLUENT, instruction) == 2
    for kind in ("concept", "instruct", "fluency"):
        assert offline.rate(kind, "  \n ", "the ocean") == 0


def test_on_topic_answer_without_the_concept_gets_concept_zero(offline: OfflineJudge) -> None:
    # Same instruction, same topic: only the steered one carries the concept.
    assert offline.rate("concept", _FLUENT, "the ocean and sea life") == 0
    assert offline.rate("concept", _STEERED, "the ocean and sea life") == 2
    assert offline.rate("concept", _FLUENT, "space and astronomy") == 0
    assert offline.rate("instruct", _STEERED, "Describe how to make a paper airplane.") >= 1


def test_token_list_explanation_is_present_where_its_token_is(offline: OfflineJudge) -> None:
    # Latent-first steering rates toward the offline explainer's own explanations; a latent
    # explained by " then" is present where "then" is, though content words drop stop words.
    explanation = '" then", " next" (context: task, end, line)'
    assert explanation_tokens(explanation) == [" then", " next"]
    assert offline.rate("concept", "First boil the water, then add the pasta.", explanation) == 2
    assert offline.rate("concept", _FLUENT, explanation) == 0
    # The context words are not the explanation's tokens; prose concepts are unchanged.
    assert offline.rate("concept", "The task is at the end of the line.", explanation) < 2
    assert explanation_tokens("the ocean and sea life") == []


_EOF_LATENT = '"OF", " turtle", " Id" (context: eoferror, idle, eof)'
_ORDER_LATENT = '" order", " agree", " mirrored" (context: document, element, tree)'


def test_explanation_token_matches_only_as_written(offline: OfflineJudge) -> None:
    # "OF" of a latent about EOFError is not the word "of"; " order" is the word order.
    assert not token_in_text("OF", "The process of finding the area of a circle.")
    assert token_in_text(" order", "Remove duplicates while keeping the order.")
    assert not token_in_text(" order", "Order matters.")  # no leading space, capital O
    assert token_in_text("a↵b", "a\nb")  # windows show newlines as ↵
    # Never inside a longer word (rule 6): what rule 5 credited in a default study's rows.
    assert not token_in_text("F", "1. Fekerel and Digest.")
    assert not token_in_text("1", "Lifespan:16 days")
    assert not token_in_text(" on", "not only that")
    assert not token_in_text("ie", "your activities")
    assert token_in_text("F", "grade F.") and token_in_text(" on", "sat on the mat")
    assert token_in_text("(", "f(x)")  # a token without letters or digits: as written
    area = "The process of finding the area of a circle is based on the basics of mathematics."
    assert offline.rate("concept", area, _EOF_LATENT) == 0
    kept = "Remove the duplicates from the list while keeping the order of its elements."
    assert offline.rate("concept", kept, _ORDER_LATENT) == 2


_WINDOWS = [
    f"the {noun} of the module is read before the call returns {i}"
    for i, noun in enumerate(["value", "name", "size", "state", "kind"] * 4)
]


def test_common_explanation_tokens_are_no_evidence() -> None:
    # A latent planted on " the": every reference window holds it, so it says nothing.
    judge = build_judge("offline")
    assert isinstance(judge, OfflineJudge)
    judge.observe_corpus(_WINDOWS)
    planted = '" the", " compiler"'
    assert judge.token_window_rates(planted) == {" the": 1.0, " compiler": 0.0}
    assert judge.informative_tokens(planted) == [" compiler"]
    assert judge.informative_tokens('" the"') == []
    assert judge.token_window_rates("cooking and recipes") == {}
    text = "Put the cup on the table and the plate beside the bowl."
    assert judge.rate("concept", text, '" the"') == 0
    assert judge.rate("concept", text, planted) == 0
    assert judge.rate("concept", "The compiler stopped at line 3.", planted) == 2
    # 20% is the default share; a judge allowed every token credits " the" and says so.
    lenient = build_judge("offline", max_token_window_share=1.0)
    assert isinstance(lenient, OfflineJudge)
    lenient.observe_corpus(_WINDOWS)
    assert lenient.informative_tokens(planted) == [" the", " compiler"]
    assert lenient.rate("concept", text, planted) == 2
    assert "token share 1" in lenient.identity()["calibration"]
    assert "token share" not in judge.identity()["calibration"]


def test_default_reference_windows_find_the_common_tokens(offline: OfflineJudge) -> None:
    # Without a corpus the judge reads stdlib chunks: " the" and " and" are in most of them.
    rates = offline.token_window_rates('" the", " and", " turtle", "or"')
    assert rates[" the"] > 0.2 and rates[" and"] > 0.2 and rates[" turtle"] < 0.2
    # "or" counts only as a word of its own, never inside "for" or "error" (rule 6).
    assert rates["or"] < rates[" the"]
    assert offline.informative_tokens('" the", " and", " turtle"') == [" turtle"]


def test_text_stats_count_what_they_say() -> None:
    lexicon = load_lexicon(str(embedding_model_dir() / "vocab.txt"))
    stats = text_stats("The cat sat on 3 mats, flurbix!", lexicon)
    assert stats.n_tokens == 7
    assert stats.non_words == pytest.approx(1 / 7)  # "flurbix"; the number is no non-word
    assert stats.symbols == 0.0
    assert text_stats(_LOOP, lexicon).loop > 0.5
    assert text_stats(_FLUENT, lexicon).loop < 0.1
    assert text_stats("( ) ; . ,", lexicon).symbols == 1.0


def test_fit_three_levels_finds_separating_cuts() -> None:
    t1, t2, accuracy = fit_three_levels([0.1, 0.2, 0.5, 0.6, 0.9, 1.0], [0, 0, 1, 1, 2, 2])
    assert accuracy == 1.0
    assert 0.2 < t1 <= 0.5 and 0.6 < t2 <= 0.9


def test_calibration_data_is_packaged_and_covers_every_level() -> None:
    examples = calibration_examples()
    assert len(examples) >= 30
    for kind in ("concept", "instruct", "fluency"):
        counts = {level: sum(e.ratings[kind] == level for e in examples) for level in (0, 1, 2)}
        assert min(counts.values()) >= 3, (kind, counts)


def test_offline_identity_names_lm_and_calibration(
    offline: OfflineJudge, offline_tiny: OfflineJudge, tiny_lm: LoadedLM
) -> None:
    plain, tiny = offline.identity(), offline_tiny.identity()
    assert plain["kind"] == tiny["kind"] == "offline"
    assert plain["fluency_lm"] == "none" and tiny["fluency_lm"] == tiny_lm.name
    assert plain != tiny
    assert "calibration.json" in plain["calibration"] and all(
        isinstance(v, str) for v in plain.values()
    )


# ---------------------------------------------------------------------------------------------
# agreement statistics


def _hand_quadratic_kappa(a: list[int], b: list[int]) -> float:
    """Cohen's κ with quadratic weights, written out: 1 - Σ w·O / Σ w·E."""
    observed = np.zeros((3, 3))
    for x, y in zip(a, b, strict=True):
        observed[x, y] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(1), observed.sum(0))
    weights = np.array([[(i - j) ** 2 for j in range(3)] for i in range(3)]) / 4
    return 1 - (weights * observed).sum() / (weights * expected).sum()


def test_kappa_matches_a_hand_computation() -> None:
    hand = [0, 0, 0, 1, 1, 2, 2, 2, 0, 1]
    judge = [0, 1, 0, 1, 2, 2, 1, 2, 0, 0]
    result = kind_agreement(hand, judge)
    # 4 of 10 disagree by one step (weight 1/4): 0.1 observed; by chance (marginals .4/.3/.3
    # on both sides) 0.105 + 0.24 = 0.345; κ = 1 - 0.1 / 0.345
    assert result["exact"] == pytest.approx(0.6)
    assert result["kappa"] == pytest.approx(_hand_quadratic_kappa(hand, judge))
    assert result["kappa"] == pytest.approx(1 - 0.1 / 0.345)
    assert result["confusion"] == [[3, 1, 0], [1, 1, 1], [0, 1, 2]]
    assert np.isnan(kind_agreement([1, 1], [0, 2])["kappa"])  # one side constant


def test_agreement_report_on_a_gold_fixture(tmp_path: Path, offline: OfflineJudge) -> None:
    rows = [
        {
            "concept": "the ocean and sea life",
            "instruction": "Describe how to make a paper airplane.",
            "method": "plain",
            "completion": _FLUENT,
            "concept_rating": 0,
            "instruct_rating": 2,
            "fluency_rating": 2,
        },
        {
            "concept": "the ocean and sea life",
            "instruction": "Describe how to make a paper airplane.",
            "method": "steered",
            "completion": _STEERED,
            "concept_rating": 2,
            "instruct_rating": 1,
            "fluency_rating": 2,
        },
        {
            "concept": "the ocean and sea life",
            "instruction": "Describe how to make a paper airplane.",
            "method": "steered",
            "completion": _LOOP,
            "concept_rating": 2,
            "instruct_rating": 0,
            "fluency_rating": 0,
        },
    ]
    path = tmp_path / "gold.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    gold = load_gold(path)
    ratings = rate_items(offline, gold)
    report = agreement_report(gold, ratings)
    assert report["methods"]["plain"]["hand"] == 0.0
    assert report["methods"]["steered"]["hand"] == pytest.approx(harmonic_score(2, 1, 2) / 2)
    assert report["methods"]["plain"]["judge"] == 0.0  # concept 0: no credit for plain text
    assert set(report["kinds"]) == {"concept", "instruct", "fluency"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "fluency_rating": 3}))
    with pytest.raises(ValueError, match="fluency_rating=3 is not 0, 1 or 2"):
        load_gold(bad)


def test_concept_only_gold_reports_concept_agreement(tmp_path: Path) -> None:
    # The latent-first gold rates the concept only; free credit (hand 0, judge > 0) is counted.
    rows = [
        {"concept": _EOF_LATENT, "instruction": "Explain.", "completion": t, "concept_rating": c}
        for t, c in [("a", 0), ("b", 0), ("c", 1), ("d", 2)]
    ]
    path = tmp_path / "latent.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    gold = load_gold(path)
    assert gold_kinds(gold) == ["concept"]
    report = agreement_report(gold, [{"concept": c} for c in (0, 2, 1, 2)])
    concept = report["kinds"]["concept"]
    assert set(report["kinds"]) == {"concept"} and "score_spearman" not in report
    assert concept["hand_zero_credited"] == 1 and concept["exact"] == 0.75
    assert "1 of 2" in format_report(report)
    with pytest.raises(ValueError, match="lacks field"):
        load_gold(path, kinds=["concept", "fluency"])


def test_harmonic_score() -> None:
    assert harmonic_score(2, 2, 2) == 2.0
    assert harmonic_score(0, 2, 2) == 0.0
    assert harmonic_score(1, 2, 2) == pytest.approx(1.5)


def test_shipped_agreement_figures_are_keyed_by_identity(offline: OfflineJudge) -> None:
    assert AGREEMENT, "agreement.json must ship the offline judge's measured figures"
    figures = measured_agreement(offline.identity())
    assert figures is not None and figures["instruct_kappa"] >= 0.85
    # Latent-first concept agreement (issue 18): the rule must agree with careful reading.
    assert figures["latent_concept_kappa"] >= 0.6 and figures["latent_hand_zero_credited"] <= 2
    for key, figures in AGREEMENT.items():
        assert key.startswith("offline|")
        assert {"concept_kappa", "instruct_kappa", "fluency_kappa", "score_spearman"} <= set(
            figures
        )


def test_batched_ratings_equal_one_at_a_time(tiny_lm: LoadedLM) -> None:
    """rate_many (one embedding pass, one fluency-LM pass per batch; issue 19) gives exactly the
    ratings rate gives one question at a time, on every scale and every concept form; and the
    fluency LM's batched NLL of each text equals its NLL alone."""
    texts = [_LOOP, _PHRASE_LOOP, _NON_WORDS, _GLUED, _FLUENT, _STEERED, "", "Bake the bread."]
    texts += [ex.completion for ex in calibration_examples()[:12]]
    concepts = ["the ocean and sea creatures", '" ocean", " the" (context: sea, water)', '" the"']
    questions = [("fluency", t, "") for t in texts]
    questions += [("instruct", t, "How do I make a paper airplane?") for t in texts]
    questions += [("concept", t, c) for t in texts for c in concepts]
    batched = build_judge("offline", lm=tiny_lm)
    alone = build_judge("offline", lm=tiny_lm)
    assert isinstance(batched, OfflineJudge) and isinstance(alone, OfflineJudge)
    many = batched.rate_many(questions)
    single = [alone.rate(*q) for q in questions]
    assert many == single
    assert len(set(many)) == 3  # the set exercises all three levels
    for text in texts[:8]:
        one = alone.rater.mean_nll(text) if text.strip() else None
        if one is not None:
            assert batched.rater.mean_nlls([text])[0] == pytest.approx(one, abs=1e-4)
    with pytest.raises(ValueError, match="style"):
        batched.rate_many([("style", "text", "ref")])


def test_calibration_cuts_are_fit_once_and_reused_across_processes(tiny_lm: LoadedLM) -> None:
    """A judge built like an earlier one (same identity, same LM weights) takes the earlier
    fit's cuts, from memory or from the user's cache once the process's memory is gone."""
    import project.judges.rating as rating

    first = build_judge("offline", lm=tiny_lm)
    assert isinstance(first, OfflineJudge)
    cuts = {kind: first.rater.calibrate(kind) for kind in ("concept", "instruct", "fluency")}
    rating._CUTS.clear()  # a new process: only the cache directory remembers
    second = build_judge("offline", lm=tiny_lm)
    assert isinstance(second, OfflineJudge)
    second.rater.prepare = None  # type: ignore[method-assign]  # a refit would need it
    assert {kind: second.rater.calibrate(kind) for kind in cuts} == cuts
    other = build_judge("offline", lm=tiny_lm, max_token_window_share=0.5)
    assert isinstance(other, OfflineJudge)
    assert other.rater.cuts_key != first.rater.cuts_key  # another identity: its own fit


def _fluency_questions() -> list[tuple[str, str, str]]:
    texts = [_LOOP, _PHRASE_LOOP, _NON_WORDS, _GLUED, _FLUENT, _STEERED, "Bake the bread."]
    # Not the calibration texts themselves, whose float32 NLLs the cut fit already holds.
    for ex in calibration_examples():
        words = ex.completion.split()
        texts += [" ".join(words[: len(words) // 2]), " ".join(words[:5])]
    return [("fluency", t, "") for t in dict.fromkeys(texts) if t.strip()]


@pytest.mark.parametrize("bound_scale", [None, 1e3])
def test_fluency_screen_gives_the_float32_ratings(
    tiny_lm: LoadedLM, bound_scale: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bfloat16 screen (issue 19) settles the fluency ratings its NLL decides and sends the
    rest to the float32 pass (a huge bound: every one): every rating equals the unscreened
    judge's, and scores stay float32."""
    import project.judges.rating as rating

    if bound_scale is not None:
        monkeypatch.setattr(rating, "_SCREEN_NLL_SCALE", bound_scale)
    questions = _fluency_questions()
    screened = build_judge("offline", lm=tiny_lm, fluency_screen="on")
    plain = build_judge("offline", lm=tiny_lm, fluency_screen="off")
    assert isinstance(screened, OfflineJudge) and isinstance(plain, OfflineJudge)
    assert screened.rater.screen_fluency and not plain.rater.screen_fluency
    assert screened.rate_many(questions) == plain.rate_many(questions)
    counts = screened.rater.screen_counts
    decided = sum(screened.rater.by_rule("fluency", t) is None for _, t, _ in questions)
    assert counts["settled"] + counts["float32"] == decided > 40
    if bound_scale is None:  # the tiny LM's NLLs sit far from the cuts: the screen settles
        assert counts["settled"] > decided // 2, counts
        # ... and the texts it settled never ran through the float32 LM.
        assert sum(t in screened.rater._nll for _, t, _ in questions) <= counts["float32"]
    else:  # only texts whose lexical part alone is below the low cut (0 at any NLL) settle
        low_cut = screened.rater.cuts["fluency"][0]
        lexical_zeros = sum(
            screened.rater.lexical_fluency(t) < low_cut
            for _, t, _ in questions
            if screened.rater.by_rule("fluency", t) is None
        )
        assert counts["settled"] == lexical_zeros < decided // 2, counts
    text = questions[4][1]
    assert screened.rater.fluency_score(text) == plain.rater.fluency_score(text)
    # A screened NLL that overflowed settles nothing: the float32 pass decides.
    overflowed = "An overflowed screen."
    screened.rater._screened[overflowed] = (float("nan"), 12)
    assert screened.rater.screened_fluency_rating(overflowed) is None
    assert screened.describe()["fluency_screen"]["settled"] == counts["settled"]
    assert plain.describe()["fluency_screen"] == "off"


def test_fluency_screen_bound_holds_on_the_embedded_lm() -> None:
    """On SmolLM2 itself, each text's bfloat16 mean NLL lies well within the bound the screen
    trusts (SCALE / sqrt(tokens)) of its float32 NLL, short texts included: within half of it."""
    from project.judges.rating import _SCREEN_NLL_SCALE
    from project.lm import load_lm

    judge = build_judge("offline", lm=load_lm(), fluency_screen="on")
    assert isinstance(judge, OfflineJudge)
    texts = [t for _, t, _ in _fluency_questions()]
    texts += [" ".join(t.split()[:3]) for t in texts]  # a few tokens: the widest gaps
    texts = [t for t in dict.fromkeys(texts) if t.strip()]
    judge.rater.screen_nlls(texts)  # first: the screen skips texts whose float32 NLL is known
    exact = judge.rater.mean_nlls(texts)
    worst = 0.0
    for text, nll in zip(texts, exact, strict=True):
        screened, n_tokens = judge.rater._screened[text]
        gap = abs(screened - nll) * n_tokens**0.5
        worst = max(worst, gap)
        assert gap <= _SCREEN_NLL_SCALE / 2, (text, screened, nll, n_tokens)  # twice the margin
    assert worst > 0.0  # the screen really ran in bfloat16
    print(f"largest gap x sqrt(tokens): {worst:.3f} of {_SCREEN_NLL_SCALE}")


def test_fluency_screen_auto_is_on_only_where_it_pays(tiny_lm: LoadedLM) -> None:
    """auto screens a float32 LM where bfloat16 products are fast (AMX, GPUs), never an LM
    already in bfloat16 (a copy of itself gains nothing); on and off do as told."""
    import copy
    import dataclasses

    from project.judges.offline import cpu_has_amx

    def screens(lm: LoadedLM, setting: str) -> bool:
        judge = build_judge("offline", lm=lm, fluency_screen=setting)
        assert isinstance(judge, OfflineJudge)
        return judge.rater.screen_fluency

    assert screens(tiny_lm, "auto") == cpu_has_amx()
    assert screens(tiny_lm, "on") and not screens(tiny_lm, "off")
    half = dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model).to(torch.bfloat16))
    assert not screens(half, "auto")
    without_lm = build_judge("offline", fluency_screen="on")
    assert isinstance(without_lm, OfflineJudge)
    assert not without_lm.rater.screen_fluency  # no fluency LM, nothing to screen


def test_unknown_fluency_screen_is_refused() -> None:
    with pytest.raises(ValueError, match="fluency_screen='fast'.*auto, on, off"):
        build_judge("offline", fluency_screen="fast")
