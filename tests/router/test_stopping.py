"""Stop sequences across tokens, inside tokens, and huge ones in linear time."""

from __future__ import annotations

import random
import time

import pytest

from router.text.stopping import StopMatch, StopSequenceMatcher


def push_all(matcher: StopSequenceMatcher, pieces: list[str]) -> list[str | None]:
    return [matcher.push(piece) for piece in pieces]


def test_split_across_tokens():
    matcher = StopSequenceMatcher(["world"])
    assert push_all(matcher, ["hel", "lo", " wor", "ld", "!"]) == [None, None, None, "world", None]
    assert matcher.match == StopMatch("world", end=2, offset=11)


def test_one_character_per_token():
    matcher = StopSequenceMatcher(["\n\nUser:"])
    results = push_all(matcher, list("Sure.\n\nUser: hi"))
    assert results.index("\n\nUser:") == len("Sure.\n\nUser:") - 1


def test_inside_a_token_text():
    """TGI's `s$` regex would miss this: the token's text goes on after the stop sequence."""
    matcher = StopSequenceMatcher(["STOP"])
    assert matcher.push("abc STOP def") == "STOP"
    assert matcher.match == StopMatch("STOP", end=8, offset=8)


def test_at_the_start():
    matcher = StopSequenceMatcher(["Hello"])
    assert matcher.push("Hello") == "Hello"
    assert matcher.match.offset == 5
    matcher = StopSequenceMatcher(["H"])
    assert matcher.push("Hi") == "H" and matcher.match.end == 1


def test_no_match_and_no_stops():
    matcher = StopSequenceMatcher(["xyz"])
    assert push_all(matcher, ["xy", "a", "yz", "x y z"]) == [None] * 4
    assert matcher.match is None and matcher.num_chars == 10
    assert StopSequenceMatcher([]).push("anything") is None
    assert StopSequenceMatcher(["", ""]).push("anything") is None  # empty stops are ignored


def test_earliest_match_wins_then_list_order():
    matcher = StopSequenceMatcher(["late", "ear"])
    assert matcher.push("learn late") == "ear"
    matcher = StopSequenceMatcher(["the end", "end"])
    assert matcher.push("this is the end") == "the end"  # same end: the first listed
    matcher = StopSequenceMatcher(["end", "the end"])
    assert matcher.push("this is the end") == "end"


def test_multiple_stops_split_across_tokens():
    matcher = StopSequenceMatcher(["<|user|>", "###", "\n\n"])
    assert push_all(matcher, ["a", "<|us", "er", "##", "#|>"]) == [None, None, None, None, "###"]
    assert matcher.match == StopMatch("###", end=1, offset=10)


def test_only_the_first_match_is_reported():
    matcher = StopSequenceMatcher(["a"])
    assert push_all(matcher, ["a", "a"]) == ["a", None]
    assert matcher.matched == "a" and matcher.match.offset == 1


@pytest.mark.parametrize(
    "stop, pieces, offset",
    [
        ("aab", ["a", "a", "a", "b"], 4),  # KMP falls back from "aa" to "a"
        ("abab c", ["ab", "ab", "ab", " ", "c x"], 8),
        ("abcabd", ["abcab", "cabd"], 9),
        ("😀 日本", ["x😀", " 日", "本語"], 5),
    ],
)
def test_self_overlapping_stops(stop, pieces, offset):
    matcher = StopSequenceMatcher([stop])
    assert push_all(matcher, pieces)[-1] == stop
    assert matcher.match.offset == offset


def brute_force(stops: list[str], text: str) -> tuple[str, int] | None:
    """(stop, offset) of the match that ends first; ties go to the first listed."""
    found = [(text.find(s) + len(s), i) for i, s in enumerate(stops) if s in text]
    if not found:
        return None
    end, i = min(found)
    return stops[i], end


def random_pieces(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_random_against_brute_force():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 40)))
        stops = [
            "".join(rng.choice("ab c") for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 4))
        ]
        matcher = StopSequenceMatcher(stops)
        push_all(matcher, random_pieces(rng, text))
        got = (matcher.match.stop, matcher.match.offset) if matcher.match else None
        assert got == brute_force(stops, text), (stops, text)


# ---- huge stop sequences (a 2 MB payload allows a 1.9 MB stop) ----

HUGE = 1_900_000


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_huge_stops_cost_nothing_on_ordinary_text():
    matcher = StopSequenceMatcher(["ab" * (HUGE // 2), "x" * HUGE, "a" * HUGE])
    pieces = [" the", " quick", " brown", " fox", " jumps", "\n"] * 2000
    assert timed(lambda: push_all(matcher, pieces)) < 1.0
    assert matcher.match is None


def test_huge_stop_generated_in_chunks_is_found():
    rng = random.Random(0)
    stop = "".join(rng.choices("abc ", k=HUGE))
    matcher = StopSequenceMatcher([stop])
    pieces = ["prefix "] + [stop[i : i + 1000] for i in range(0, HUGE, 1000)] + ["tail"]
    results = []
    assert timed(lambda: results.extend(push_all(matcher, pieces))) < 1.0
    assert results[-2] == stop and matcher.match.offset == len("prefix ") + HUGE


def test_huge_stop_in_one_huge_push():
    stop = "ab" * (HUGE // 2)
    matcher = StopSequenceMatcher([stop])
    assert timed(lambda: matcher.push("x" + stop + "y")) < 1.0
    assert matcher.match == StopMatch(stop, end=HUGE + 1, offset=HUGE + 1)


def test_huge_periodic_stop_adversarial_output_is_linear():
    """Output that almost matches a periodic stop everywhere: KMP's table is built once, lazily,
    and each character is handled in amortized O(1), whatever the stop length."""
    stop = "a" * (HUGE - 1) + "b"
    matcher = StopSequenceMatcher([stop, "ab" * (HUGE // 2)])
    pieces = ["a" * 7] * (HUGE // 7 + 100) + ["b"]
    assert timed(lambda: push_all(matcher, pieces)) < 10.0
    assert matcher.match.stop == stop and matcher.match.offset == 7 * len(pieces) - 6
