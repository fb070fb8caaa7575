"""Coverage-guided fuzz target (atheris/libFuzzer) for the request parser's pure parts.

Run by tests/test_fuzz.py::test_atheris_parser_and_json for a bounded time:

    python tests/atheris_target.py -max_total_time=20 -dict=tests/atheris_target.dict CORPUS

The first input byte picks the target; each asserts properties, and any
exception other than the documented rejection is a crash (libFuzzer exits 1
and writes the input under -artifact_prefix):

* ``split_target`` / ``normalise_path``: an accepted target is normalised
  (idempotent, one leading ``/``, no empty, ``.`` or ``..`` segments, no
  encoded ``/`` ``\\`` NUL or ``%25XX``, visible ASCII only) and routes
  without error;
* ``loads_strict``: an accepted body reads the same to a first-wins and a
  last-wins decoder as to the proxy, every value can be written as canonical
  JSON (the audit record), and JSON pointers resolve without error;
* the header/override checks and the lenient query counter never raise.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from proxy.canonical import canonical_json
    from proxy.pathnorm import MalformedTarget, normalise_path, split_target
    from proxy.requestcheck import header_verdict, override_param_verdict
    from proxy.routing import RouteTable, Template
    from proxy.stages.attributes import _loose_query_count, resolve_pointer
    from proxy.strictjson import JsonRejected, loads_strict

TABLE: RouteTable[str] = RouteTable.build([
    ("GET", Template.parse("/appointments"), "list"),
    ("POST", Template.parse("/appointments"), "create"),
    ("DELETE", Template.parse("/appointments/{appointment_id}"), "cancel"),
    ("GET", Template.parse("/patients/{patient_id}/history"), "history"),
])


def _path(data: bytes) -> None:
    raw = data.decode("latin-1")
    try:
        target = split_target(raw)
    except MalformedTarget:
        return
    path = target.path
    assert path.startswith("/"), path
    assert normalise_path(path) == path, (raw, path)
    assert all("\x21" <= ch <= "\x7e" for ch in path), path
    inner = path[1:-1] if path.endswith("/") and len(path) > 1 else path[1:]
    if inner:
        for seg in inner.split("/"):
            assert seg not in ("", ".", ".."), (raw, path)
    upper = path.upper()
    for bad in ("%2F", "%5C", "%00", "%2E", ";", "\\", "#"):
        assert bad not in upper, (raw, path, bad)
    for method in ("GET", "POST", "DELETE"):
        match = TABLE.match(method, path)
        if match is not None:
            for value in match.params.values():
                assert "/" not in value and value not in (".", ".."), (raw, value)
    _loose_query_count(target.query, "patient_id")


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return float(a) == float(b)
    return bool(a == b) and type(a) is type(b)


def _json(data: bytes, pointer: str) -> None:
    try:
        doc = loads_strict(data)
    except JsonRejected as exc:
        assert exc.reason in ("BadRequest_InvalidJson", "BadRequest_Ambiguous"), exc.reason
        return
    first = json.loads(data, object_pairs_hook=_first_wins)
    last = json.loads(data)
    assert _same(doc, first), data
    assert _same(doc, last), data
    canonical_json(doc)  # the audit record can always carry any accepted value
    resolve_pointer(doc, pointer)


def _headers(data: bytes) -> None:
    pairs = [tuple(line.split(b":", 1)) for line in data.split(b"\n") if b":" in line]
    header_verdict([(k, v) for k, v in pairs if len((k, v)) == 2])
    text = data.decode("latin-1")
    override_param_verdict(text, "application/x-www-form-urlencoded", data)
    override_param_verdict(text, "multipart/form-data; boundary=x", data)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 2)
    if which == 0:
        _path(fdp.ConsumeBytes(fdp.remaining_bytes()))
    elif which == 1:
        pointer = "/" + fdp.ConsumeUnicodeNoSurrogates(8)
        _json(fdp.ConsumeBytes(fdp.remaining_bytes()), pointer)
    else:
        _headers(fdp.ConsumeBytes(fdp.remaining_bytes()))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
