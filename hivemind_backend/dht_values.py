"""How Python values and subkeys become DHT bytes, and back (docs/dht.md, "Value encoding").

Values read from the DHT come from other machines, so decoding must be safe on hostile input:
no pickle, no code paths that build arbitrary objects. The format is small and self-describing:

* ``bytes`` are stored **verbatim**, so C++ peers (and other tools) see exactly the bytes written,
  unless they happen to begin with ``MAGIC``: then they are encoded like any other value.
* Everything else is ``MAGIC`` followed by UTF-8 JSON in which every non-JSON type is an object
  with exactly one tag key:
  ``{"$b": "<base64>"}`` bytes, ``{"$t": [...]}`` tuple, ``{"$d": {...}}`` dict (str keys),
  ``{"$f": "nan" | "inf" | "-inf"}`` non-finite float. ``None``, ``bool``, ``int``, finite
  ``float``, ``str`` and ``list`` are plain JSON. Since every dict is tagged, a JSON object that is
  not one of these four shapes is malformed, and decoding refuses it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

# A zero byte first: no UTF-8 text and no JSON document starts with it.
MAGIC = b"\x00hmv1:"
# Nesting deeper than this is refused both ways: it bounds recursion on values from the network.
MAX_DEPTH = 100

PLAIN_TYPES = "None, bool, int, float, str, bytes, list, tuple or dict with str keys"

_TAGS = ("$b", "$t", "$d", "$f")


def _to_json(obj: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"DHT value is nested more than {MAX_DEPTH} levels deep")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)  # an IntEnum or other subclass is stored as the plain number
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {"$f": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, list):
        return [_to_json(item, depth + 1) for item in obj]
    if isinstance(obj, tuple):
        return {"$t": [_to_json(item, depth + 1) for item in obj]}
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"dict keys in DHT values must be str, got {type(key).__name__} ({key!r})"
                )
            out[key] = _to_json(value, depth + 1)
        return {"$d": out}
    raise TypeError(
        f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} in the DHT: values "
        f"must be {PLAIN_TYPES} (serialize other objects to bytes yourself)"
    )


def _from_json(obj: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_from_json(item, depth + 1) for item in obj]
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ValueError("an object that is not a tagged value")
    (tag, body), = obj.items()
    if tag == "$b" and isinstance(body, str):
        try:
            return base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as error:
            raise ValueError(f"bad base64 in a bytes value: {error}") from None
    if tag == "$t" and isinstance(body, list):
        return tuple(_from_json(item, depth + 1) for item in body)
    if tag == "$d" and isinstance(body, dict):
        return {key: _from_json(value, depth + 1) for key, value in body.items()}
    if tag == "$f" and body in ("nan", "inf", "-inf"):
        return float(body)
    raise ValueError(f"unknown tag {tag!r} (known: {', '.join(_TAGS)})")


def _reject_constant(name: str) -> Any:
    # json.loads would otherwise accept NaN/Infinity literals, which encode() never writes.
    raise ValueError(f"JSON constant {name} is not allowed")


def encode(value: Any) -> bytes:
    """The bytes stored in the DHT for ``value``; TypeError/ValueError for what cannot be stored."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if not raw.startswith(MAGIC):
            return raw
    text = json.dumps(
        _to_json(value, 0), ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )
    return MAGIC + text.encode("utf-8")


def decode(raw: bytes) -> Any:
    """The value ``encode`` was given; raises ValueError when ``raw`` is malformed."""
    if not raw.startswith(MAGIC):
        return raw
    try:
        text = raw[len(MAGIC):].decode("utf-8")
        parsed = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"malformed DHT value: {error}") from None
    try:
        return _from_json(parsed, 0)
    except ValueError as error:
        raise ValueError(f"malformed DHT value: {error}") from None


def encode_subkey(subkey: Any) -> bytes:
    """Subkeys use the value encoding (bytes verbatim); only str, bytes and int are accepted, so
    that every subkey read back is hashable and means the same on every peer."""
    if isinstance(subkey, bool) or not isinstance(subkey, (str, bytes, bytearray, memoryview, int)):
        raise TypeError(f"DHT subkeys must be str, bytes or int, got {type(subkey).__name__}")
    return encode(subkey)


def decode_subkey(raw: bytes) -> Any:
    subkey = decode(raw)
    if isinstance(subkey, bool) or not isinstance(subkey, (str, bytes, int)):
        raise ValueError(f"a subkey must be str, bytes or int, not {type(subkey).__name__}")
    return subkey


def encode_key(key: Any) -> bytes:
    """Keys are hashed, never read back: str is its UTF-8 bytes ("k" and b"k" are one key)."""
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"DHT keys must be str or bytes, got {type(key).__name__}")
