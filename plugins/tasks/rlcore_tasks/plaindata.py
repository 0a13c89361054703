"""Plain data on the wire between the code task's processes: a strict, tagged byte format for the values
a test compares (None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict), with
three extension tags: `R` a reference to an object kept in the sandbox, `G` a builtin by name, and `E` a
raised exception by name.

The sandbox encodes what a solution returns; the judge decodes it (`decode`), so decoding is written for
hostile input: an iterative parser (no recursion), every length checked against the bytes that are left,
a depth limit, and nothing built but the builtin types above. Decoded values have builtin types only, so
comparing them never runs code of the program (no `__eq__` of its making). Integers and floats travel in
hexadecimal (`float.hex`), exactly and without Python's limit on decimal digits.

This file runs inside the sandbox and the judge too (its source is prepended to theirs): standard
library only, no imports at all.
"""

MAX_DEPTH = 200
"""Deepest nesting decoded; deeper data is refused (no real test result nests this far)."""
SCALARS = {b"N": None, b"T": True, b"F": False}
SEQUENCES = {b"l": list, b"t": tuple, b"S": set, b"Z": frozenset, b"I": iter}
HEX = frozenset(b"-0123456789abcdef")
FLOAT = frozenset(b"-+0123456789abcdefinpx.")


class DecodeError(ValueError):
    """The bytes are not well-formed plain data."""


class NotPlain(TypeError):
    """A value that has no plain-data encoding."""


class Encoded(bytes):
    """An extension's encoding (`extension`), written as it is."""


class Items(list):
    """The items of an iterator or generator (`iterator`), decoded as an iterator over them."""


SEQUENCE_TAGS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"Z", Items: b"I"}


def extension(tag, value):
    """The encoding of a reference (`R`, an int) or a builtin or exception name (`G`, `E`, a str)."""
    if tag == b"R":
        return Encoded(b"R%d;" % value)
    data = value.encode("utf-8", "surrogatepass")
    return Encoded(tag + b"%d:" % len(data) + data)


def iterator(items):
    """What `encode`'s `other` returns for an iterator or generator materialized into `items`."""
    return Items(items)


def encode(value, other=None, budget=1 << 30):
    """`value` as bytes. An object of no plain type (exactly: subclasses are not plain) goes to
    `other(obj)`, which returns a plain stand-in, `extension(...)` or `iterator(...)` to encode in its
    place, or raises NotPlain; without `other` it is NotPlain. NotPlain past `budget` bytes or MAX_DEPTH."""
    out = []
    size = 0
    todo = [(value, 0, False)]
    while todo:
        obj, depth, replaced = todo.pop()
        if depth > MAX_DEPTH:
            raise NotPlain("nested too deeply")
        t = type(obj)
        if obj is None:
            part = b"N"
        elif obj is True:
            part = b"T"
        elif obj is False:
            part = b"F"
        elif t is int:
            part = b"i%x;" % obj
        elif t is float:
            part = b"f" + float.hex(obj).encode() + b";"
        elif t is complex:
            part = b"c" + float.hex(obj.real).encode() + b"," + float.hex(obj.imag).encode() + b";"
        elif t is str:
            data = obj.encode("utf-8", "surrogatepass")
            part = b"s%d:" % len(data) + data
        elif t is bytes:
            part = b"b%d:" % len(obj) + obj
        elif t in SEQUENCE_TAGS:
            part = SEQUENCE_TAGS[t] + b"%d:" % len(obj)
            todo.extend((item, depth + 1, False) for item in reversed(list(obj)))
        elif t is dict:
            part = b"d%d:" % len(obj)
            for key, item in reversed(list(obj.items())):
                todo.append((item, depth + 1, False))
                todo.append((key, depth + 1, False))
        elif t is Encoded:
            part = bytes(obj)
        elif other is None or replaced:
            raise NotPlain(f"{t.__name__} is not plain data")
        else:
            todo.append((other(obj), depth, True))
            continue
        size += len(part)
        if size > budget:
            raise NotPlain(f"more than {budget} bytes")
        out.append(part)
    return b"".join(out)


def decode(data, extensions=None):
    """The value encoded in `data` (bytes), built from builtin types only. Extension tags go to
    `extensions[tag](value)` (value: the int of `R`, the str of `G` / `E`), and are refused (DecodeError)
    when it has no entry for them. DecodeError on anything malformed, trailing bytes included."""
    extensions = extensions or {}
    pos, end = 0, len(data)
    stack = []  # [constructor, items still to read, items]
    result = None
    while True:
        if pos >= end:
            raise DecodeError("truncated")
        tag = data[pos:pos + 1]
        pos += 1
        if tag in SCALARS:
            value = SCALARS[tag]
        elif tag in (b"i", b"f", b"c", b"R"):
            stop = data.find(b";", pos, pos + (end if tag == b"i" else 80))
            if stop < 0:
                raise DecodeError(f"unterminated {tag.decode()} value")
            text = data[pos:stop]
            pos = stop + 1
            value = _number(tag, text)
            if tag == b"R":
                value = _extension(extensions, tag, value)
        elif tag in (b"s", b"b", b"G", b"E"):
            n, pos = _length(data, pos, end)
            raw = data[pos:pos + n]
            pos += n
            if tag == b"b":
                value = bytes(raw)
            else:
                try:
                    value = raw.decode("utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    raise DecodeError("invalid UTF-8") from None
                if tag != b"s":
                    value = _extension(extensions, tag, value)
        elif tag in SEQUENCES or tag == b"d":
            n, pos = _length(data, pos, end)
            if len(stack) >= MAX_DEPTH:
                raise DecodeError("nested too deeply")
            stack.append([tag, 2 * n if tag == b"d" else n, []])
            if n:
                continue
            value = _build(*stack.pop()[::2])
        else:
            raise DecodeError(f"unknown tag {tag!r} at byte {pos - 1}")
        while stack:  # attach the finished value to its container, closing every container it completes
            top = stack[-1]
            top[2].append(value)
            top[1] -= 1
            if top[1]:
                break
            value = _build(top[0], top[2])
            stack.pop()
        if not stack:
            result = value
            break
    if pos != end:
        raise DecodeError(f"{end - pos} bytes after the value")
    return result


def _length(data, pos, end):
    """A `<decimal>:` length at `pos` that fits in the rest of `data`; (length, position after `:`)."""
    stop = data.find(b":", pos, pos + 12)
    digits = data[pos:stop]
    if stop < 0 or not digits.isdigit():
        raise DecodeError(f"bad length at byte {pos}")
    n = int(digits)
    if n > end - stop - 1:
        raise DecodeError(f"length {n} past the end")
    return n, stop + 1


def _number(tag, text):
    if tag == b"R":
        if not text.isdigit() or len(text) > 12:
            raise DecodeError("bad reference")
        return int(text)
    if tag == b"i":
        if not HEX.issuperset(text) or b"-" in text[1:] or text in (b"", b"-"):
            raise DecodeError("bad int")
        return int(text, 16)
    parts = text.split(b",") if tag == b"c" else [text]
    if len(parts) != (2 if tag == b"c" else 1) or not all(p and FLOAT.issuperset(p) for p in parts):
        raise DecodeError("bad float")
    try:
        values = [float.fromhex(p.decode()) for p in parts]
    except (ValueError, OverflowError):
        raise DecodeError("bad float") from None
    return complex(*values) if tag == b"c" else values[0]


def _extension(extensions, tag, value):
    if tag not in extensions:
        raise DecodeError(f"tag {tag.decode()} is not allowed here")
    return extensions[tag](value)


def _build(tag, items):
    if tag == b"d":
        pairs = zip(items[::2], items[1::2])
        try:
            result = {}
            for key, item in pairs:
                result[key] = item
            return result
        except TypeError:
            raise DecodeError("unhashable dict key") from None
    try:
        return SEQUENCES[tag](items)
    except TypeError:
        raise DecodeError("unhashable set element") from None
