"""Frame codecs of both client dialects and the worker protocol (unit tests)."""

from __future__ import annotations

import pytest

from corral.wire import protocol
from corral.wire.protocol import Dialect, Malformed, Status


def test_native_request_with_meta():
    request = protocol.parse_client(
        [b"CORRAL1", b"id-1", b"svc", b'{"deadline_ms": 250, "key": "k", "idempotent": true}', b"body"], set())
    assert (request.dialect, request.request_id, request.service, request.body) == \
        (Dialect.NATIVE, b"id-1", b"svc", b"body")
    assert (request.deadline_ms, request.key, request.idempotent) == (250, b"k", True)


def test_native_request_with_empty_meta():
    request = protocol.parse_client([b"CORRAL1", b"7", b"svc", b"", b""], set())
    assert (request.key, request.deadline_ms, request.idempotent, request.body) == (None, None, None, b"")


def test_mdp_request_and_keyed_request():
    assert protocol.parse_client([b"MDPC02", b"\x01", b"svc", b"b"], set()).body == b"b"
    keyed = protocol.parse_client([b"MDPC02", b"\x01", b"svc", b"k", b"b"], {b"svc"})
    assert (keyed.key, keyed.body) == (b"k", b"b")


def test_mdp_legacy_framing():
    request = protocol.parse_client([b"", b"MDPC02", b"\x02", b"svc", b"b"], set())
    assert (request.dialect, request.service, request.body) == (Dialect.MDP_LEGACY, b"svc", b"b")


@pytest.mark.parametrize("frames", [
    [b"HTTP/1.1"], [b"CORRAL1", b"x"], [b"MDPC02", b"\x02", b"svc", b"b"], [b"MDPC02"],
    [b"", b"MDPC02", b"\x01", b"svc", b"b"], [b"MDPC02", b"\x01", b"svc", b"a", b"b"],
    [b"CORRAL1", b"i", b"s", b'{"deadline_ms": true}', b""],
    [b"CORRAL1", b"i", b"s", b'{"deadline_ms": 1.5}', b""],
    [b"CORRAL1", b"i", b"s", b"\xff\xfe", b""],
])
def test_malformed_requests_are_rejected_with_400(frames):
    with pytest.raises(Malformed) as caught:
        protocol.parse_client(frames, set())
    assert caught.value.status is Status.BAD_REQUEST
    assert caught.value.detail


def test_replies_use_the_framing_of_the_request():
    assert protocol.reply_frames(Dialect.NATIVE, b"c", b"r", b"200", b"b") == [b"c", b"CORRAL1", b"r", b"200", b"b"]
    assert protocol.reply_frames(Dialect.MDP, b"c", b"svc", b"200", b"b") == \
        [b"c", b"MDPC02", b"\x03", b"svc", b"200", b"b"]
    assert protocol.reply_frames(Dialect.MDP_LEGACY, b"c", b"svc", b"200", b"b") == \
        [b"c", b"", b"MDPC02", b"\x04", b"200", b"b"]


def test_worker_records_round_trip():
    batch = protocol.W_REQUEST + b"".join(
        protocol.request_record(2**40 + 3, 1500, b"svc", b"key\x00bytes", b"body one")
        + protocol.request_record(7, 2, b"s", None, b""))
    assert list(protocol.iter_requests(batch)) == [(2**40 + 3, 1500, b"svc", b"key\x00bytes", b"body one"),
                                                   (7, 2, b"s", None, b"")]
    replies = protocol.W_REPLY + b"".join(protocol.reply_record(9, 502, b"unreachable", b"detail")
                                          + protocol.reply_record(10, 200, b"", b"x" * 70000))
    assert list(protocol.iter_replies(replies)) == [(9, 502, b"unreachable", b"detail"), (10, 200, b"", b"x" * 70000)]
    assert protocol.parse_retiring(protocol.retiring_message("abort", [1, 2**63, 5])) == ("abort", [1, 2**63, 5])


def test_worker_identity_carries_slot_and_generation():
    assert protocol.worker_identity(3, 17) == b"w3.17"
