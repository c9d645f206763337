"""`services.common.webhooks.verify` is total: any header answers True or False, and only a right one is True."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.webhooks import sign, verify

SECRET = "whsec_test_secret_0123456789"
BODY = b'{"id":"del_1","event":"run.failed"}'
NOW = 1_780_000_000
GOOD = sign(SECRET, BODY, NOW)
MAC = GOOD.split("v1=", 1)[1]
CLOCK = float(NOW)  # what time.time() gives: a float, as in production

# Values for `t` and `v1` that broke the old parser (huge ints, non-ASCII digits, floats…) or are merely wrong.
ODD_VALUES = [
    "", " ", "0", "-1", "+1", str(NOW), f" {NOW} ", "1e9", "1_000", "0x10", "NaN", "inf", "9" * 400, "9" * 5000,
    "\u0661\u0662\u0663", "\U0001d7d9\U0001d7da", "\uff11\uff12",
    MAC, MAC.upper(), MAC[:-1], MAC + "0", "é" * 64, "\x00", "\ud800", "=", ",", "t=1",
]  # fmt: skip
near_miss_item = st.one_of(
    st.tuples(st.sampled_from(["t", "v1", "v0", " t", "T", "", "t ", "v1 "]), st.sampled_from(ODD_VALUES)).map(
        lambda kv: f"{kv[0]}={kv[1]}"
    ),
    st.sampled_from(["t", "v1", "", "=", "==", "t==1", "v1=="]),
    st.text(max_size=20),
)
near_miss = st.lists(near_miss_item, max_size=6).map(",".join)
# A `t=…` and a `v1=…` in any order, each value odd (huge, signed, non-ASCII…), among a few other items.
stamp_value = st.one_of(
    st.sampled_from(ODD_VALUES), st.just(str(NOW)), st.integers(-(10**500), 10**500).map(str), st.text(max_size=12)
)
mac_value = st.one_of(st.sampled_from(ODD_VALUES), st.text(min_size=62, max_size=66), st.text(max_size=8))
structured = (
    st.tuples(
        st.lists(
            st.one_of(stamp_value.map(lambda v: f"t={v}"), mac_value.map(lambda v: f"v1={v}")), min_size=2, max_size=4
        ),
        st.lists(near_miss_item, max_size=2),
    )
    .flatmap(lambda parts: st.permutations(parts[0] + parts[1]))
    .map(",".join)
)


@settings(max_examples=500, deadline=None)
@given(header=st.one_of(st.text(), near_miss, structured))
def test_no_header_string_makes_verify_raise(header: str) -> None:
    result = verify(SECRET, BODY, header, now=CLOCK)
    assert result in (True, False)
    assert result is False or MAC in header.lower()  # only the right MAC can verify


@settings(max_examples=300, deadline=None)
@given(secret=st.one_of(st.text(), st.binary()), body=st.binary(), header=near_miss, now=st.floats())
def test_no_secret_body_or_clock_makes_verify_raise(secret: str | bytes, body: bytes, header: str, now: float) -> None:
    assert verify(secret, body, header, now=now) in (True, False)


@pytest.mark.parametrize(
    "header",
    [
        "",
        ",",
        "t=,v1=",
        f"t={'9' * 5000},v1={MAC}",  # int() refuses >4300 digits
        f"t={'9' * 400},v1={MAC}",  # an int too large for a float
        f"t=\u0661\u0662\u0663,v1={MAC}",  # non-ASCII digits int() would take
        f"t={NOW},v1={'é' * 64}",  # compare_digest refuses non-ASCII str
        f"t={NOW},v1=\ud800",
        f"t={NOW}",  # no v1
        f"v1={MAC}",  # no t
        f"t={NOW},t={NOW},v1={MAC}",  # two timestamps
        f"t={NOW},v1",  # an item without `=`
        f"t={NOW}.5,v1={MAC}",
        f"t=-{NOW},v1={MAC}",
        f"t={NOW},v1={MAC[:-1]}",
        f"t={NOW},v1={MAC},x" * 2000,  # long
    ],
)
def test_malformed_headers_are_false(header: str) -> None:
    assert verify(SECRET, BODY, header, now=CLOCK) is False


def test_a_right_signature_verifies_in_every_tolerated_form() -> None:
    assert verify(SECRET, BODY, GOOD, now=CLOCK)
    assert verify(SECRET, BODY, f"t={NOW}, v1={MAC}", now=CLOCK)  # spaces after the comma
    assert verify(SECRET, BODY, f"v1={MAC},t={NOW}", now=CLOCK)  # order does not matter
    assert verify(SECRET, BODY, f"t={NOW},v1={'0' * 64},v1={MAC}", now=CLOCK)  # any v1 (a secret rotation)
    assert verify(SECRET, BODY, f"t={NOW},v1={MAC.upper()},v0=old", now=CLOCK)  # hex case, unknown keys ignored
    assert verify(SECRET.encode(), BODY, GOOD, now=CLOCK)
    assert not verify(SECRET, BODY, GOOD, now=CLOCK + 301)  # stale
    assert not verify(SECRET, BODY, GOOD, now=float("nan"))
    assert not verify(SECRET, BODY + b" ", GOOD, now=CLOCK)
    assert not verify("someone-else", BODY, GOOD, now=CLOCK)
    assert verify(SECRET, BODY, sign(SECRET, BODY))  # the wall clock


def test_100000_fuzzed_headers_never_raise_and_the_right_one_still_verifies() -> None:
    rng = random.Random(20261206)
    alphabet = "t=v1,0123456789abcdef ABCDEF-+._xé\u0661\x00\ud800"
    pieces = [f"t={NOW}", f"v1={MAC}", "t=", "v1=", "=", ",", "9" * 50, "\u0661", "é", " "]
    raised = 0
    verified = 0
    began = time.perf_counter()
    for i in range(100_000):
        kind = i % 4
        if kind == 0:
            header = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        elif kind == 1:
            header = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        elif kind == 2:  # the right header with one character changed, dropped or doubled
            at = rng.randrange(len(GOOD))
            edit = rng.choice(alphabet)
            header = rng.choice(
                [GOOD[:at] + edit + GOOD[at + 1 :], GOOD[:at] + GOOD[at + 1 :], GOOD[:at] + edit + GOOD[at:]]
            )
        else:
            header = f"t={rng.choice(ODD_VALUES)},v1={rng.choice(ODD_VALUES)}"
        try:
            verified += verify(SECRET, BODY, header, now=CLOCK)
        except Exception:
            raised += 1
    assert raised == 0
    assert verify(SECRET, BODY, GOOD, now=CLOCK)
    assert verified < 100_000  # near-misses are refused (a few edits keep it valid, e.g. a case change)
    assert time.perf_counter() - began < 60
