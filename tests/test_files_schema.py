"""The shared strict JSON readers."""

from __future__ import annotations

import math

import pytest

from tleg_deploy.errors import FormatError
from tleg_deploy.files import schema


def test_obj_required_optional_and_unknown_keys() -> None:
    assert schema.obj({"a": 1}, "x", {"a"}, {"b"}) == {"a": 1}
    assert schema.obj({"a": 1, "b": 2}, "x", {"a"}, {"b"})
    with pytest.raises(FormatError, match="field 'x' is missing key 'a'"):
        schema.obj({"b": 2}, "x", {"a"}, {"b"})
    with pytest.raises(FormatError, match="field 'x' has unexpected key 'c'"):
        schema.obj({"a": 1, "c": 3}, "x", {"a"}, {"b"})
    with pytest.raises(FormatError, match="must be a JSON object, got list"):
        schema.obj([], "x", None)


def test_header_names_format_then_version() -> None:
    schema.header({"format": "f", "schema_version": 1}, "a file", "f", 1)
    with pytest.raises(FormatError, match="field 'format' is 'g'"):
        schema.header({"format": "g", "schema_version": 1, "junk": 0}, "a file", "f", 1)
    with pytest.raises(FormatError, match="schema_version' is 2; this version reads 1") as e:
        schema.header({"format": "f", "schema_version": 2}, "a file", "f", 1, hint="upgrade")
    assert e.value.hint == "upgrade"


@pytest.mark.parametrize("good", ["a", "depth_01/model.onnx", "a b/c.json"])
def test_relative_path_accepts_plain_paths(good: str) -> None:
    assert schema.relative_path(good, "f") == good


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a/..", "./a", "a//b", "a/", "C:x",
                                 "a\\..\\b", None, 3])
def test_relative_path_refuses_escapes(bad: object) -> None:
    with pytest.raises(FormatError, match="field 'f'"):
        schema.relative_path(bad, "f")


def test_numbers_and_hashes() -> None:
    assert schema.number(3, "n") == 3.0
    for bad in (math.nan, math.inf, True, "1"):
        with pytest.raises(FormatError, match="finite number"):
            schema.number(bad, "n")
    with pytest.raises(FormatError, match=r"field 'doc.a\[1\].b'"):
        schema.finite_numbers({"a": [1.0, {"b": -math.inf}]}, "doc")
    schema.sha256_hex("0" * 64, "h")
    for bad in ("0" * 63, "G" * 64, "A" * 64, None):
        with pytest.raises(FormatError, match="sha256"):
            schema.sha256_hex(bad, "h")
    with pytest.raises(FormatError, match="must be >= 1"):
        schema.integer(0, "i", minimum=1)
