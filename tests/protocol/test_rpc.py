"""RpcSession, driven by hand: two sessions joined by a `transfer` helper, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtswarm.errors import ErrorCode, FrameError, LocalProtocolError
from crdtswarm.protocol.rpc import (
    MAX_ERROR_MESSAGE_SIZE,
    MAX_METHOD_SIZE,
    CallCancelled,
    ErrorReceived,
    RequestReceived,
    ResponseReceived,
    RpcConfig,
    RpcEvent,
    RpcSession,
)
from crdtswarm.protocol.wire import encode_uvarint, encode_var_bytes, encode_var_string

# --- Helpers ---------------------------------------------------------------------


def transfer(a: RpcSession, b: RpcSession) -> None:
    """Move data_to_send() both ways until neither side has anything to send."""
    while True:
        moved = False
        for source, destination in ((a, b), (b, a)):
            data = source.data_to_send()
            if data:
                moved = True
                destination.receive_data(data)
        if not moved:
            return


def events(session: RpcSession) -> list[RpcEvent]:
    """Every event the session has decoded so far."""
    out: list[RpcEvent] = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def frame(body: bytes) -> bytes:
    """A message on the byte stream: uvarint length, then the body."""
    return encode_uvarint(len(body)) + body


def request(ident: int, method: str | bytes, payload: bytes) -> bytes:
    raw = method.encode("utf-8") if isinstance(method, str) else method
    return frame(
        b"\x00" + encode_uvarint(ident) + encode_var_bytes(raw) + encode_var_bytes(payload)
    )


def response(ident: int, payload: bytes) -> bytes:
    return frame(b"\x01" + encode_uvarint(ident) + encode_var_bytes(payload))


def error(ident: int, code: int, message: str) -> bytes:
    return frame(
        b"\x02" + encode_uvarint(ident) + encode_uvarint(code) + encode_var_string(message)
    )


def cancel(ident: int) -> bytes:
    return frame(b"\x03" + encode_uvarint(ident))


def calls_made(count: int, config: RpcConfig | None = None) -> RpcSession:
    """A session that has issued calls 1..count and sent them (its output is drained)."""
    session = RpcSession(config)
    for i in range(count):
        assert session.call("m", bytes([i % 256])) == i + 1
    session.data_to_send()
    return session


# --- Round trips -----------------------------------------------------------------


def test_call_and_response_round_trip() -> None:
    caller, callee = RpcSession(), RpcSession()
    call_id = caller.call("echo", b"hello")
    assert caller.pending_calls == 1
    transfer(caller, callee)
    [received] = events(callee)
    assert received == RequestReceived(request_id=call_id, method="echo", payload=b"hello")
    callee.respond(received.request_id, b"HELLO")
    transfer(caller, callee)
    assert events(caller) == [ResponseReceived(call_id=call_id, payload=b"HELLO")]
    assert caller.pending_calls == 0
    assert events(callee) == []
    assert caller.data_to_send() == callee.data_to_send() == b""


def test_both_sides_call_each_other_and_ids_are_unique() -> None:
    a, b = RpcSession(), RpcSession()
    a_ids = [a.call("ping", str(i).encode()) for i in range(5)]
    b_ids = [b.call("pong", str(i).encode()) for i in range(3)]
    assert len(set(a_ids)) == 5
    transfer(a, b)
    to_b, to_a = events(b), events(a)
    assert [(e.method, e.payload) for e in to_b if isinstance(e, RequestReceived)] == [
        ("ping", str(i).encode()) for i in range(5)
    ]
    assert len(to_a) == 3
    # Answer in reverse order: each answer goes to its own call.
    for event in reversed(to_b):
        assert isinstance(event, RequestReceived)
        b.respond(event.request_id, b"re:" + event.payload)
    for event in to_a:
        assert isinstance(event, RequestReceived)
        a.respond(event.request_id, b"re:" + event.payload)
    transfer(a, b)
    answers_a = {e.call_id: e.payload for e in events(a) if isinstance(e, ResponseReceived)}
    answers_b = {e.call_id: e.payload for e in events(b) if isinstance(e, ResponseReceived)}
    assert answers_a == {cid: b"re:" + str(i).encode() for i, cid in enumerate(a_ids)}
    assert answers_b == {cid: b"re:" + str(i).encode() for i, cid in enumerate(b_ids)}
    assert a.pending_calls == b.pending_calls == 0


def test_empty_and_binary_payloads_round_trip() -> None:
    caller, callee = RpcSession(), RpcSession()
    payloads = [b"", b"\x00", bytes(range(256)) * 40]
    ids = [caller.call("m", p) for p in payloads]
    transfer(caller, callee)
    received = events(callee)
    assert [e.payload for e in received if isinstance(e, RequestReceived)] == payloads
    for event, payload in zip(received, payloads, strict=True):
        assert isinstance(event, RequestReceived)
        callee.respond(event.request_id, payload[::-1])
    transfer(caller, callee)
    assert events(caller) == [
        ResponseReceived(call_id=cid, payload=p[::-1]) for cid, p in zip(ids, payloads, strict=True)
    ]


# --- Errors ----------------------------------------------------------------------


@pytest.mark.parametrize("code", [ErrorCode.UNKNOWN_METHOD, ErrorCode.APPLICATION_ERROR])
def test_error_answer_carries_code_and_message(code: ErrorCode) -> None:
    caller, callee = RpcSession(), RpcSession()
    call_id = caller.call("nope", b"")
    transfer(caller, callee)
    [received] = events(callee)
    assert isinstance(received, RequestReceived)
    callee.respond_error(received.request_id, code, "no handler for 'nope' ✗")
    transfer(caller, callee)
    [answer] = events(caller)
    assert answer == ErrorReceived(call_id=call_id, code=code, message="no handler for 'nope' ✗")
    assert isinstance(answer.code, ErrorCode)
    assert caller.pending_calls == 0


def test_unknown_error_code_arrives_as_a_plain_int() -> None:
    caller, callee = RpcSession(), RpcSession()
    call_id = caller.call("m", b"")
    transfer(caller, callee)
    [received] = events(callee)
    assert isinstance(received, RequestReceived)
    callee.respond_error(received.request_id, 4242)
    transfer(caller, callee)
    [answer] = events(caller)
    assert answer == ErrorReceived(call_id=call_id, code=4242, message="")
    assert not isinstance(answer.code, ErrorCode)


@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
def test_long_error_message_is_cut_at_a_character_within_the_limit(char: str) -> None:
    caller, callee = RpcSession(), RpcSession()
    caller.call("m", b"")
    transfer(caller, callee)
    [received] = events(callee)
    assert isinstance(received, RequestReceived)
    callee.respond_error(received.request_id, ErrorCode.INTERNAL_ERROR, char * 2000)
    transfer(caller, callee)
    [answer] = events(caller)
    assert isinstance(answer, ErrorReceived)
    size = len(answer.message.encode("utf-8"))
    assert MAX_ERROR_MESSAGE_SIZE - len(char.encode("utf-8")) < size <= MAX_ERROR_MESSAGE_SIZE
    assert answer.message == char * len(answer.message)


def test_error_message_over_the_limit_on_the_wire_is_a_frame_error() -> None:
    session = calls_made(1)
    with pytest.raises(FrameError):
        session.receive_data(error(1, 2, "x" * (MAX_ERROR_MESSAGE_SIZE + 1)))


def test_respond_error_with_an_unencodable_code_keeps_the_request_answerable() -> None:
    caller, callee = RpcSession(), RpcSession()
    call_id = caller.call("m", b"")
    transfer(caller, callee)
    [received] = events(callee)
    assert isinstance(received, RequestReceived)
    with pytest.raises(ValueError, match="uvarint"):
        callee.respond_error(received.request_id, -1, "bad code")
    # A bad argument must not consume the request: the caller would wait forever.
    callee.respond(received.request_id, b"late but fine")
    transfer(caller, callee)
    assert events(caller) == [ResponseReceived(call_id=call_id, payload=b"late but fine")]


# --- Unknown ids, duplicates and cancellation ------------------------------------


def test_answers_for_unknown_ids_are_ignored() -> None:
    session = calls_made(1)
    session.receive_data(response(99, b"x") + error(98, 1, "y") + cancel(97))
    assert events(session) == []
    assert session.pending_calls == 1
    assert session.data_to_send() == b""
    # The session is still healthy: the real answer is delivered.
    session.receive_data(response(1, b"ok"))
    assert events(session) == [ResponseReceived(call_id=1, payload=b"ok")]


def test_second_answer_for_the_same_call_is_ignored() -> None:
    session = calls_made(2)
    session.receive_data(response(1, b"first") + response(1, b"again") + error(1, 1, "late"))
    session.receive_data(error(2, 5, "no") + response(2, b"after error"))
    assert events(session) == [
        ResponseReceived(call_id=1, payload=b"first"),
        ErrorReceived(call_id=2, code=ErrorCode.REFUSED, message="no"),
    ]
    assert session.pending_calls == 0


def test_cancel_reaches_the_callee_and_a_late_respond_is_dropped() -> None:
    caller, callee = RpcSession(), RpcSession()
    call_id = caller.call("slow", b"")
    transfer(caller, callee)
    [received] = events(callee)
    assert isinstance(received, RequestReceived)
    caller.cancel(call_id)
    assert caller.pending_calls == 0
    transfer(caller, callee)
    assert events(callee) == [CallCancelled(request_id=received.request_id)]
    callee.respond(received.request_id, b"too late")
    callee.respond_error(received.request_id, ErrorCode.INTERNAL_ERROR, "too late")
    assert callee.data_to_send() == b""
    assert events(caller) == []


def test_answer_racing_a_cancel_is_ignored_by_the_caller() -> None:
    caller, callee = RpcSession(), RpcSession()
    call_id = caller.call("m", b"")
    transfer(caller, callee)
    [received] = events(callee)
    assert isinstance(received, RequestReceived)
    callee.respond(received.request_id, b"answer")  # in flight while the caller cancels
    caller.cancel(call_id)
    transfer(caller, callee)
    assert events(caller) == []
    assert events(callee) == []  # the cancel came after the answer: nothing to cancel
    assert caller.pending_calls == 0


def test_cancel_of_unknown_or_finished_call_sends_nothing() -> None:
    caller, callee = RpcSession(), RpcSession()
    caller.cancel(12345)
    assert caller.data_to_send() == b""
    call_id = caller.call("m", b"")
    transfer(caller, callee)
    [received] = events(callee)
    assert isinstance(received, RequestReceived)
    callee.respond(received.request_id, b"")
    transfer(caller, callee)
    events(caller)
    caller.cancel(call_id)
    caller.cancel(call_id)
    assert caller.data_to_send() == b""


# --- Limits ----------------------------------------------------------------------


def test_requests_beyond_max_incoming_are_refused() -> None:
    config = RpcConfig(max_incoming_requests=2)
    caller, callee = RpcSession(), RpcSession(config)
    ids = [caller.call("m", bytes([i])) for i in range(3)]
    transfer(caller, callee)
    accepted = events(callee)
    assert [e.payload for e in accepted if isinstance(e, RequestReceived)] == [b"\x00", b"\x01"]
    [refused] = events(caller)
    assert isinstance(refused, ErrorReceived)
    assert refused.call_id == ids[2]
    assert refused.code == ErrorCode.REFUSED
    # A cancel for the refused id is not a cancel of anything the callee holds.
    caller.cancel(ids[2])
    transfer(caller, callee)
    assert events(callee) == []
    # Answering one frees a slot for the next request.
    first = accepted[0]
    assert isinstance(first, RequestReceived)
    callee.respond(first.request_id, b"done")
    next_id = caller.call("m", b"\x03")
    transfer(caller, callee)
    assert events(caller) == [ResponseReceived(call_id=ids[0], payload=b"done")]
    assert events(callee) == [RequestReceived(request_id=next_id, method="m", payload=b"\x03")]


def test_a_cancel_frees_an_incoming_slot() -> None:
    caller, callee = RpcSession(), RpcSession(RpcConfig(max_incoming_requests=1))
    first = caller.call("m", b"")
    transfer(caller, callee)
    events(callee)
    caller.cancel(first)
    second = caller.call("m", b"")
    transfer(caller, callee)
    assert events(callee) == [
        CallCancelled(request_id=first),
        RequestReceived(request_id=second, method="m", payload=b""),
    ]
    assert events(caller) == []


def test_max_outgoing_calls_is_a_local_protocol_error() -> None:
    caller, callee = RpcSession(RpcConfig(max_outgoing_calls=2)), RpcSession()
    first = caller.call("m", b"")
    second = caller.call("m", b"")
    sent = caller.data_to_send()
    with pytest.raises(LocalProtocolError):
        caller.call("m", b"")
    assert caller.data_to_send() == b""  # nothing queued for the refused call
    assert caller.pending_calls == 2
    caller.cancel(first)
    third = caller.call("m", b"")  # a cancel frees a slot
    assert third not in (first, second)
    callee.receive_data(sent)
    transfer(caller, callee)
    for event in events(callee):
        if isinstance(event, RequestReceived):
            callee.respond(event.request_id, b"")
    transfer(caller, callee)
    assert {e.call_id for e in events(caller) if isinstance(e, ResponseReceived)} == {
        second,
        third,
    }
    caller.call("m", b"")  # answers free slots too
    caller.call("m", b"")
    with pytest.raises(LocalProtocolError):
        caller.call("m", b"")


def test_payload_limits() -> None:
    config = RpcConfig(max_message_size=1000)
    caller, callee = RpcSession(config), RpcSession(config)
    largest = config.max_message_size - MAX_METHOD_SIZE - 32
    with pytest.raises(ValueError, match="too large"):
        caller.call("m", bytes(largest + 1))
    assert caller.data_to_send() == b""
    assert caller.pending_calls == 0
    # The largest accepted payload, with the longest method name, fits the peer's limit.
    call_id = caller.call("m" * MAX_METHOD_SIZE, bytes(largest))
    transfer(caller, callee)
    [received] = events(callee)
    assert isinstance(received, RequestReceived)
    assert received.payload == bytes(largest)
    with pytest.raises(ValueError, match="too large"):
        callee.respond(received.request_id, bytes(config.max_message_size - 31))
    # The refused respond left the request answerable.
    callee.respond(received.request_id, bytes(config.max_message_size - 32))
    transfer(caller, callee)
    assert events(caller) == [ResponseReceived(call_id=call_id, payload=bytes(968))]


@pytest.mark.parametrize(
    "method", ["x", "m" * MAX_METHOD_SIZE, "é" * (MAX_METHOD_SIZE // 2), "sync/state-vector"]
)
def test_method_names_within_the_limit_round_trip(method: str) -> None:
    caller, callee = RpcSession(), RpcSession()
    call_id = caller.call(method, b"")
    transfer(caller, callee)
    assert events(callee) == [RequestReceived(request_id=call_id, method=method, payload=b"")]


@pytest.mark.parametrize(
    "method", ["", "m" * (MAX_METHOD_SIZE + 1), "é" * (MAX_METHOD_SIZE // 2) + "x"]
)
def test_method_names_outside_the_limit_are_refused(method: str) -> None:
    session = RpcSession()
    with pytest.raises(ValueError, match="method"):
        session.call(method, b"")
    assert session.data_to_send() == b""
    assert session.pending_calls == 0


def test_method_name_over_the_limit_on_the_wire_is_a_frame_error() -> None:
    session = RpcSession()
    with pytest.raises(FrameError):
        session.receive_data(request(1, "m" * (MAX_METHOD_SIZE + 1), b""))


def test_method_name_that_is_not_utf8_is_a_frame_error() -> None:
    session = RpcSession()
    with pytest.raises(FrameError):
        session.receive_data(request(1, b"\xff\xfe", b""))


# --- Malformed input --------------------------------------------------------------


def test_reused_pending_request_id_is_a_frame_error() -> None:
    session = RpcSession()
    session.receive_data(request(7, "m", b"a"))
    with pytest.raises(FrameError, match="reused"):
        session.receive_data(request(7, "m", b"b"))
    assert events(session) == [RequestReceived(request_id=7, method="m", payload=b"a")]
    with pytest.raises(LocalProtocolError):
        session.receive_data(b"")


def test_request_id_may_be_reused_once_answered() -> None:
    session = RpcSession()
    session.receive_data(request(7, "m", b"a"))
    session.respond(7, b"")
    session.receive_data(request(7, "m", b"b"))
    assert [e.payload for e in events(session) if isinstance(e, RequestReceived)] == [b"a", b"b"]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(frame(b""), id="empty body"),
        pytest.param(frame(b"\x04\x01"), id="unknown type"),
        pytest.param(frame(b"\xff\x01"), id="type 255"),
        pytest.param(
            frame(b"\x01\x01" + encode_var_bytes(b"ok") + b"\x00"), id="response trailing byte"
        ),
        pytest.param(frame(b"\x03\x01\x00"), id="cancel trailing byte"),
        pytest.param(frame(b"\x01\x01\x05ab"), id="payload longer than body"),
        pytest.param(frame(b"\x00"), id="request without id"),
        pytest.param(frame(b"\x01\x80\x00\x00"), id="over-long id varint"),
        pytest.param(b"\xff" * 10 + b"\x01", id="length prefix longer than 10 bytes"),
        pytest.param(b"\xff" * 9 + b"\x02", id="length prefix beyond 64 bits"),
    ],
)
def test_malformed_message_is_a_frame_error_and_terminal(data: bytes) -> None:
    session = calls_made(1)
    with pytest.raises(FrameError):
        session.receive_data(data)
    assert_terminal(session)


def test_length_prefix_over_max_message_size_fails_before_the_body_arrives() -> None:
    session = RpcSession(RpcConfig(max_message_size=100))
    session.receive_data(encode_uvarint(100)[:-1])  # nothing decided yet
    with pytest.raises(FrameError, match="exceeds"):
        session.receive_data(encode_uvarint(101))
    assert_terminal(session)


def test_message_of_exactly_max_message_size_is_accepted() -> None:
    config = RpcConfig(max_message_size=100)
    session = RpcSession(config)
    message = response(1, b"")  # unknown id: ignored, but must decode
    body = b"\x01\x01" + encode_var_bytes(bytes(100 - 3))
    assert len(body) == 100
    session.receive_data(frame(body) + message)
    assert events(session) == []
    assert session.data_to_send() == b""


def test_events_decoded_before_a_frame_error_are_kept() -> None:
    session = calls_made(1)
    with pytest.raises(FrameError):
        session.receive_data(response(1, b"ok") + frame(b"\x09"))
    assert events(session) == [ResponseReceived(call_id=1, payload=b"ok")]


def assert_terminal(session: RpcSession) -> None:
    """After a FrameError nothing is processed: input and new calls are refused."""
    events(session)  # what was decoded before the error is kept; drain it
    with pytest.raises(LocalProtocolError):
        session.receive_data(response(1, b""))
    with pytest.raises(LocalProtocolError):
        session.call("m", b"")
    assert events(session) == []


# --- Properties ------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    data: bytes
    kind: str
    ident: int
    method: str = ""
    payload: bytes = b""
    code: int = 0


CALLS = 8  # the receiving session of the properties has issued calls 1..CALLS

idents = st.integers(min_value=0, max_value=2**64 - 1)
call_idents = st.integers(min_value=1, max_value=CALLS + 2)
methods = st.text(min_size=1, max_size=MAX_METHOD_SIZE // 4)  # at most 4 UTF-8 bytes a character
payloads = st.binary(max_size=300)
codes = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(["request", "response", "error", "cancel"]))
    if kind == "request":
        ident, method, payload = draw(idents), draw(methods), draw(payloads)
        return Message(request(ident, method, payload), kind, ident, method, payload)
    if kind == "response":
        ident, payload = draw(call_idents), draw(payloads)
        return Message(response(ident, payload), kind, ident, payload=payload)
    if kind == "error":
        ident, code = draw(call_idents), draw(codes)
        text = draw(st.text(max_size=30))
        return Message(error(ident, code, text), kind, ident, method=text, code=code)
    ident = draw(idents)
    return Message(cancel(ident), kind, ident)


def message_streams() -> st.SearchStrategy[list[Message]]:
    """Message sequences that are valid: no request id is reused while pending."""

    def valid(sequence: list[Message]) -> bool:
        pending: set[int] = set()
        for message in sequence:
            if message.kind == "request":
                if message.ident in pending:
                    return False
                pending.add(message.ident)
            elif message.kind == "cancel":
                pending.discard(message.ident)
        return True

    return st.lists(messages(), max_size=12).filter(valid)


def model(sequence: list[Message]) -> list[RpcEvent]:
    """The events a session with calls 1..CALLS pending must report for ``sequence``."""
    calls = set(range(1, CALLS + 1))
    requests: set[int] = set()
    out: list[RpcEvent] = []
    for m in sequence:
        if m.kind == "request":
            requests.add(m.ident)
            out.append(RequestReceived(request_id=m.ident, method=m.method, payload=m.payload))
        elif m.kind == "response" and m.ident in calls:
            calls.discard(m.ident)
            out.append(ResponseReceived(call_id=m.ident, payload=m.payload))
        elif m.kind == "error" and m.ident in calls:
            calls.discard(m.ident)
            out.append(
                ErrorReceived(call_id=m.ident, code=ErrorCode.parse(m.code), message=m.method)
            )
        elif m.kind == "cancel" and m.ident in requests:
            requests.discard(m.ident)
            out.append(CallCancelled(request_id=m.ident))
    return out


def receiver() -> RpcSession:
    return calls_made(CALLS, RpcConfig(max_incoming_requests=1000))


@settings(max_examples=150, deadline=None)
@given(sequence=message_streams(), data=st.data())
def test_decoding_does_not_depend_on_how_the_bytes_are_split(
    sequence: list[Message], data: st.DataObject
) -> None:
    stream = b"".join(m.data for m in sequence)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=20), label="cuts"))
    expected = model(sequence)

    whole = receiver()
    whole.receive_data(stream)
    assert events(whole) == expected

    split = receiver()
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        split.receive_data(stream[start:end])
    assert events(split) == expected

    byte_at_a_time = receiver()
    for i in range(len(stream)):
        byte_at_a_time.receive_data(stream[i : i + 1])
    assert events(byte_at_a_time) == expected
    assert whole.data_to_send() == split.data_to_send() == byte_at_a_time.data_to_send() == b""


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), chunk=st.integers(min_value=1, max_value=50))
def test_random_bytes_decode_or_raise_frame_error_only(data: bytes, chunk: int) -> None:
    session = RpcSession(RpcConfig(max_message_size=150))
    try:
        for i in range(0, len(data), chunk):
            session.receive_data(data[i : i + chunk])
    except FrameError:
        assert_terminal(session)
    else:
        for event in events(session):
            assert isinstance(event, RpcEvent)


@settings(max_examples=100, deadline=None)
@given(sequence=message_streams().filter(bool), data=st.data())
def test_truncated_stream_yields_only_the_complete_messages(
    sequence: list[Message], data: st.DataObject
) -> None:
    stream = b"".join(m.data for m in sequence)
    cut = data.draw(st.integers(0, len(stream) - 1), label="cut")
    complete = []
    offset = 0
    for message in sequence:
        offset += len(message.data)
        if offset > cut:
            break
        complete.append(message)
    session = receiver()
    session.receive_data(stream[:cut])
    assert events(session) == model(complete)
    # The rest arrives later: decoding resumes where it stopped.
    session.receive_data(stream[cut:])
    assert events(session) == model(sequence)[len(model(complete)) :]


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(min_value=0, max_value=10_000),
    excess=st.integers(min_value=1, max_value=2**64 - 1),
    tail=st.binary(max_size=20),
)
def test_length_prefix_over_the_limit_is_a_frame_error(
    limit: int, excess: int, tail: bytes
) -> None:
    session = RpcSession(RpcConfig(max_message_size=limit))
    size = min(limit + excess, 2**64 - 1)
    with pytest.raises(FrameError):
        session.receive_data(encode_uvarint(size) + tail)
    assert_terminal(session)


@settings(max_examples=300, deadline=None)
@given(sequence=message_streams().filter(bool), data=st.data())
def test_any_flipped_byte_raises_frame_error_or_decodes(
    sequence: list[Message], data: st.DataObject
) -> None:
    stream = bytearray(b"".join(m.data for m in sequence))
    position = data.draw(st.integers(0, len(stream) - 1), label="position")
    stream[position] ^= data.draw(st.integers(1, 255), label="mask")
    session = receiver()
    try:
        session.receive_data(bytes(stream))
    except FrameError:
        assert_terminal(session)
        return
    for event in events(session):
        assert isinstance(event, RpcEvent)
    # Whatever was decoded, the session still works (or waits for the rest of a message).
    session.call("still", b"alive")
    assert session.data_to_send()
