"""proxy.mcp.sse: incremental event-stream parsing and writing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.mcp.sse import SseEvent, SseParser, SseTooLarge, serialize


def parse_all(chunks: list[bytes], max_event_bytes: int | None = None
              ) -> tuple[list[SseEvent], bytes]:
    parser = SseParser(max_event_bytes=max_event_bytes)
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close_events())
    return events, parser.tail()


def fields(events: list[SseEvent]) -> list[tuple[object, ...]]:
    return [(e.data, e.event, e.id, e.retry, e.comments) for e in events]


CASES: list[tuple[str, bytes, list[tuple[object, ...]]]] = [
    ("lf", b"data: a\n\n", [("a", None, None, None, ())]),
    ("crlf", b"data: a\r\n\r\n", [("a", None, None, None, ())]),
    ("cr", b"data: a\r\r", [("a", None, None, None, ())]),
    ("mixed endings", b"event: x\rdata: a\r\ndata: b\n\r\n",
     [("a\nb", "x", None, None, ())]),
    ("no space after colon", b"data:a\n\n", [("a", None, None, None, ())]),
    ("only one space removed", b"data:  a\n\n", [(" a", None, None, None, ())]),
    ("field without colon", b"data\n\n", [("", None, None, None, ())]),
    ("empty data", b"data:\n\n", [("", None, None, None, ())]),
    ("two empty data lines", b"data\ndata\n\n", [("\n", None, None, None, ())]),
    ("comment only", b": keep-alive\n\n", [(None, None, None, None, (" keep-alive",))]),
    ("comment inside", b"data: a\n:c\ndata: b\n\n", [("a\nb", None, None, None, ("c",))]),
    ("id and retry", b"id: 7\nretry: 1500\ndata: x\n\n", [("x", None, "7", 1500, ())]),
    ("bad retry ignored", b"retry: 15x\ndata: x\n\n", [("x", None, None, None, ())]),
    ("id with NUL ignored", b"id: a\x00b\ndata: x\n\n", [("x", None, None, None, ())]),
    ("unknown field ignored", b"foo: bar\ndata: x\n\n", [("x", None, None, None, ())]),
    ("bom skipped", b"\xef\xbb\xbfdata: x\n\n", [("x", None, None, None, ())]),
    ("two events", b"data: 1\n\ndata: 2\n\n",
     [("1", None, None, None, ()), ("2", None, None, None, ())]),
    ("blank lines between", b"\n\ndata: 1\n\n",
     [(None, None, None, None, ()), (None, None, None, None, ()),
      ("1", None, None, None, ())]),
    ("utf-8", "data: Grüße 世界\n\n".encode(), [("Grüße 世界", None, None, None, ())]),
    ("invalid utf-8 replaced", b"data: \xff\n\n", [("\ufffd", None, None, None, ())]),
    ("colon in value", b'data: {"a": "b:c"}\n\n', [('{"a": "b:c"}', None, None, None, ())]),
]


@pytest.mark.parametrize(("raw", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_events(raw: bytes, want: list[tuple[object, ...]]) -> None:
    events, tail = parse_all([raw])
    assert fields(events) == want and tail == b""
    assert b"".join(e.raw for e in events) == raw


@pytest.mark.parametrize(("raw", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_events_byte_by_byte(raw: bytes, want: list[tuple[object, ...]]) -> None:
    events, _ = parse_all([raw[i:i + 1] for i in range(len(raw))])
    assert fields(events) == want
    assert b"".join(e.raw for e in events) == raw


def test_an_event_is_returned_as_soon_as_it_ends() -> None:
    parser = SseParser()
    assert parser.feed(b"data: first") == []
    assert parser.feed(b"\n") == []
    [ev] = parser.feed(b"\ndata: sec")
    assert ev.data == "first"
    assert parser.feed(b"ond\n\n")[0].data == "second"


def test_a_cr_at_a_chunk_end_waits_for_the_next_byte() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r\n\r") == []
    [ev] = parser.feed(b"\ndata: b\n\n")[:1]
    assert ev.raw == b"data: a\r\n\r\n"


def test_a_final_lone_cr_ends_the_stream_event() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r\r") == []
    [ev] = parser.close_events()
    assert ev.data == "a" and parser.tail() == b""


def test_an_unfinished_event_is_not_dispatched_but_kept() -> None:
    events, tail = parse_all([b"data: 1\n\ndata: partial\n"])
    assert [e.data for e in events] == ["1"]
    assert tail == b"data: partial\n"


def test_an_event_larger_than_the_bound_is_refused() -> None:
    parser = SseParser(max_event_bytes=64)
    parser.feed(b"data: " + b"x" * 50 + b"\n\n")  # complete: fine
    with pytest.raises(SseTooLarge):
        parser.feed(b"data: " + b"x" * 70)


def test_serialize() -> None:
    assert serialize("x") == b"data: x\n\n"
    assert serialize("a\nb\r\nc", event="message", id="4", retry=10) == (
        b"event: message\nid: 4\nretry: 10\ndata: a\ndata: b\ndata: c\n\n")
    with pytest.raises(ValueError, match="line break"):
        serialize("x", event="a\nb")


def test_with_data_keeps_the_event_fields() -> None:
    [ev] = SseParser().feed(b": c\nevent: message\nid: 3\ndata: old\n\n")
    new = ev.with_data('{"a":1}')
    assert (new.data, new.event, new.id, new.json()) == ('{"a":1}', "message", "3", {"a": 1})
    assert new.raw == b'event: message\nid: 3\ndata: {"a":1}\n\n'
    assert SseEvent(raw=b"", data="not json").json() is None


# ------------------------------------------------------------ properties

line_text = st.text(st.characters(blacklist_categories=["Cs"],
                                  blacklist_characters="\r\n\x00"), max_size=20)
events_strategy = st.lists(st.tuples(
    st.lists(line_text, min_size=1, max_size=4).map("\n".join),
    st.none() | line_text.filter(lambda s: s == s.strip() and s != ""),
    st.none() | line_text.filter(lambda s: s == s.strip() and s != ""),
    st.none() | st.integers(0, 10**6)), max_size=6)


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    pieces, last = [], 0
    for c in cuts:
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:])
    return pieces


@settings(max_examples=300, deadline=None)
@given(events_strategy, st.lists(st.integers(0, 10**6), max_size=12))
def test_serialized_events_survive_any_chunking(
        evs: list[tuple[str, str | None, str | None, int | None]], points: list[int]) -> None:
    stream = b"".join(serialize(d, event=e, id=i, retry=r) for d, e, i, r in evs)
    events, tail = parse_all(_cuts(stream, points))
    assert tail == b""
    assert [(e.data, e.event, e.id, e.retry) for e in events] == [
        (d, e, i, r) for d, e, i, r in evs]


raw_stream = st.lists(st.sampled_from([
    b"data: x", b"data:y", b"data", b": c", b"event: e", b"id: 1", b"retry: 5", b"",
    b"data: \xc3\xa9", b"field", "data: 世".encode()]), max_size=20).flatmap(
    lambda lines: st.lists(st.sampled_from([b"\n", b"\r", b"\r\n"]), min_size=len(lines),
                           max_size=len(lines)).map(
        lambda ends: b"".join(line + end for line, end in zip(lines, ends, strict=True))))


@settings(max_examples=300, deadline=None)
@given(raw_stream, st.lists(st.integers(0, 10**6), max_size=12))
def test_any_chunking_of_any_stream_yields_the_same_events(
        stream: bytes, points: list[int]) -> None:
    whole, whole_tail = parse_all([stream])
    chunked, chunked_tail = parse_all(_cuts(stream, points))
    assert fields(chunked) == fields(whole)
    assert [e.raw for e in chunked] == [e.raw for e in whole]
    assert chunked_tail == whole_tail
    # nothing is lost or invented: the raw bytes add up to the stream
    assert b"".join(e.raw for e in whole) + whole_tail == stream
