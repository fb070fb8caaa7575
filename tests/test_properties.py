"""Property tests (hypothesis): path normalisation, canonical JSON, fingerprints,
request ids and the audit hash chain."""

from __future__ import annotations

import string
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.audit.chain import Break, ChainCheck, record_hash, seal, verify_records
from proxy.canonical import canonical_body, canonical_json, fingerprint
from proxy.pathnorm import MalformedTarget, normalise_path, split_target
from proxy.routing import OverlapError, RouteTable, Template
from proxy.stages.ratelimit import budget_periods
from proxy.stages.replay import parse_request_id, scoped_key

UNRESERVED = string.ascii_letters + string.digits + "-._~"
SAFE_PCHAR = UNRESERVED + "!$&'()*+,=:@"

# ------------------------------------------------------------ paths

segment = st.one_of(
    st.text(alphabet=SAFE_PCHAR, min_size=0, max_size=8),
    st.sampled_from([".", "..", "", "%41", "%7e", "%7E", "%20", "%2e", "%2E", "%2f", "%00",
                     "%C3%A9", "%c0%ae", "%zz", "%4", ";x", "\\", "a%2Eb"]),
)
raw_path = st.lists(segment, min_size=0, max_size=8).map(lambda segs: "/" + "/".join(segs))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(raw_path)
def test_normalisation_is_idempotent_and_clean(raw: str) -> None:
    try:
        norm = normalise_path(raw)
    except MalformedTarget:
        return
    assert normalise_path(norm) == norm
    assert norm.startswith("/")
    assert "//" not in norm
    segs = norm.split("/")[1:]
    assert "." not in segs and ".." not in segs
    assert all("\x21" <= c <= "\x7e" for c in norm)
    for bad in ("%2F", "%2f", "%00", "\\", ";", "%5C", "%5c"):
        assert bad not in norm
    # escapes that remain are upper-case and never of an unreserved character
    i = norm.find("%")
    while i != -1:
        esc = norm[i + 1:i + 3]
        assert esc == esc.upper()
        assert chr(int(esc, 16)) not in UNRESERVED
        i = norm.find("%", i + 3)


@given(st.lists(st.text(alphabet=UNRESERVED, min_size=1, max_size=6), min_size=1, max_size=5),
       st.data())
def test_decoding_unreserved_escapes_does_not_change_normal_form(
        segs: list[str], data: st.DataObject) -> None:
    plain = "/" + "/".join(segs)
    assume(not any(s in (".", "..") for s in segs))
    encoded = "".join(
        f"%{ord(c):02X}" if c != "/" and data.draw(st.booleans()) else c for c in plain)
    try:
        got = normalise_path(encoded)
    except MalformedTarget:
        # only a segment that decodes to '.' or '..' may be rejected
        assert any(set(s) <= {"."} for s in segs)
        return
    assert got == normalise_path(plain)


REJECT = ["/a/%2e%2e/b", "/a/%2E/b", "/%2fetc", "/a%5cb", "/a\\b", "/a;b", "/a/%00", "/a/%zz",
          "/a/%4", "/..", "/a/../..", "/a/%C0%AE%C0%AE", "/a/\x00", "/caf\u00e9", "relative", "",
          "/a b", "/a#b", "/a/\x7f"]


@pytest.mark.parametrize("raw", REJECT)
def test_rejected_paths(raw: str) -> None:
    with pytest.raises(MalformedTarget):
        normalise_path(raw)


ACCEPT = [("/a//b/./c/../d", "/a/b/d"), ("/a/%7Euser", "/a/~user"), ("/a/b/..", "/a/"),
          ("/a/%41%20", "/a/A%20"), ("/", "/"), ("//", "/"), ("/a/", "/a/"), ("/a/.", "/a/"),
          ("/a/%c3%a9", "/a/%C3%A9"), ("/a.b/c..d", "/a.b/c..d")]


@pytest.mark.parametrize(("raw", "want"), ACCEPT)
def test_accepted_paths(raw: str, want: str) -> None:
    assert normalise_path(raw) == want


def test_query_is_kept_but_checked() -> None:
    assert split_target("/a?x=1&y=%20").path_and_query == "/a?x=1&y=%20"
    for bad in ("/a?x=%00", "/a?x=%g1", "/a?x=%4", "/a?x=\x01"):
        with pytest.raises(MalformedTarget):
            split_target(bad)


# ------------------------------------------------------------ canonical JSON and fingerprints

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20)


def _shuffled(value: Any, rnd: Any) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@settings(max_examples=300)
@given(json_value, st.randoms())
def test_canonical_json_round_trips_and_ignores_key_order(value: Any, rnd: Any) -> None:
    out = canonical_json(value)
    assert orjson.loads(out) == value
    assert canonical_json(_shuffled(value, rnd)) == out
    out.decode("utf-8")
    # no whitespace outside strings: re-serialising compactly gives the same bytes
    assert orjson.dumps(orjson.loads(out), option=orjson.OPT_SORT_KEYS) == out


@given(st.dictionaries(st.text(max_size=5), json_scalar, max_size=5), st.randoms())
def test_fingerprint_ignores_json_layout(doc: dict[str, Any], rnd: Any) -> None:
    a = orjson.dumps(doc)
    b = orjson.dumps(_shuffled(doc, rnd), option=orjson.OPT_INDENT_2)
    ct = "application/json"
    assert fingerprint("t", "POST", "/p", canonical_body(a, ct)) == fingerprint(
        "t", "POST", "/p", canonical_body(b, ct))


@given(st.binary(max_size=50), st.binary(max_size=50))
def test_non_json_bodies_are_byte_exact(a: bytes, b: bytes) -> None:
    assume(a != b)
    assert canonical_body(a, "text/plain") == a
    assert fingerprint("t", "POST", "/p", canonical_body(a, "text/plain")) != fingerprint(
        "t", "POST", "/p", canonical_body(b, "text/plain"))


@given(st.text(min_size=1, max_size=8), st.sampled_from(["GET", "POST", "DELETE"]),
       st.text(max_size=8), st.binary(max_size=16), st.integers(0, 3), st.text(max_size=4))
def test_fingerprint_changes_with_every_part(tool: str, method: str, path: str, body: bytes,
                                             which: int, extra: str) -> None:
    base = fingerprint(tool, method, path, body)
    assert base == fingerprint(tool, method, path, body)
    parts: list[Any] = [tool, method, path, body]
    if which == 3:
        parts[3] = body + b"x"
    elif which == 1:
        parts[1] = "PATCH" if method != "PATCH" else "PUT"
    else:
        parts[which] = parts[which] + (extra or "x")
    assert fingerprint(*parts) != base


def test_fingerprint_parts_are_length_prefixed() -> None:
    assert fingerprint("ab", "POST", "c", b"") != fingerprint("a", "POST", "bc", b"")
    assert fingerprint("t", "POST", "/a", b"b") != fingerprint("t", "POST", "/ab", b"")


# ------------------------------------------------------------ request ids


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1,
               max_size=255))
def test_printable_ids_are_accepted(rid: str) -> None:
    assume(rid.strip() and not (rid.strip().startswith('"') and rid.strip().endswith('"')))
    assert parse_request_id(rid) == rid.strip()


@pytest.mark.parametrize(("raw", "want"), [('"abc"', "abc"), ("x" * 255, "x" * 255),
                                           ("x" * 256, None), ("", None), ('""', None),
                                           ("a\x00b", None), ("caf\u00e9", None),
                                           ("tab\tid", None)])
def test_request_id_table(raw: str, want: str | None) -> None:
    assert parse_request_id(raw) == want


@given(st.text(max_size=10), st.text(max_size=10), st.text(min_size=1, max_size=10))
def test_keys_are_scoped_by_principal(p1: str, p2: str, rid: str) -> None:
    assume(p1 != p2)
    assert scoped_key(p1, rid) != scoped_key(p2, rid)
    assert scoped_key(p1 + rid[:1], rid[1:]) != scoped_key(p1, rid)


# ------------------------------------------------------------ routing


@settings(max_examples=100)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "{p}"]), min_size=1, max_size=4),
                min_size=1, max_size=12, unique_by=tuple), st.data())
def test_routes_match_what_they_describe(shapes: list[list[str]], data: st.DataObject) -> None:
    entries = []
    for i, segs in enumerate(shapes):
        named = [f"{{p{j}}}" if s == "{p}" else s for j, s in enumerate(segs)]
        entries.append(("GET", Template.parse("/" + "/".join(named)), i))
    try:
        table = RouteTable.build(entries)
    except OverlapError:
        return
    for _method, template, value in entries:
        values = {}
        segs = []
        for is_param, text in template.parts:
            if is_param:
                v = data.draw(st.text(alphabet="xyz0123456789", min_size=1, max_size=4))
                values[text] = v
                segs.append(v)
            else:
                segs.append(text)
        m = table.match("GET", "/" + "/".join(segs))
        assert m is not None and m.value == value
        assert dict(m.params) == values
        assert table.match("POST", "/" + "/".join(segs)) is None


@pytest.mark.parametrize(("a", "b"), [("/a/{x}", "/a/b"), ("/a/{x}/c", "/a/{y}/c"),
                                      ("/{x}/{y}", "/a/b"), ("/a", "/a")])
def test_overlaps_rejected(a: str, b: str) -> None:
    with pytest.raises(OverlapError):
        RouteTable.build([("GET", Template.parse(a), 1), ("GET", Template.parse(b), 2)])
    RouteTable.build([("GET", Template.parse(a), 1), ("POST", Template.parse(b), 2)])


def test_trailing_slash_is_distinct_and_large_tables_work() -> None:
    entries = [("GET", Template.parse(f"/r{i}/{{id}}/s{i % 7}"), i) for i in range(5000)]
    entries.append(("GET", Template.parse("/r1/{id}/s1/"), -1))
    table = RouteTable.build(entries)
    assert table.match("GET", "/r4999/x/s3") is None  # 4999 % 7 == 1
    assert table.match("GET", "/r4999/x/s1").value == 4999  # type: ignore[union-attr]
    assert table.match("GET", "/r1/x/s1/").value == -1  # type: ignore[union-attr]
    assert table.match("GET", "/r1/x/s2") is None


# ------------------------------------------------------------ hash chain

record = st.fixed_dictionaries({
    "event_id": st.text(alphabet=string.hexdigits, min_size=4, max_size=8),
    "kind": st.sampled_from(["decision", "outcome", "replay"]),
    "decision": st.sampled_from(["ALLOW", "DENY"]),
    "status": st.integers(100, 599),
    "reason_codes": st.lists(st.sampled_from(["A", "B", "Route_NotMapped"]), max_size=2),
    "attrs": st.dictionaries(st.text(max_size=4), st.text(max_size=6), max_size=3),
})


def build_chain(chain_id: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    prev = ""
    out = []
    for i, rec in enumerate(records, start=1):
        sealed = seal(dict(rec), chain_id, i, prev)
        prev = sealed["hash"]
        out.append(sealed)
    return out


@settings(max_examples=150)
@given(st.lists(record, min_size=2, max_size=15), st.lists(record, min_size=1, max_size=5),
       st.data())
def test_chain_verifies_and_every_tamper_is_named(
        recs: list[dict[str, Any]], other: list[dict[str, Any]], data: st.DataObject) -> None:
    chain = build_chain("a", recs)
    second = build_chain("b", other)
    results = list(verify_records(chain + second))
    assert [type(r) for r in results] == [ChainCheck, ChainCheck]
    assert [r.count for r in results if isinstance(r, ChainCheck)] == [len(recs), len(other)]

    i = data.draw(st.integers(0, len(chain) - 1))
    kind = data.draw(st.sampled_from(["modify", "delete", "insert", "swap"]))
    tampered = [dict(r) for r in chain]
    if kind == "modify":
        tampered[i]["status"] = tampered[i]["status"] + 1
        expect_seq = i + 1
    elif kind == "delete":
        assume(i < len(chain) - 1)  # deleting the tail is only visible to a digest
        del tampered[i]
        expect_seq = i + 2
    elif kind == "insert":
        forged = seal({"event_id": "forged", "kind": "decision"}, "a", i + 1,
                      tampered[i - 1]["hash"] if i else "")
        tampered.insert(i, forged)
        for j, r in enumerate(tampered[i + 1:], start=i + 2):
            r["seq"] = j  # renumber to hide the gap; the hashes still betray it
        expect_seq = i + 2
    else:
        assume(i < len(chain) - 1)
        tampered[i], tampered[i + 1] = tampered[i + 1], tampered[i]
        expect_seq = i + 1
    found = [r for r in verify_records(tampered + second) if isinstance(r, Break)]
    assert len(found) == 1
    assert found[0].chain_id == "a"
    assert found[0].seq == expect_seq or (kind == "swap" and found[0].seq == i + 2)


@given(record)
def test_hash_covers_every_field(rec: dict[str, Any]) -> None:
    sealed = seal(dict(rec), "c", 1, "")
    assert record_hash(sealed) == sealed["hash"]
    for key in sealed:
        if key == "hash":
            continue
        changed = dict(sealed)
        changed[key] = "tampered" if changed[key] != "tampered" else "other"
        assert record_hash(changed) != sealed["hash"], key


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_budget_periods_contain_now_and_end_on_the_boundary(t: datetime) -> None:
    now = t.replace(tzinfo=UTC).timestamp()
    (d_name, day, d_left), (m_name, month, m_left) = budget_periods(now)
    assert (d_name, m_name) == ("daily", "monthly")
    assert day == t.strftime("%Y-%m-%d") and month == t.strftime("%Y-%m")
    assert 0 < d_left <= 86_400 and d_left <= m_left <= 31 * 86_400
    end_day = datetime.fromtimestamp(round(now + d_left), UTC)
    assert (end_day.hour, end_day.minute, end_day.second) == (0, 0, 0)
    end_month = datetime.fromtimestamp(round(now + m_left), UTC)
    assert end_month.day == 1 and end_month.hour == 0 and end_month.strftime("%Y-%m") > month
