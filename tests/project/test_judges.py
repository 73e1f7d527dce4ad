from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from project.judges import (
    HF_JUDGE_MODEL_ENV,
    JUDGE_NAMES,
    OfflineJudge,
    build_judge,
    measure_agreement,
    measured_agreement,
    parse_detection,
    parse_explanation,
    parse_rating,
    strip_marks,
)
from project.lm import LoadedLM

# ---------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Rating: [[2]]", 2),
        ("The concept is there.\nRating: [[1]]", 1),
        ("rating: [[ 0 ]]", 0),
        ("First Rating: [[1]], revised Rating: [[2]]", 2),
        ("Rating: [[2.0]]", 2),
        ("Rating: [[3]]", None),
        ("Rating: [[1.5]]", 1.5),  # AxBench reads a float in [0, 2] (METHODS §3)
        ("Rating: 2", 2),
        ("I would say two", None),
        ("", None),
    ],
)
def test_parse_rating(answer: str, expected: int | None) -> None:
    assert parse_rating(answer) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("1, 3", [True, False, True, False]),
        ("2 and 4.", [False, True, False, True]),
        ("None", [False] * 4),
        ("[1,2,3,4]", [True] * 4),
        ("5", None),
        ("I think 2", None),
        ("", None),
    ],
)
def test_parse_detection(answer: str, expected: list[bool] | None) -> None:
    assert parse_detection(answer, 4) == expected


def test_parse_explanation_and_marks() -> None:
    assert parse_explanation("This neuron activates on the word cat.\nmore") == "the word cat"
    assert parse_explanation("  \n plural nouns") == "plural nouns"
    assert parse_explanation("   ") is None
    assert strip_marks("a <<cat>> and a << dog>>") == "a cat and a  dog"


def test_unknown_judge_and_option() -> None:
    with pytest.raises(ValueError, match="unknown judge 'gpt'.*offline, hf, openai"):
        build_judge("gpt")
    assert JUDGE_NAMES == ("offline", "hf", "openai")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temperature'\]"):
        build_judge("offline", temperature=0.5)
    with pytest.raises(ValueError, match="max_tokens_listed=0"):
        build_judge("offline", max_tokens_listed=0)
    # The share above which an explanation token is no evidence (a CLI passes it as text).
    with pytest.raises(ValueError, match=r"max_token_window_share=0.0 must lie in \(0, 1\]"):
        build_judge("offline", max_token_window_share="0")


# ---------------------------------------------------------------------------------------------
# openai: a real HTTP server on loopback


class _FakeOpenAI(BaseHTTPRequestHandler):
    answers: list[str] = []
    requests: list[dict[str, Any]] = []
    status_for_models = 200

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(self.status_for_models, {"data": [{"id": "judge-model"}]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        type(self).requests.append({"body": body, "auth": self.headers.get("Authorization")})
        answer = type(self).answers.pop(0) if type(self).answers else "Rating: [[1]]"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})


@pytest.fixture
def fake_openai() -> Iterator[str]:
    handler = type("Handler", (_FakeOpenAI,), {"answers": [], "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler  # type: ignore[misc]
    finally:
        server.shutdown()
        server.server_close()


def test_openai_judge_over_http(fake_openai: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    base_url, handler = fake_openai
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge = build_judge("openai", base_url=base_url, model="judge-model", max_retries=0)
    handler.answers += [
        "The fragment is about cooking. Rating: [[2]]",
        "I cannot decide.",  # malformed: counted, not fatal
        "This neuron activates on the word cat.",
        "1, 3",
        "maybe the second one",  # malformed detection
    ]
    assert judge.rate("concept", "Bake the bread.", "cooking") == 2
    assert judge.rate("fluency", "Bake the bread.", "") is None
    assert judge.parse_failures == 1
    assert judge.explain(["the <<cat>> sat", "a <<cat>> ran"]) == "the word cat"
    assert judge.detect("the word cat", ["a cat", "a dog", "cats", "rain"]) == [
        True,
        False,
        True,
        False,
    ]
    assert judge.detect("the word cat", ["a cat", "a dog"]) == [False, False]
    assert judge.parse_failures == 2
    assert [f["call"] for f in judge.failure_log] == ["rate:fluency", "detect"]
    sent = handler.requests[0]
    assert sent["auth"] == "Bearer sk-test"
    assert sent["body"]["model"] == "judge-model"
    assert "Rating: [[score]]" in sent["body"]["messages"][-1]["content"]
    # Detection windows go to the scorer without their activation marks.
    assert "<<" not in json.dumps(handler.requests[3]["body"])
    assert judge.describe() == {"name": "openai", "model": "judge-model", "base_url": base_url}
    identity = judge.identity()
    assert identity["model"] == "judge-model" and identity["endpoint"] == base_url
    other = build_judge("openai", base_url=base_url, model="other-model", max_retries=0)
    assert other.identity() != identity and other.identity()["kind"] == "openai"


def test_openai_endpoint_failures_raise_before_work(
    fake_openai: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(ValueError, match=f"127.0.0.1:{port}/v1' is unreachable"):
        build_judge("openai", base_url=f"http://127.0.0.1:{port}/v1", probe_timeout_s=2)
    assert time.perf_counter() - started < 5
    base_url, handler = fake_openai
    handler.status_for_models = 401
    with pytest.raises(ValueError, match="rejected the API key"):
        build_judge("openai", base_url=base_url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="needs an API key"):
        build_judge("openai")
    with pytest.raises(ValueError, match="base_url='ftp://x' must be an http"):
        build_judge("openai", base_url="ftp://x")
    assert handler.requests == []  # no chat request was ever sent


def test_openai_request_failure_is_counted(
    fake_openai: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, _ = fake_openai
    judge = build_judge("openai", base_url=base_url, max_retries=0, timeout_s=2)
    judge.base_url = "http://127.0.0.1:9/v1"  # the server went away mid-run
    assert judge.rate("instruct", "text", "instruction") is None
    assert judge.parse_failures == 1


# ---------------------------------------------------------------------------------------------
# hf


def test_hf_judge_with_tiny_random_lm_counts_garbage(tiny_lm_dir: str) -> None:
    judge = build_judge("hf", model=tiny_lm_dir, max_new_tokens=8)
    assert judge.describe()["model"] == judge.identity()["model"]
    # A random model answers gibberish: no rating, one counted failure, no exception.
    assert judge.rate("concept", "Bake the bread.", "cooking") is None
    assert judge.parse_failures == 1
    assert judge.detect_or_none("cats", ["a cat", "a dog"]) is None
    assert judge.parse_failures == 2


def test_hf_judge_needs_a_named_model(
    tiny_lm: LoadedLM, tiny_lm_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(HF_JUDGE_MODEL_ENV, raising=False)
    # The evaluated LM is never silently its own judge.
    with pytest.raises(ValueError, match="judge 'hf' needs its judge model named"):
        build_judge("hf", lm=tiny_lm)
    monkeypatch.setenv(HF_JUDGE_MODEL_ENV, tiny_lm_dir)
    judge = build_judge("hf", lm=tiny_lm, max_new_tokens=8)
    assert judge.identity() == {
        "kind": "hf",
        "model": judge.lm.name,
        "endpoint": "local",
        "temperature": "0",
        "calibration": "",
    }
    assert judge.identity() != build_judge("offline").identity()


def test_hf_judge_bad_model_raises() -> None:
    with pytest.raises(ValueError, match="cannot load LM"):
        build_judge("hf", model="/nonexistent/judge/model.gguf")


# ---------------------------------------------------------------------------------------------
# offline

_CAT_EXAMPLES = [
    "The <<cat>> sat on the mat and purred softly at the dog",
    "my neighbour's <<cat>> caught a mouse in the garden yesterday",
    "a black <<cat>> crossed the road in front of the car",
    "feed the <<cat>> twice a day with dry food and water",
    "the kitten and the old <<cat>> slept together by the fire",
]
_RANDOM_TEXT = [
    "The function returns a list of integers sorted in ascending order",
    "Parse the configuration file and raise an error if a key is missing",
    "the stock market went down after the announcement of new tariffs",
    "import os and sys before reading the environment variables",
    "the weather in spring is mild with occasional showers",
    "Return the number of bytes written to the underlying stream",
    "The committee will meet again next Tuesday to discuss the budget",
    "Each thread acquires the lock before it touches the shared queue",
    "He parked the car near the station and walked to the office",
    "Compute the checksum of the data and compare it with the header",
]


@pytest.fixture(scope="module")
def offline() -> OfflineJudge:
    judge = build_judge("offline")
    assert isinstance(judge, OfflineJudge)
    judge.observe_corpus(_RANDOM_TEXT)
    return judge


def test_offline_detect_prefers_windows_matching_the_explanation(offline: OfflineJudge) -> None:
    explanation = offline.explain(_CAT_EXAMPLES)
    assert '"cat"' in explanation
    assert offline.explain(_CAT_EXAMPLES) == explanation  # deterministic
    matching = [
        "I saw a cat on the roof this morning",
        "the cat is hungry again, feed her",
        "she adopted a cat from the animal shelter",
        "our cat sleeps all day on the sofa",
    ]
    unrelated = [
        "The parser returns a tree of nodes",
        "interest rates rose again this quarter",
        "close the file when you are done writing",
        "the train to Berlin leaves at noon",
    ]
    hits_matching = sum(offline.detect(explanation, matching))
    hits_unrelated = sum(offline.detect(explanation, unrelated))
    assert hits_matching > hits_unrelated
    assert hits_matching >= 3 and hits_unrelated <= 1
    # An explanation the judge did not write falls back to a 5% false-positive cut.
    assert len(offline.detect("words about cats", matching)) == len(matching)


def test_offline_ratings(offline: OfflineJudge) -> None:
    on_topic = offline.rate(
        "concept", "The chef roasted vegetables and baked fresh bread for dinner.", "cooking"
    )
    off_topic = offline.rate("concept", "The rocket reached orbit around Mars.", "cooking")
    assert on_topic is not None and off_topic is not None and on_topic > off_topic
    answer = offline.rate(
        "instruct", "Paris is the capital of France.", "What is France's capital?"
    )
    assert answer == 2
    assert offline.rate("fluency", "the the the the the the the the the the the", "") == 0
    assert offline.rate("fluency", "The cat slept on the warm windowsill all afternoon.", "") == 2
    assert offline.rate("concept", "   ", "cooking") == 0
    with pytest.raises(ValueError, match="unknown rating kind 'style'"):
        offline.rate("style", "text", "ref")
    calibration = offline.describe()["rating_calibration"]
    assert set(calibration) == {"concept", "instruct", "fluency"}
    assert all(0 <= c["train_accuracy"] <= 1 for c in calibration.values())
    assert offline.parse_failures == 0


def test_measure_agreement(offline: OfflineJudge) -> None:
    items = [
        {"kind": "concept", "text": "Bake the bread at 200 degrees.", "reference": "cooking"},
        {"kind": "concept", "text": "The court adjourned.", "reference": "cooking"},
        {"kind": "fluency", "text": "bread bread bread bread bread bread", "reference": ""},
    ]
    result = measure_agreement(offline, offline, items)
    assert result["n"] == 3 and result["exact"] == 1.0 and result["within_one"] == 1.0


@pytest.mark.slow
def test_offline_fluency_from_smollm2_perplexity() -> None:
    from project.lm import load_lm

    judge = build_judge("offline", lm=load_lm())
    fluent = "The children walked to school together on a sunny morning."
    salad = "Tuesday quantum elbow the of purple running sky if carpet ninety"
    fluent_rating = judge.rate("fluency", fluent, "")
    salad_rating = judge.rate("fluency", salad, "")
    assert fluent_rating is not None and salad_rating is not None
    assert fluent_rating > salad_rating
    assert judge.describe()["fluency_lm"] == "smollm2-135m-instruct"
    # The default steering judge's agreement with hand ratings ships with the package.
    figures = measured_agreement(judge.identity())
    assert figures is not None and figures["concept_kappa"] >= 0.75


def test_offline_explanations_do_not_depend_on_the_process_hash_seed() -> None:
    """Marked tokens that tie in count are ranked in the order they are written, not in a
    set's per-process order: the same examples give the same explanation under any
    PYTHONHASHSEED (a study's runs and a re-run must steer toward the same concepts)."""
    import os
    import subprocess
    import sys

    words = [f" w{i:02d}" for i in range(30)]  # more candidates than the explainer keeps
    examples = [" ".join(f"<<{w}>>" for w in words[i::3]) for i in range(3)]
    script = (
        "import json, sys\n"
        "from project.judges import build_judge\n"
        "judge = build_judge('offline')\n"
        f"judge.observe_corpus({_RANDOM_TEXT!r})\n"
        f"print(json.dumps(judge.explain({examples!r})))\n"
    )
    outputs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(done.stdout.strip().splitlines()[-1])
    assert len(outputs) == 1, outputs
