"""The relay circuit protocol, driven by hand: codec, sessions, token bucket; no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtswarm.errors import FrameError, LocalProtocolError
from crdtswarm.identity import Identity, PublicKey
from crdtswarm.protocol.relay import (
    MAX_MESSAGE_SIZE,
    MAX_REASON_SIZE,
    MAX_RELAYS,
    CircuitAccepted,
    CircuitRefused,
    CircuitSession,
    CircuitState,
    ConnectRequested,
    DataReceived,
    IncomingAnnounced,
    RefusalReason,
    RelayEvent,
    RelayMessage,
    TokenBucket,
    decode_message,
    encode_message,
)
from crdtswarm.protocol.wire import encode_uvarint, encode_var_bytes

KEYS = [Identity(bytes([i]) * 32).public_key for i in range(1, 7)]
S, R1, R2, T, X, Y = KEYS
BAD_KEY = b"\xff" * 32  # 32 bytes that are not an Ed25519 point

# --- Helpers ---------------------------------------------------------------------


def events(session: CircuitSession) -> list[RelayEvent]:
    out: list[RelayEvent] = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def transfer(a: CircuitSession, b: CircuitSession) -> None:
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


def framed(body: bytes) -> bytes:
    return encode_uvarint(len(body)) + body


def keys_field(keys: list[PublicKey] | list[bytes]) -> bytes:
    return bytes((len(keys),)) + b"".join(bytes(k) for k in keys)


# --- Codec -----------------------------------------------------------------------

EXAMPLES: list[tuple[RelayMessage, bytes]] = [
    (ConnectRequested(target=T), framed(b"\x01" + bytes(T) + b"\x00\x00")),
    (
        ConnectRequested(target=T, via=(R2,)),
        framed(b"\x01" + bytes(T) + keys_field([R2]) + b"\x00"),
    ),
    (
        ConnectRequested(target=T, origin=(S,)),
        framed(b"\x01" + bytes(T) + b"\x00" + keys_field([S])),
    ),
    (IncomingAnnounced(origin=(S,)), framed(b"\x02" + keys_field([S]))),
    (IncomingAnnounced(origin=(S, R1)), framed(b"\x02" + keys_field([S, R1]))),
    (CircuitAccepted(), b"\x01\x03"),
    (
        CircuitRefused(reason=RefusalReason.LIMIT, message="full"),
        framed(b"\x04\x03" + encode_var_bytes(b"full")),
    ),
    (CircuitRefused(reason=99, message=""), framed(b"\x04\x63\x00")),
]


@pytest.mark.parametrize(("message", "wire"), EXAMPLES)
def test_known_encodings_round_trip(message: RelayMessage, wire: bytes) -> None:
    assert encode_message(message) == wire
    assert decode_message(wire) == message


def test_unknown_refusal_reasons_stay_numbers() -> None:
    assert RefusalReason.parse(2) is RefusalReason.NOT_LINKED
    assert RefusalReason.parse(200) == 200
    message = decode_message(encode_message(CircuitRefused(reason=200)))
    assert isinstance(message, CircuitRefused)
    assert message.reason == 200


key_lists = st.lists(st.sampled_from(KEYS), unique=True, max_size=4)
messages: st.SearchStrategy[RelayMessage] = st.one_of(
    key_lists.filter(lambda ks: 1 <= len(ks) <= MAX_RELAYS).map(
        lambda ks: ConnectRequested(target=ks[0], via=tuple(ks[1:]))
    ),
    key_lists.filter(lambda ks: 1 <= len(ks) <= MAX_RELAYS).map(
        lambda ks: ConnectRequested(target=ks[0], origin=tuple(ks[1:]))
    ),
    key_lists.filter(lambda ks: 1 <= len(ks) <= MAX_RELAYS).map(
        lambda ks: IncomingAnnounced(origin=tuple(ks))
    ),
    st.just(CircuitAccepted()),
    st.builds(
        CircuitRefused,
        reason=st.integers(0, 255).map(RefusalReason.parse),
        message=st.text(max_size=60),
    ),
)


@given(messages)
def test_every_message_round_trips(message: RelayMessage) -> None:
    wire = encode_message(message)
    assert len(wire) <= MAX_MESSAGE_SIZE + 2
    assert decode_message(wire) == message


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_decoder_accepts_only_canonical_messages(data: bytes) -> None:
    try:
        message = decode_message(data)
    except FrameError:
        return
    assert encode_message(message) == data  # whatever decodes is canonical


@settings(max_examples=300)
@given(messages, st.data())
def test_a_damaged_message_fails_cleanly_or_decodes_canonically(
    message: RelayMessage, data: st.DataObject
) -> None:
    wire = bytearray(encode_message(message))
    position = data.draw(st.integers(0, len(wire) - 1))
    wire[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(wire)))
    for candidate in (bytes(wire), bytes(wire[:cut])):
        try:
            decoded = decode_message(candidate)
        except FrameError:
            continue
        assert encode_message(decoded) == candidate


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"", "truncated"),
        (b"\x00", "0 bytes"),
        (framed(b"\x07"), "unknown relay message type"),
        (framed(b"\x03\x00"), "trailing"),
        (framed(b"\x01" + bytes(T) + b"\x00"), "truncated"),
        (framed(b"\x01" + bytes(T) + keys_field([R1]) + keys_field([S])), "more than 2 relays"),
        (framed(b"\x01" + bytes(T) + keys_field([R1, R2]) + b"\x00"), "at most 1"),
        (framed(b"\x01" + bytes(T) + keys_field([T]) + b"\x00"), "twice"),
        (framed(b"\x01" + BAD_KEY + b"\x00\x00"), "bad public key"),
        (framed(b"\x02\x00"), "without a source"),
        (framed(b"\x02" + keys_field([S, R1, R2])), "at most 2"),
        (framed(b"\x02" + keys_field([S, S])), "twice"),
        (framed(b"\x04\x01\x02\xff\xfe"), "UTF-8"),
        (framed(b"\x04\x01" + encode_var_bytes(b"x" * (MAX_REASON_SIZE + 1))), "exceeds"),
        (framed(b"\x03") + b"\x00", "got 2"),
        (encode_uvarint(MAX_MESSAGE_SIZE + 1) + bytes(MAX_MESSAGE_SIZE + 1), "1 to 512"),
        (b"\x80\x80\x01", "larger than 512"),
    ],
)
def test_malformed_messages_raise_frame_error(wire: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        decode_message(wire)


@pytest.mark.parametrize(
    "message",
    [
        ConnectRequested(target=T, via=(R1,), origin=(S,)),
        ConnectRequested(target=T, via=(R1, R2)),
        ConnectRequested(target=T, via=(T,)),
        IncomingAnnounced(origin=()),
        IncomingAnnounced(origin=(S, R1, R2)),
        IncomingAnnounced(origin=(S, S)),
        CircuitRefused(reason=256),
        CircuitRefused(reason=-1),
    ],
)
def test_encoding_refuses_what_the_decoder_would(message: RelayMessage) -> None:
    with pytest.raises(ValueError, match=r"relay|twice|INCOMING|reason"):
        encode_message(message)


def test_encoding_refuses_non_messages() -> None:
    with pytest.raises(ValueError, match="not a relay message"):
        encode_message(DataReceived(data=b"x"))  # type: ignore[arg-type]


def test_long_refusal_messages_are_cut_at_a_character_boundary() -> None:
    message = decode_message(encode_message(CircuitRefused(reason=1, message="é" * 500)))
    assert isinstance(message, CircuitRefused)
    assert message.message == "é" * (MAX_REASON_SIZE // 2)


# --- Sessions --------------------------------------------------------------------


def test_a_circuit_opens_and_then_carries_opaque_bytes() -> None:
    source, relay = CircuitSession(is_opener=True), CircuitSession(is_opener=False)
    source.send_connect(T, via=(R2,))
    transfer(source, relay)
    assert events(relay) == [ConnectRequested(target=T, via=(R2,))]
    assert relay.state is CircuitState.REQUESTED
    relay.accept()
    transfer(source, relay)
    assert events(source) == [CircuitAccepted()]
    assert source.state is relay.state is CircuitState.OPEN
    # after OK, everything is opaque, even bytes that look like control messages
    source.receive_data(encode_message(CircuitAccepted()))
    relay.receive_data(b"\x01\x03")
    assert events(source) == [DataReceived(data=b"\x01\x03")]
    assert events(relay) == [DataReceived(data=b"\x01\x03")]


def test_a_refused_circuit_is_terminal() -> None:
    relay, target = CircuitSession(is_opener=True), CircuitSession(is_opener=False)
    relay.send_incoming((S,))
    transfer(relay, target)
    assert events(target) == [IncomingAnnounced(origin=(S,))]
    target.refuse(RefusalReason.NOT_ACCEPTING, "busy")
    transfer(relay, target)
    assert events(relay) == [CircuitRefused(reason=RefusalReason.NOT_ACCEPTING, message="busy")]
    assert relay.state is target.state is CircuitState.REFUSED
    with pytest.raises(FrameError, match="refused"):
        relay.receive_data(b"\x01")  # nothing may follow REFUSED
    assert relay.state is CircuitState.FAILED
    with pytest.raises(FrameError):
        relay.receive_data(b"")  # and it stays failed


def test_bytes_that_come_with_the_ok_are_data() -> None:
    opener = CircuitSession(is_opener=True)
    opener.send_connect(T)
    opener.receive_data(encode_message(CircuitAccepted()) + b"noise msg1")
    assert events(opener) == [CircuitAccepted(), DataReceived(data=b"noise msg1")]


@settings(max_examples=200)
@given(st.data())
def test_sessions_do_not_care_how_input_is_split(data: st.DataObject) -> None:
    stream = encode_message(IncomingAnnounced(origin=(S, R1)))
    refused = encode_message(CircuitRefused(reason=5, message="no"))
    accepted = encode_message(CircuitAccepted()) + b"payload"
    answer = data.draw(st.sampled_from([refused, accepted]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    acceptor = CircuitSession(is_opener=False)
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        acceptor.receive_data(stream[start:end])
    assert events(acceptor) == [IncomingAnnounced(origin=(S, R1))]
    opener = CircuitSession(is_opener=True)
    opener.send_incoming((S, R1))
    for byte in answer:
        opener.receive_data(bytes((byte,)))
    got = events(opener)
    whole = CircuitSession(is_opener=True)
    whole.send_incoming((S, R1))
    whole.receive_data(answer)
    expected = events(whole)
    assert got[0] == expected[0]
    assert b"".join(e.data for e in got[1:] if isinstance(e, DataReceived)) == b"".join(
        e.data for e in expected[1:] if isinstance(e, DataReceived)
    )


@pytest.mark.parametrize(
    ("is_opener", "before", "wire", "match"),
    [
        (True, False, encode_message(CircuitAccepted()), "'idle' cannot receive data"),
        (True, True, encode_message(ConnectRequested(target=T)), "cannot receive a request"),
        (False, False, encode_message(CircuitAccepted()), "cannot receive OK"),
        (False, False, encode_message(CircuitRefused(reason=1)), "cannot receive REFUSED"),
        (False, True, b"\x00", "requested' cannot receive data"),
    ],
)
def test_input_the_state_does_not_allow_fails_the_session(
    is_opener: bool, before: bool, wire: bytes, match: str
) -> None:
    session = CircuitSession(is_opener=is_opener)
    if before and is_opener:
        session.send_connect(T)
    elif before:
        session.receive_data(encode_message(ConnectRequested(target=T)))
    with pytest.raises(FrameError, match=match):
        session.receive_data(wire)
    assert session.state is CircuitState.FAILED
    with pytest.raises(FrameError, match=match):
        session.receive_data(b"more")


def test_a_length_prefix_that_announces_too_much_fails_at_once() -> None:
    session = CircuitSession(is_opener=False)
    session.receive_data(b"\x81")  # could still be a small two-byte length
    with pytest.raises(FrameError, match="513 bytes"):
        session.receive_data(b"\x04")  # 513: fails before any of the body is buffered


LOCAL_CALLS = {
    "connect": lambda s: s.send_connect(T),
    "incoming": lambda s: s.send_incoming((S,)),
    "accept": lambda s: s.accept(),
    "refuse": lambda s: s.refuse(RefusalReason.LIMIT),
}


def session_in(is_opener: bool, state: CircuitState) -> CircuitSession:
    session = CircuitSession(is_opener=is_opener)
    if state is CircuitState.IDLE:
        return session
    if is_opener:
        session.send_connect(T)
        answer = {
            CircuitState.REQUESTED: b"",
            CircuitState.OPEN: encode_message(CircuitAccepted()),
            CircuitState.REFUSED: encode_message(CircuitRefused(reason=1)),
            CircuitState.FAILED: encode_message(ConnectRequested(target=T)),
        }[state]
    else:
        session.receive_data(encode_message(ConnectRequested(target=T)))
        if state is CircuitState.OPEN:
            session.accept()
        elif state is CircuitState.REFUSED:
            session.refuse(1)
        answer = b"\x00" if state is CircuitState.FAILED else b""
    try:
        session.receive_data(answer)
    except FrameError:
        assert state is CircuitState.FAILED
    session.data_to_send()
    assert session.state is state
    return session


ALLOWED = {
    (True, CircuitState.IDLE): {"connect", "incoming"},
    (False, CircuitState.REQUESTED): {"accept", "refuse"},
}


@pytest.mark.parametrize("is_opener", [True, False])
@pytest.mark.parametrize("state", list(CircuitState))
@pytest.mark.parametrize("call", sorted(LOCAL_CALLS))
def test_every_local_call_transitions_or_raises(
    is_opener: bool, state: CircuitState, call: str
) -> None:
    session = session_in(is_opener, state)
    if call in ALLOWED.get((is_opener, state), set()):
        LOCAL_CALLS[call](session)
        assert session.data_to_send()
        assert session.state is not state
    else:
        with pytest.raises(LocalProtocolError):
            LOCAL_CALLS[call](session)
        assert session.state is state
        assert session.data_to_send() == b""


def test_bad_local_arguments_raise_value_error_and_change_nothing() -> None:
    session = CircuitSession(is_opener=True)
    with pytest.raises(ValueError, match="relays"):
        session.send_connect(T, via=(R1,), origin=(S,))
    with pytest.raises(ValueError, match="twice"):
        session.send_incoming((S, S))
    assert session.state is CircuitState.IDLE
    acceptor = session_in(False, CircuitState.REQUESTED)
    with pytest.raises(ValueError, match="one byte"):
        acceptor.refuse(300)
    assert acceptor.state is CircuitState.REQUESTED


# --- Token bucket ----------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=1000, burst=500, now=0.0)
    assert bucket.reserve(500, 0.0) == 0.0  # the burst
    assert bucket.reserve(100, 0.0) == pytest.approx(0.1)  # in debt: wait 100 ms
    assert bucket.reserve(100, 0.1) == pytest.approx(0.1)  # the debt was paid at 0.1
    assert bucket.reserve(0, 10.0) == 0.0  # refilled, but never above the burst
    assert bucket.reserve(600, 10.0) == pytest.approx(0.1)


@given(st.lists(st.tuples(st.integers(1, 5000), st.floats(0, 0.5)), max_size=40))
def test_token_bucket_never_exceeds_burst_plus_rate(steps: list[tuple[int, float]]) -> None:
    rate, burst = 10_000.0, 2_000.0
    bucket = TokenBucket(rate, burst, now=0.0)
    now = sent = 0.0
    for size, pause in steps:
        now += pause
        now += bucket.reserve(size, now)  # the caller honours the delay, then sends
        sent += size
        assert sent <= burst + rate * now + 1e-6


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 1)])
def test_token_bucket_rejects_bad_settings(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="> 0"):
        TokenBucket(rate, burst, now=0.0)
