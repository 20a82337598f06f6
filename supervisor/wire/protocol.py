"""Frames and codecs: the two client dialects and the worker protocol.

Client dialects, on the frontend ROUTER (README.md, "Calling corral"); the first frame
after the client's routing id tells them apart:

  MDP/0.2 client (rfc.zeromq.org 18/MDP)
    request  [MDPC02, 0x01, service, body]           (keyed: [.., service, key, body])
    reply    [MDPC02, 0x03, service, status, body]
  MDP/0.2 as several libraries frame it (an empty delimiter, worker-side command numbers)
    request  ["", MDPC02, 0x02, service, body]
    reply    ["", MDPC02, 0x04, status, body]
  native
    request  [CORRAL1, request_id, service, meta, body]   meta: JSON object or empty
    reply    [CORRAL1, request_id, status, body]

  The `mmi.service` service (rfc 8/MMI) answers 200 when the service named in
  the body exists, 404 when not; the body repeats the code.

Worker protocol, on the backend ROUTER. Workers are DEALERs whose routing id
is b"w<slot>.<generation>", so a respawned worker is never taken for the one
it replaces. Every message is one frame: a command byte and its payload
(numbers in network order). Every message counts as a heartbeat.

  worker -> broker
    READY      W_READY json {"pid", "capacity", "services", "standby", "heartbeat_ms"}
    REPLY      W_REPLY (u64 ticket, u16 status, u8 len, u32 len, fault, body)*
    HEARTBEAT  W_HEARTBEAT
    RETIRING   W_RETIRING u8 len, reason, u64 ticket*    (tickets handed back)
    ALARMS     W_ALARMS (u16 len, u16 len, i64 at_ms, service, scope)*   the alarms its
                          last commit changed, as committed (at_ms -1: none left); sent
                          before the replies of that commit (docs/alarms.md)
    DISCONNECT W_DISCONNECT    goodbye: the last message of a worker that exits
                          by itself (the broker answers for what it held only
                          once this is read, or soon after the exit if never)
  broker -> worker
    REQUEST    W_REQUEST (u64 ticket, u32 left_ms, u16 len, u16 len, u32 len, u64 token,
                          u8 flags, service, key, body)*
    HEARTBEAT  W_HEARTBEAT
    DISCONNECT W_DISCONNECT    finish what you hold, reply, exit
    EVICT      W_EVICT u16 len, service, key    drop that key's instance (keyed
                          apps over max_keys; never a key with requests held)

  heartbeat_ms: how often the worker heartbeats when idle (its config generation's);
  the broker judges its silence by that, so a reload that changes the interval
  never makes the workers of the other generation look dead.

  left_ms: what is left of the request's deadline when it was sent; the guest
  gets the smaller of that (less the time it waited in the worker) and the
  app's timeout_ms.

  token: 0, or for an idempotent request a number the broker assigns once and
  keeps across re-dispatches (its ticket: unique within a daemon's run, and
  every recorded token is dropped when the daemon starts). A worker that
  commits the request's durable-state writes records the token with the
  reply in the same transaction (docs/state.md). flags bit 0 (REDELIVERED): the
  request is re-dispatched after its worker died (and was reaped); the worker
  looks the token up and, if it was recorded, answers the recorded reply
  without running the guest.

  flags bit 1 (ALARM): not a client's request but a due alarm of the key's (or the
  service's) scope; the body is (i32 retries, i64 at_ms): the worker calls
  corral_alarm(retries), and its success deletes the alarm of that at_ms unless the run
  set another. retries -1: the alarm failed every retry: delete it without running the
  guest. Either way an alarm no longer at that at_ms is not run (docs/alarms.md).

A worker takes at most `capacity` requests at once (credit-based flow): the
broker sends only to workers with free credit, in batches. After an abort
with on_abort = "respawn" a worker replies to the aborting request, hands
back the requests it holds but has not started (RETIRING), waits for
DISCONNECT, hands back anything that came meanwhile, and exits.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum


# --- client dialects --------------------------------------------------------

NATIVE = b"CORRAL1"
MDPC = b"MDPC02"
MDP_REQUEST = b"\x01"
MDP_FINAL = b"\x03"
# The other MDP/0.2 framing: empty delimiter, worker-side command numbers.
MDP_LEGACY_REQUEST = b"\x02"
MDP_LEGACY_REPLY = b"\x04"
MMI_SERVICE = b"mmi.service"
MMI_PREFIX = b"mmi."


class Dialect(Enum):
    NATIVE = "native"
    MDP = "mdp"
    MDP_LEGACY = "mdp-legacy"


class Status(IntEnum):
    OK = 200
    BAD_REQUEST = 400
    FORBIDDEN = 403
    NOT_FOUND = 404
    TOO_LARGE = 413
    TOO_MANY_REQUESTS = 429
    GUEST_ERROR = 422
    UNWIND = 500
    ABORT = 502
    UNAVAILABLE = 503
    DEADLINE = 504


STATUS_FRAMES = {status: b"%d" % status for status in Status}
STATUS_BY_CODE = {int(status): status for status in Status}  # cheaper than Status(code)
FAULTS = frozenset((Status.ABORT, Status.DEADLINE))  # the instance is poisoned


@dataclass(slots=True)
class ClientRequest:
    """A well-formed client request, as parsed from its frames."""
    dialect: Dialect
    request_id: bytes  # native: the client's id; MDP: the service frame
    service: bytes
    body: bytes
    key: bytes | None = None
    deadline_ms: int | None = None
    idempotent: bool | None = None


class Malformed(Exception):
    """A request that cannot be served; `reply` says how to answer it, if at all."""

    def __init__(self, status: Status, detail: str, dialect: Dialect | None = None,
                 request_id: bytes = b""):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.dialect = dialect
        self.request_id = request_id


def parse_client(frames: list[bytes], keyed: set[bytes]) -> ClientRequest:
    """Parse a client request (routing id already removed); raise Malformed.

    `keyed` names the services whose MDP requests carry a key frame.
    """
    header = frames[0]
    if header == NATIVE:
        if len(frames) != 5:
            request_id = frames[1] if len(frames) > 1 else b""
            raise Malformed(Status.BAD_REQUEST,
                            "native request needs 5 frames: CORRAL1, request_id, service, meta, body",
                            Dialect.NATIVE, request_id)
        _, request_id, service, meta, body = frames
        request = ClientRequest(Dialect.NATIVE, request_id, service, body)
        if meta and meta != b"{}":
            _apply_meta(request, meta)
        return request
    if header == MDPC:
        if len(frames) < 4 or frames[1] != MDP_REQUEST:
            raise Malformed(Status.BAD_REQUEST, "MDP/0.2 request is [MDPC02, 0x01, service, body]",
                            Dialect.MDP, frames[2] if len(frames) > 2 else b"")
        return _mdp_request(Dialect.MDP, frames[2], frames[3:], keyed)
    if header == b"" and len(frames) > 1 and frames[1] == MDPC:
        if len(frames) < 5 or frames[2] != MDP_LEGACY_REQUEST:
            raise Malformed(Status.BAD_REQUEST, "MDP request is ['', MDPC02, 0x02, service, body]",
                            Dialect.MDP_LEGACY)
        return _mdp_request(Dialect.MDP_LEGACY, frames[3], frames[4:], keyed)
    raise Malformed(Status.BAD_REQUEST,
                    "unknown protocol: the first frame must be CORRAL1 or MDPC02")


def _mdp_request(dialect: Dialect, service: bytes, body: list[bytes], keyed: set[bytes]) -> ClientRequest:
    if service in keyed:
        if len(body) != 2:
            raise Malformed(Status.BAD_REQUEST,
                            "keyed service: send the key as a body frame before the body",
                            dialect, service)
        return ClientRequest(dialect, service, service, body[1], key=body[0])
    if len(body) != 1:
        raise Malformed(Status.BAD_REQUEST, "expected exactly one body frame", dialect, service)
    return ClientRequest(dialect, service, service, body[0])


def _apply_meta(request: ClientRequest, meta: bytes) -> None:
    def bad(detail: str) -> Malformed:
        return Malformed(Status.BAD_REQUEST, detail, Dialect.NATIVE, request.request_id)
    try:
        values = json.loads(meta)
    except (ValueError, UnicodeDecodeError):
        raise bad("meta is not valid JSON") from None
    except RecursionError:   # nested deeper than the interpreter's recursion limit
        raise bad("meta is nested too deeply") from None
    if not isinstance(values, dict):
        raise bad("meta must be a JSON object")
    for name, value in values.items():
        if name == "deadline_ms":
            if type(value) is not int or value <= 0:
                raise bad("meta deadline_ms must be a positive integer")
            request.deadline_ms = value
        elif name == "key":
            if not isinstance(value, str):
                raise bad("meta key must be a string")
            try:
                request.key = value.encode()
            except UnicodeEncodeError:   # a lone surrogate (JSON "\ud800") has no UTF-8
                raise bad("meta key must be valid Unicode (no lone surrogates)") from None
        elif name == "idempotent":
            if not isinstance(value, bool):
                raise bad("meta idempotent must be true or false")
            request.idempotent = value
        else:
            raise bad(f"unknown meta key {name!r} (known: deadline_ms, key, idempotent)")


def reply_frames(dialect: Dialect, client: bytes, request_id: bytes, status: bytes,
                 body: bytes) -> list[bytes]:
    """The reply to a client, in the framing its request came in."""
    if dialect is Dialect.NATIVE:
        return [client, NATIVE, request_id, status, body]
    if dialect is Dialect.MDP:
        return [client, MDPC, MDP_FINAL, request_id, status, body]
    return [client, b"", MDPC, MDP_LEGACY_REPLY, status, body]


# --- worker protocol ----------------------------------------------------------
# One frame per message (after the worker's routing id): a command byte, then
# its payload. Requests and replies travel in batches of records.

W_READY = b"\x01"
W_REQUEST = b"\x02"
W_REPLY = b"\x03"
W_HEARTBEAT = b"\x04"
W_DISCONNECT = b"\x05"
W_RETIRING = b"\x06"
W_EVICT = b"\x07"
W_ALARMS = b"\x08"

_REQUEST_RECORD = struct.Struct("!QIHHIQB")  # ticket, left_ms, len(service), len(key), len(body), token, flags
REDELIVERED = 1
ALARM = 2
_ALARM_BODY = struct.Struct("!iq")          # retries, at_ms
_ALARM_RECORD = struct.Struct("!HHq")       # len(service), len(scope), at_ms (-1: none)
_REPLY_RECORD = struct.Struct("!QHBI")      # ticket, status, len(fault), len(body)
_TICKETS = struct.Struct("!Q")
_EVICT = struct.Struct("!H")                # len(service), then service and key
MAX_KEY = 0xFFFF


class RetireReason(str, Enum):
    ABORT = "abort"              # a trap poisoned an instance (on_abort = "respawn")
    ESCALATION = "escalation"    # instances aborted more than restart.intensity times
    MAX_REQUESTS = "max_requests"


def worker_identity(slot: int, generation: int) -> bytes:
    return b"w%d.%d" % (slot, generation)


def request_record(ticket: int, left_ms: int, service: bytes, key: bytes | None,
                   body: bytes, token: int = 0, flags: int = 0) -> tuple[bytes, ...]:
    """The pieces of one request record; a batch is W_REQUEST + the joined pieces."""
    key = key or b""
    return (_REQUEST_RECORD.pack(ticket, left_ms, len(service), len(key), len(body), token, flags),
            service, key, body)


def iter_requests(payload: bytes):
    """(ticket, left_ms, service, key or None, body) for each record of a W_REQUEST payload."""
    for record in iter_request_records(payload):
        yield record[:5]


def iter_request_records(payload: bytes):
    """(ticket, left_ms, service, key or None, body, token, flags) for each record of a W_REQUEST payload."""
    unpack, size, at, end = _REQUEST_RECORD.unpack_from, _REQUEST_RECORD.size, 1, len(payload)
    while at < end:
        ticket, left_ms, service_len, key_len, body_len, token, flags = unpack(payload, at)
        at += size
        service = payload[at:at + service_len]
        at += service_len
        key = payload[at:at + key_len] if key_len else None
        at += key_len
        yield ticket, left_ms, service, key, payload[at:at + body_len], token, flags
        at += body_len


def reply_record(ticket: int, status: int, fault: bytes, body: bytes) -> tuple[bytes, ...]:
    """The pieces of one reply record; a batch is W_REPLY + the joined pieces."""
    return _REPLY_RECORD.pack(ticket, status, len(fault), len(body)), fault, body


def iter_replies(payload: bytes):
    """(ticket, status, fault, body) for each record of a W_REPLY payload."""
    unpack, size, at, end = _REPLY_RECORD.unpack_from, _REPLY_RECORD.size, 1, len(payload)
    while at < end:
        ticket, status, fault_len, body_len = unpack(payload, at)
        at += size
        if at + fault_len + body_len > end:
            raise ValueError("truncated W_REPLY record")
        fault = payload[at:at + fault_len]
        at += fault_len
        yield ticket, status, fault, payload[at:at + body_len]
        at += body_len


def alarm_body(retries: int, at_ms: int) -> bytes:
    return _ALARM_BODY.pack(retries, at_ms)


def parse_alarm_body(body: bytes) -> tuple[int, int]:
    """(retries, at_ms) of an ALARM request's body."""
    return _ALARM_BODY.unpack(body)


def alarms_message(changes) -> bytes:
    """W_ALARMS for (service, scope, at_ms or None) changes."""
    pieces = [W_ALARMS]
    for service, scope, at_ms in changes:
        pieces += (_ALARM_RECORD.pack(len(service), len(scope), -1 if at_ms is None else at_ms), service, scope)
    return b"".join(pieces)


def iter_alarms(payload: bytes):
    """(service, scope, at_ms or None) for each record of a W_ALARMS payload."""
    unpack, size, at, end = _ALARM_RECORD.unpack_from, _ALARM_RECORD.size, 1, len(payload)
    while at < end:
        service_len, scope_len, at_ms = unpack(payload, at)
        at += size
        service = payload[at:at + service_len]
        at += service_len
        scope = payload[at:at + scope_len]
        if len(scope) != scope_len:
            raise ValueError("truncated W_ALARMS record")
        at += scope_len
        yield service, scope, None if at_ms < 0 else at_ms


def retiring_message(reason: str, tickets: list[int]) -> bytes:
    encoded = reason.encode()
    return W_RETIRING + bytes([len(encoded)]) + encoded + b"".join(_TICKETS.pack(t) for t in tickets)


def parse_retiring(payload: bytes) -> tuple[str, list[int]]:
    """(reason, tickets handed back); ValueError (or struct.error) when it does not parse."""
    length = payload[1]
    if len(payload) < 2 + length:
        raise ValueError("truncated W_RETIRING reason")
    reason = payload[2:2 + length].decode(errors="replace")
    return reason, [t for (t,) in _TICKETS.iter_unpack(payload[2 + length:])]


def evict_message(service: bytes, key: bytes) -> bytes:
    return W_EVICT + _EVICT.pack(len(service)) + service + key


def parse_evict(payload: bytes) -> tuple[bytes, bytes]:
    (length,) = _EVICT.unpack_from(payload, 1)
    at = 1 + _EVICT.size
    return payload[at:at + length], payload[at + length:]


def encode_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
