"""The plain-data wire format between sandbox, judge and trainer: exact round trips of every plain type,
nothing but builtin types out of `decode`, and hostile bytes refused (only DecodeError, quickly)."""

from __future__ import annotations

import collections
import math
import random
import time

import pytest

from rlcore_tasks.plaindata import (MAX_DEPTH, DecodeError, NotPlain, decode, encode, extension, iterator)

PLAIN = (type(None), bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)


def same(a: object, b: object) -> bool:
    """Equal, of the same exact types all the way down, NaN equal to NaN and -0.0 told from 0.0."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is complex:
        return same(a.real, b.real) and same(a.imag, b.imag)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


VALUES = [None, True, False, 0, -1, 255, 10 ** 5000, -(2 ** 100), 1.5, -0.0, float("nan"), float("inf"), float("-inf"),
          5e-324, 1.7976931348623157e308, 3 - 4j, complex(float("nan"), 1), "", "é ✓ \U0001f600", "\ud800 lone surrogate",
          "a:b;c\n", b"", b"\x00\xff:;", [], (), set(), frozenset(), {}, [1, (2, "a"), {3: [4.5]}, frozenset({5})],
          {(1, 2): {"a": None}, "k": [True, b"x"]}, {1, "1", (1,)}, [[[[]]]], list(range(1000))]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_round_trips_exactly(value):
    assert same(decode(encode(value)), value)


def test_integers_and_floats_travel_in_hex_beyond_the_decimal_digit_limit():
    big = 7 ** 20000  # ~17k decimal digits, over Python's 4300-digit str() limit
    assert encode(255) == b"iff;" and encode(-16) == b"i-10;" and encode(1.5) == b"f0x1.8000000000000p+0;"
    assert decode(encode(big)) == big


def test_non_plain_objects_are_refused_or_replaced():
    class Liar(int):
        def __eq__(self, other):
            return True

    for value in (Liar(3), [Liar(3)], collections.Counter(a=1), object(), print, range(3), bytearray(b"x")):
        with pytest.raises(NotPlain):
            encode(value)
    assert decode(encode([Liar(3)], other=lambda o: int.__int__(o))) == [3]
    assert type(decode(encode(Liar(3), other=int))) is int
    with pytest.raises(NotPlain):  # a stand-in must be plain itself
        encode(Liar(3), other=lambda o: Liar(4))


def test_extensions_are_decoded_only_where_allowed():
    data = encode(["x", 7], other=lambda o: o)
    assert decode(data) == ["x", 7]
    ref, name, raised = extension(b"R", 12), extension(b"G", "int"), extension(b"E", "ValueError")
    for tag, value in ((ref, 12), (name, "int"), (raised, "ValueError")):
        with pytest.raises(DecodeError, match="not allowed"):
            decode(bytes(tag))
        assert decode(bytes(tag), {bytes(tag[:1]): lambda v: ("got", v)}) == ("got", value)
    wrapped = encode([object()], other=lambda o: ref)
    assert decode(wrapped, {b"R": lambda v: f"ref {v}"}) == ["ref 12"]


def test_iterators_are_sent_as_their_items_and_decoded_as_an_iterator():
    data = encode((x * x for x in range(4)), other=lambda o: iterator(list(o)))
    value = decode(data)
    assert iter(value) is value and list(value) == [0, 1, 4, 9]


def test_depth_and_budget_are_bounded():
    deep: list = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(NotPlain, match="deeply"):
        encode(deep)
    with pytest.raises(DecodeError, match="deeply"):
        decode(b"l1:" * (MAX_DEPTH + 1) + b"N")
    assert decode(b"l1:" * MAX_DEPTH + b"N") is not None
    with pytest.raises(NotPlain, match="bytes"):
        encode("x" * 100, budget=50)


@pytest.mark.parametrize("data", [
    b"", b"x", b"i;", b"i-;", b"i1", b"i1-;", b"ig;", b"l2:i1;", b"S1:l0:", b"d1:l0:N", b"s5:ab", b"N N", b"NN",
    b"s99999999999999:", b"s-1:", b"s1x:a", b"f;", b"fx;", b"f1p99999999;", b"c1;", b"c1,2,3;", b"s2:\xff\xfe",
    b"d1:S0:N", b"R1;", b"G3:int", b"l1:", b"t1:" * 3, b"i" + b"1" * 100,
])
def test_malformed_bytes_are_refused(data):
    with pytest.raises(DecodeError):
        decode(data)


def test_random_corruptions_only_ever_raise_decode_error():
    """Every byte string derived from valid encodings (cut, flipped, spliced) decodes to plain builtin
    values or raises DecodeError, and none takes long."""
    rng = random.Random(0)
    seeds = [encode(v) for v in VALUES if type(v) is not int or v < 10 ** 100]
    alphabet = b"NTFiflcsbtSZdIRGE0123456789:;-,.xp"
    start = time.perf_counter()
    for _ in range(20000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op, at = rng.random(), rng.randrange(len(data) + 1)
            if op < 0.3:
                data[at:at] = bytes([rng.choice(alphabet)])
            elif op < 0.6 and data:
                data[min(at, len(data) - 1)] = rng.choice(alphabet)
            elif op < 0.8:
                del data[at:at + rng.randint(1, 5)]
            else:
                data[at:at] = rng.choice(seeds)
        try:
            value = decode(bytes(data))
        except DecodeError:
            continue
        todo = [value]
        while todo:
            item = todo.pop()
            assert type(item) in PLAIN or type(item).__name__ == "list_iterator"
            if type(item) in (list, tuple, set, frozenset):
                todo += list(item)
            elif type(item) is dict:
                todo += [*item, *item.values()]
    assert time.perf_counter() - start < 30
