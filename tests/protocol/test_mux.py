"""Tests of the sans-IO stream multiplexer, two sessions joined by `transfer`."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from crdtswarm.errors import (
    ErrorCode,
    FlowControlError,
    FrameError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamResetError,
)
from crdtswarm.protocol.mux import (
    MAX_REASON_SIZE,
    PROTOCOL_WINDOW_SIZE,
    ConnectionTerminated,
    DataReceived,
    FrameType,
    MuxConfig,
    MuxEvent,
    MuxSession,
    PongReceived,
    StreamEnded,
    StreamInput,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
    encode_frame,
)
from crdtswarm.protocol.wire import Reader, encode_uvarint

REMOTE_ERRORS = (FrameError, FlowControlError, RemoteProtocolError)
SMALL = MuxConfig(initial_window_size=PROTOCOL_WINDOW_SIZE)


# -- helpers ------------------------------------------------------------------------


def pair(
    config: MuxConfig | None = None, server_config: MuxConfig | None = None, now: float = 0.0
) -> tuple[MuxSession, MuxSession]:
    config = config or MuxConfig()
    client = MuxSession(is_initiator=True, config=config, now=now)
    server = MuxSession(is_initiator=False, config=server_config or config, now=now)
    return client, server


def transfer(a: MuxSession, b: MuxSession, now: float) -> int:
    """Move data_to_send() both ways until both are quiet; return the message count."""
    count = 0
    while True:
        moved = 0
        for message in a.data_to_send(now):
            assert len(message) <= a.config.max_message_size
            b.receive_message(message, now)
            moved += 1
        for message in b.data_to_send(now):
            assert len(message) <= b.config.max_message_size
            a.receive_message(message, now)
            moved += 1
        if not moved:
            return count
        count += moved


def drain_all(session: MuxSession) -> list[MuxEvent]:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def drain(session: MuxSession) -> list[MuxEvent]:
    """Every queued event but WindowUpdated (the initial grants make many of those)."""
    return [e for e in drain_all(session) if not isinstance(e, WindowUpdated)]


def received(events: list[MuxEvent], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def parse_frames(message: bytes) -> list[tuple[int, int, bytes]]:
    reader = Reader(message)
    frames = []
    while not reader.at_end():
        frame_type = reader.read_u8()
        stream_id = reader.read_uvarint()
        frames.append((frame_type, stream_id, reader.read_bytes(reader.read_uvarint())))
    return frames


def goaway_code(messages: list[bytes]) -> int:
    frames = [f for m in messages for f in parse_frames(m)]
    assert frames, "no GOAWAY queued"
    frame_type, stream_id, payload = frames[-1]
    assert (frame_type, stream_id) == (FrameType.GOAWAY, 0)
    return Reader(payload).read_uvarint()


def reset_payload(code: int, reason: bytes = b"") -> bytes:
    return encode_uvarint(code) + encode_uvarint(len(reason)) + reason


# -- lifecycle ----------------------------------------------------------------------


def test_open_data_eof_lifecycle_both_directions() -> None:
    client, server = pair()
    sid = client.open_stream("chat")
    assert sid == 1
    assert client.send_data(sid, b"hello") == 5
    client.send_eof(sid)
    transfer(client, server, 0.0)
    assert drain(server) == [
        StreamOpened(stream_id=1, protocol="chat"),
        DataReceived(stream_id=1, data=b"hello"),
        StreamEnded(stream_id=1),
    ]
    assert server.stream_protocol(1) == "chat"
    assert server.stream_state(1) is StreamState.HALF_CLOSED_REMOTE
    assert client.stream_state(1) is StreamState.HALF_CLOSED_LOCAL
    server.consume(1, 5)
    assert server.send_data(1, b"world") == 5
    server.send_eof(1)
    assert server.stream_state(1) is StreamState.CLOSED
    transfer(client, server, 0.0)
    assert drain(client) == [
        DataReceived(stream_id=1, data=b"world"),
        StreamEnded(stream_id=1),
    ]
    assert client.stream_state(1) is StreamState.CLOSED
    for session in (client, server):
        stats = session.statistics()
        assert stats.open_streams == stats.local_streams == stats.remote_streams == 0
        assert stats.streams_opened == 1
    assert client.statistics().bytes_sent == server.statistics().bytes_received == 5


def test_stream_ids_have_the_openers_parity_and_increase() -> None:
    client, server = pair()
    assert [client.open_stream("a") for _ in range(3)] == [1, 3, 5]
    assert [server.open_stream("b") for _ in range(2)] == [2, 4]
    transfer(client, server, 0.0)
    opened_at_server = [e for e in drain(server) if isinstance(e, StreamOpened)]
    opened_at_client = [e for e in drain(client) if isinstance(e, StreamOpened)]
    assert [e.stream_id for e in opened_at_server] == [1, 3, 5]
    assert [(e.stream_id, e.protocol) for e in opened_at_client] == [(2, "b"), (4, "b")]
    assert client.is_initiator
    assert not server.is_initiator


@pytest.mark.parametrize("name", ["", "x" * 65, "é" * 33, "\ud800"])
def test_bad_protocol_names_are_refused(name: str) -> None:
    client, _ = pair()
    with pytest.raises(ValueError, match="protocol name"):
        client.open_stream(name)


def test_a_long_unicode_protocol_name_arrives_intact() -> None:
    client, server = pair()
    name = "é" * 32  # 64 UTF-8 bytes
    sid = client.open_stream(name)
    transfer(client, server, 0.0)
    assert drain(server)[0] == StreamOpened(stream_id=sid, protocol=name)


def test_small_frames_are_batched_and_large_data_split() -> None:
    client, _ = pair(MuxConfig(max_message_size=4096))
    sids = [client.open_stream(f"p{i}") for i in range(10)]
    for sid in sids:
        client.send_data(sid, b"x" * 10)
    assert len(client.data_to_send(0.0)) == 1  # 10 OPEN + 10 DATA frames in one message
    data = bytes(range(256)) * 200
    assert client.send_data(sids[0], data) == len(data)
    messages = client.data_to_send(0.0)
    assert len(messages) == math.ceil(len(data) / 4096)
    assert all(len(m) <= 4096 for m in messages)


def test_send_data_accepts_empty_data() -> None:
    client, _ = pair()
    sid = client.open_stream("p")
    assert client.send_data(sid, b"") == 0


# -- flow control -----------------------------------------------------------------------


def test_the_sender_is_blocked_at_the_window_until_the_reader_consumes() -> None:
    client, server = pair(SMALL)
    sid = client.open_stream("bulk")
    assert client.send_window(sid) == PROTOCOL_WINDOW_SIZE
    blob = bytes(200_000)
    assert client.send_data(sid, blob) == PROTOCOL_WINDOW_SIZE
    assert client.send_window(sid) == 0
    assert client.send_data(sid, blob) == 0
    transfer(client, server, 0.0)
    assert len(received(drain(server), sid)) == PROTOCOL_WINDOW_SIZE
    assert client.send_window(sid) == 0
    server.consume(sid, 1000)  # below half a window: batched, nothing sent
    assert server.data_to_send(0.0) == []
    server.consume(sid, PROTOCOL_WINDOW_SIZE // 2)
    transfer(client, server, 0.0)
    assert drain_all(client) == [WindowUpdated(stream_id=sid)]
    assert client.send_window(sid) == 1000 + PROTOCOL_WINDOW_SIZE // 2


def test_a_larger_window_is_granted_right_after_open() -> None:
    client, server = pair()  # 256 KiB windows
    sid = client.open_stream("bulk")
    assert client.send_window(sid) == PROTOCOL_WINDOW_SIZE
    transfer(client, server, 0.0)
    assert client.send_window(sid) == 256 * 1024
    assert WindowUpdated(stream_id=sid) in drain_all(client)


def test_a_stream_with_an_unread_backlog_does_not_block_another() -> None:
    client, server = pair(SMALL)
    slow = client.open_stream("slow")
    fast = client.open_stream("fast")
    assert client.send_data(slow, bytes(PROTOCOL_WINDOW_SIZE)) == PROTOCOL_WINDOW_SIZE
    transfer(client, server, 0.0)
    drain(server)  # never consumed: slow's backlog stays full
    total = 0
    for _ in range(10):
        sent = client.send_data(fast, b"f" * 40_000)
        assert sent == 40_000
        transfer(client, server, 0.0)
        got = received(drain(server), fast)
        server.consume(fast, len(got))
        total += len(got)
        transfer(client, server, 0.0)
    assert total == 400_000
    assert client.send_window(slow) == 0


def test_consume_more_than_received_is_a_value_error() -> None:
    client, server = pair()
    sid = client.open_stream("p")
    client.send_data(sid, b"abc")
    transfer(client, server, 0.0)
    with pytest.raises(ValueError, match="unread"):
        server.consume(sid, 4)
    with pytest.raises(ValueError, match="negative"):
        server.consume(sid, -1)
    with pytest.raises(LocalProtocolError, match="unknown"):
        server.consume(99, 1)


def test_the_outgoing_queue_is_bounded() -> None:
    config = MuxConfig(max_pending_frames_size=100_000)
    client, server = pair(config)
    a = client.open_stream("a")
    b = client.open_stream("b")
    transfer(client, server, 0.0)
    assert client.send_data(a, bytes(80_000)) == 80_000
    assert client.send_data(b, bytes(80_000)) == 20_000
    assert client.statistics().pending_send_size == 100_000
    assert client.send_data(b, b"more") == 0  # no room, although there is credit
    assert client.send_window(b) == 256 * 1024 - 20_000
    client.data_to_send(0.0)
    assert client.send_data(b, bytes(250_000)) == 100_000


# -- reset, refusal, limits ----------------------------------------------------------


def test_reset_with_code_and_message_arrives_as_stream_reset() -> None:
    client, server = pair()
    sid = client.open_stream("p")
    client.send_data(sid, b"partial")
    transfer(client, server, 0.0)
    drain(server)
    client.reset_stream(sid, ErrorCode.CANCELLED, "changed my mind")
    transfer(client, server, 0.0)
    assert drain(server) == [
        StreamReset(stream_id=sid, code=ErrorCode.CANCELLED, message="changed my mind")
    ]
    with pytest.raises(StreamResetError) as info:
        server.send_data(sid, b"late")
    assert info.value.code == ErrorCode.CANCELLED
    assert info.value.message == "changed my mind"
    with pytest.raises(LocalProtocolError, match="reset"):
        client.send_data(sid, b"late")
    client.reset_stream(sid, ErrorCode.CANCELLED)  # resetting again does nothing
    server.reset_stream(sid, ErrorCode.CANCELLED)
    assert client.data_to_send(0.0) == server.data_to_send(0.0) == []
    assert client.statistics().open_streams == server.statistics().open_streams == 0


def test_unknown_codes_travel_as_ints_and_long_reasons_are_truncated() -> None:
    client, server = pair()
    sid = client.open_stream("p")
    client.reset_stream(sid, 1000, "é" * 200)
    transfer(client, server, 0.0)
    event = drain(server)[-1]
    assert isinstance(event, StreamReset)
    assert event.code == 1000
    assert not isinstance(event.code, ErrorCode)
    assert event.message == "é" * (MAX_REASON_SIZE // 2)
    with pytest.raises(ValueError, match="error code"):
        client.reset_stream(sid, -1)


def test_reset_drops_queued_data() -> None:
    client, server = pair()
    sid = client.open_stream("p")
    client.send_data(sid, bytes(50_000))
    client.reset_stream(sid, ErrorCode.CANCELLED)
    transfer(client, server, 0.0)
    assert drain(server) == [
        StreamOpened(stream_id=sid, protocol="p"),
        StreamReset(stream_id=sid, code=ErrorCode.CANCELLED, message=""),
    ]
    assert client.statistics().bytes_sent == 0


def test_data_racing_with_a_local_reset_is_ignored_but_counted() -> None:
    client, server = pair(SMALL)
    sid = client.open_stream("p")
    client.send_data(sid, bytes(1000))
    transfer(client, server, 0.0)
    drain(server)
    server.reset_stream(sid, ErrorCode.CANCELLED)
    server.data_to_send(0.0)  # the RESET is "in flight"
    server.receive_message(encode_frame(FrameType.DATA, sid, bytes(30_000)), 0.0)
    assert drain(server) == []  # ignored
    overshoot = encode_frame(FrameType.DATA, sid, bytes(PROTOCOL_WINDOW_SIZE - 30_000))
    with pytest.raises(FlowControlError):
        server.receive_message(overshoot, 0.0)
    assert server.is_closed
    assert goaway_code(server.data_to_send(0.0)) == ErrorCode.FLOW_CONTROL_ERROR


def test_streams_beyond_max_streams_are_refused() -> None:
    client, server = pair(MuxConfig(), MuxConfig(max_streams=2))
    sids = [client.open_stream("p") for _ in range(3)]
    for sid in sids:
        client.send_data(sid, b"hi")
    transfer(client, server, 0.0)
    server_events = drain(server)
    assert [e.stream_id for e in server_events if isinstance(e, StreamOpened)] == sids[:2]
    assert received(server_events, sids[2]) == b""
    assert StreamReset(stream_id=sids[2], code=ErrorCode.REFUSED, message="too many streams") in (
        drain(client)
    )
    assert server.statistics().streams_refused == 1
    assert client.statistics().open_streams == 2
    # closing one makes room for the next
    client.reset_stream(sids[0], ErrorCode.CANCELLED)
    fourth = client.open_stream("p")
    transfer(client, server, 0.0)
    assert StreamOpened(stream_id=fourth, protocol="p") in drain(server)


def test_local_stream_limits() -> None:
    client, _ = pair(MuxConfig(max_open_streams=2))
    first = client.open_stream("p")
    client.open_stream("p")
    with pytest.raises(LocalProtocolError, match="too many"):
        client.open_stream("p")
    client.reset_stream(first, ErrorCode.CANCELLED)
    assert client.open_stream("p") == 5
    with pytest.raises(LocalProtocolError, match="unknown"):
        client.send_data(99, b"x")
    with pytest.raises(LocalProtocolError, match="unknown"):
        client.send_eof(2)
    with pytest.raises(LocalProtocolError, match="unknown"):
        client.reset_stream(7, ErrorCode.CANCELLED)
    with pytest.raises(LocalProtocolError, match="unknown"):
        client.send_window(7)
    with pytest.raises(LocalProtocolError, match="no record"):
        client.stream_protocol(7)


def test_send_after_eof_is_a_local_error() -> None:
    client, _ = pair()
    sid = client.open_stream("p")
    client.send_eof(sid)
    with pytest.raises(LocalProtocolError, match=r"half-closed \(local\)"):
        client.send_data(sid, b"x")
    with pytest.raises(LocalProtocolError):
        client.send_eof(sid)
    assert client.send_window(sid) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_window_size": PROTOCOL_WINDOW_SIZE - 1},
        {"max_streams": -1},
        {"max_message_size": 100},
        {"max_protocol_name_size": 0},
        {"keepalive_interval": 0.0},
        {"max_pending_frames_size": 1024},
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each field has its own message
        MuxConfig(**kwargs)  # type: ignore[arg-type]


# -- keepalive, ping, goaway -------------------------------------------------------------


def test_keepalive_ping_after_idle_then_timeout() -> None:
    client, server = pair(now=100.0)
    assert client.get_timer() == 110.0
    client.handle_timer(105.0)  # too early: nothing
    assert client.data_to_send(105.0) == []
    client.handle_timer(110.0)
    ping = client.data_to_send(110.0)
    assert [f[0] for f in parse_frames(ping[0])] == [FrameType.PING]
    server.receive_message(ping[0], 110.1)
    client.receive_message(server.data_to_send(110.1)[0], 110.2)
    [pong] = drain(client)
    assert isinstance(pong, PongReceived)
    assert pong.rtt == pytest.approx(0.2)
    assert client.get_timer() == pytest.approx(120.2)
    # the peer goes silent: pings every interval, then the timeout
    now = 120.2
    while (timer := client.get_timer()) is not None and timer < 140.2:
        now = timer
        client.handle_timer(now)
        assert not client.is_closed
    assert client.get_timer() == pytest.approx(140.2)
    client.handle_timer(140.2)
    assert client.is_closed
    assert client.get_timer() is None
    assert drain(client) == [
        ConnectionTerminated(
            code=ErrorCode.TIMEOUT, message="nothing received for 30.0 s", remote=False
        )
    ]
    assert goaway_code(client.data_to_send(140.2)) == ErrorCode.TIMEOUT


def test_any_received_frame_resets_the_idle_clock() -> None:
    client, server = pair()
    sid = server.open_stream("p")
    server.send_data(sid, b"x")
    client.receive_message(server.data_to_send(8.0)[0], 8.0)
    assert client.get_timer() == 18.0


def test_keepalive_can_be_disabled() -> None:
    client, _ = pair(MuxConfig(keepalive_interval=math.inf, keepalive_timeout=math.inf))
    assert client.get_timer() is None


def test_ping_reports_the_round_trip_time() -> None:
    client, server = pair()
    first = client.ping(1.0)
    second = client.ping(1.5)
    for message in client.data_to_send(1.5):
        server.receive_message(message, 1.6)
    for message in server.data_to_send(1.6):
        client.receive_message(message, 2.0)
    assert drain(client) == [
        PongReceived(rtt=1.0, ping_id=first),
        PongReceived(rtt=0.5, ping_id=second),
    ]
    assert drain(server) == []


def test_close_flushes_queued_data_then_goaway() -> None:
    client, server = pair()
    sid = client.open_stream("p")
    client.send_data(sid, b"last words")
    client.close(ErrorCode.NO_ERROR, "bye")
    client.close()  # twice is fine
    assert client.is_closed
    with pytest.raises(LocalProtocolError, match="closed"):
        client.open_stream("p")
    with pytest.raises(LocalProtocolError, match="closed"):
        client.send_data(sid, b"more")
    with pytest.raises(LocalProtocolError, match="closed"):
        client.ping(0.0)
    transfer(client, server, 0.0)
    assert drain(server) == [
        StreamOpened(stream_id=sid, protocol="p"),
        DataReceived(stream_id=sid, data=b"last words"),
        ConnectionTerminated(code=ErrorCode.NO_ERROR, message="bye", remote=True),
    ]
    assert server.is_closed
    assert server.get_timer() is None
    # frames arriving after the end are ignored
    server.receive_message(b"\xff garbage", 1.0)
    assert drain(server) == []


# -- protocol violations -------------------------------------------------------------


def _violations() -> list[tuple[str, bytes, type[RemoteProtocolError]]]:
    data1 = encode_frame(FrameType.DATA, 1, b"x")
    return [
        ("unknown type", encode_frame(0x42, 0, b""), FrameError),
        ("truncated header", b"\x00", FrameError),
        ("truncated payload", encode_frame(FrameType.DATA, 1, b"abc")[:-1], FrameError),
        ("DATA never opened", encode_frame(FrameType.DATA, 3, b"x"), RemoteProtocolError),
        ("DATA on our parity", encode_frame(FrameType.DATA, 2, b"x"), RemoteProtocolError),
        ("DATA on stream 0", encode_frame(FrameType.DATA, 0, b"x"), FrameError),
        ("OPEN wrong parity", encode_frame(FrameType.OPEN, 2, b"p"), RemoteProtocolError),
        ("OPEN reused id", encode_frame(FrameType.OPEN, 1, b"p"), RemoteProtocolError),
        ("OPEN skipping ids", encode_frame(FrameType.OPEN, 5, b"p"), RemoteProtocolError),
        ("OPEN empty name", encode_frame(FrameType.OPEN, 3, b""), FrameError),
        ("OPEN long name", encode_frame(FrameType.OPEN, 3, b"p" * 65), FrameError),
        ("OPEN bad UTF-8", encode_frame(FrameType.OPEN, 3, b"\xff"), FrameError),
        ("beyond window", encode_frame(FrameType.DATA, 1, bytes(70_000)), FlowControlError),
        ("WINDOW_UPDATE 0", encode_frame(FrameType.WINDOW_UPDATE, 1, b"\x00"), RemoteProtocolError),
        (
            "WINDOW_UPDATE overflow",
            encode_frame(FrameType.WINDOW_UPDATE, 1, encode_uvarint(2**31)),
            FlowControlError,
        ),
        (
            "WINDOW_UPDATE trailing",
            encode_frame(FrameType.WINDOW_UPDATE, 1, b"\x01\x01"),
            FrameError,
        ),
        ("EOF with payload", encode_frame(FrameType.EOF, 1, b"x"), FrameError),
        ("DATA after EOF", encode_frame(FrameType.EOF, 1) + data1, RemoteProtocolError),
        ("EOF twice", encode_frame(FrameType.EOF, 1) * 2, RemoteProtocolError),
        (
            "DATA after RESET",
            encode_frame(FrameType.RESET, 1, reset_payload(7)) + data1,
            RemoteProtocolError,
        ),
        (
            "RESET long reason",
            encode_frame(FrameType.RESET, 1, reset_payload(7, b"r" * 257)),
            FrameError,
        ),
        (
            "RESET bad UTF-8",
            encode_frame(FrameType.RESET, 1, reset_payload(7, b"\xc3")),
            FrameError,
        ),
        ("PING short", encode_frame(FrameType.PING, 0, b"1234567"), FrameError),
        ("PING on a stream", encode_frame(FrameType.PING, 1, b"12345678"), FrameError),
        ("GOAWAY on a stream", encode_frame(FrameType.GOAWAY, 1, reset_payload(0)), FrameError),
        ("over-long varint", b"\x00\x81\x00\x00", FrameError),
    ]


@pytest.mark.parametrize(
    ("message", "error"), [v[1:] for v in _violations()], ids=[v[0] for v in _violations()]
)
def test_violations_send_goaway_then_raise(
    message: bytes, error: type[RemoteProtocolError]
) -> None:
    client, server = pair(SMALL)
    sid = client.open_stream("p")  # stream 1, opened by the client, known to the server
    client.send_data(sid, b"hello")
    transfer(client, server, 0.0)
    server.send_data(sid, b"queued, dropped by the abort")
    with pytest.raises(error) as info:
        server.receive_message(message, 1.0)
    assert type(info.value) is error
    assert server.is_closed
    messages = server.data_to_send(1.0)
    assert len(messages) == 1
    assert len(parse_frames(messages[0])) == 1
    assert goaway_code(messages) == info.value.code
    assert server.data_to_send(1.0) == []


def test_a_control_frame_flood_is_a_protocol_error() -> None:
    _, server = pair(MuxConfig(max_message_size=1024, max_pending_frames_size=1024))
    ping = encode_frame(FrameType.PING, 0, bytes(8))
    server.receive_message(ping * 90, 0.0)  # 90 PONGs of 11 bytes fit in 1024
    with pytest.raises(RemoteProtocolError, match="provokes"):
        server.receive_message(ping * 10, 0.0)
    assert goaway_code(server.data_to_send(0.0)) == ErrorCode.PROTOCOL_ERROR


def test_unread_events_are_bounded() -> None:
    _, server = pair(MuxConfig(max_message_size=1024))
    churn = [  # each message: 50 streams opened and reset, 100 events
        b"".join(
            encode_frame(FrameType.OPEN, i, b"p")
            + encode_frame(FrameType.RESET, i, reset_payload(7))
            for i in range(1 + 100 * m, 101 + 100 * m, 2)
        )
        for m in range(12)
    ]
    for message in churn[:11]:
        server.receive_message(message, 0.0)
    with pytest.raises(LocalProtocolError, match="drain"):
        server.receive_message(churn[11], 0.0)
    assert not server.is_closed
    assert len(drain(server)) == 1100
    server.receive_message(churn[11], 0.0)
    assert len(drain(server)) == 100


# -- the transition table, exhaustively ------------------------------------------------

S, In = StreamState, StreamInput
Outcome = StreamState | type[Exception]
_ROWS: dict[StreamState, list[Outcome]] = {
    S.OPEN: [
        S.OPEN, S.HALF_CLOSED_LOCAL, S.RESET_LOCAL,
        S.OPEN, S.HALF_CLOSED_REMOTE, S.RESET_REMOTE, S.OPEN,
    ],
    S.HALF_CLOSED_LOCAL: [
        LocalProtocolError, LocalProtocolError, S.RESET_LOCAL,
        S.HALF_CLOSED_LOCAL, S.CLOSED, S.RESET_REMOTE, S.HALF_CLOSED_LOCAL,
    ],
    S.HALF_CLOSED_REMOTE: [
        S.HALF_CLOSED_REMOTE, S.CLOSED, S.RESET_LOCAL,
        RemoteProtocolError, RemoteProtocolError, S.RESET_REMOTE, S.HALF_CLOSED_REMOTE,
    ],
    S.CLOSED: [
        LocalProtocolError, LocalProtocolError, S.CLOSED,
        RemoteProtocolError, RemoteProtocolError, S.CLOSED, S.CLOSED,
    ],
    S.RESET_LOCAL: [
        LocalProtocolError, LocalProtocolError, S.RESET_LOCAL,
        S.RESET_LOCAL, S.RESET_LOCAL, S.RESET_LOCAL, S.RESET_LOCAL,
    ],
    S.RESET_REMOTE: [
        StreamResetError, StreamResetError, S.RESET_REMOTE,
        RemoteProtocolError, RemoteProtocolError, RemoteProtocolError, S.RESET_REMOTE,
    ],
}  # fmt: skip
SPEC: dict[tuple[StreamState, StreamInput], Outcome] = {
    (state, event): outcome
    for state, row in _ROWS.items()
    for event, outcome in zip(StreamInput, row, strict=True)
}


def _bring_to(state: StreamState) -> tuple[MuxSession, MuxSession, int]:
    """Return (client, server, sid) with the client's view of stream sid in ``state``."""
    client, server = pair()
    sid = client.open_stream("p")
    transfer(client, server, 0.0)
    if state in (S.HALF_CLOSED_LOCAL, S.CLOSED):
        client.send_eof(sid)
    if state in (S.HALF_CLOSED_REMOTE, S.CLOSED):
        server.send_eof(sid)
    if state is S.RESET_LOCAL:
        client.reset_stream(sid, ErrorCode.CANCELLED)
    if state is S.RESET_REMOTE:
        server.reset_stream(sid, ErrorCode.CANCELLED)
    transfer(client, server, 0.0)
    drain(client)
    assert client.stream_state(sid) is state
    return client, server, sid


def _apply(session: MuxSession, sid: int, event: StreamInput) -> None:
    frames = {
        In.RECV_DATA: encode_frame(FrameType.DATA, sid, b"x"),
        In.RECV_EOF: encode_frame(FrameType.EOF, sid),
        In.RECV_RESET: encode_frame(FrameType.RESET, sid, reset_payload(7)),
        In.RECV_WINDOW_UPDATE: encode_frame(FrameType.WINDOW_UPDATE, sid, b"\x01"),
    }
    if event is In.SEND_DATA:
        session.send_data(sid, b"x")
    elif event is In.SEND_EOF:
        session.send_eof(sid)
    elif event is In.SEND_RESET:
        session.reset_stream(sid, ErrorCode.CANCELLED)
    else:
        session.receive_message(frames[event], 0.0)


@pytest.mark.parametrize(("state", "event"), list(SPEC), ids=lambda v: v.name)
def test_every_state_input_pair_transitions_or_raises(
    state: StreamState, event: StreamInput
) -> None:
    client, server, sid = _bring_to(state)
    outcome = SPEC[state, event]
    if isinstance(outcome, StreamState):
        _apply(client, sid, event)
        assert client.stream_state(sid) is outcome
        assert not client.is_closed
        transfer(client, server, 0.0)  # and the peer accepts what we sent
    else:
        with pytest.raises(outcome):
            _apply(client, sid, event)
        assert client.is_closed is (outcome is RemoteProtocolError)


# -- property tests --------------------------------------------------------------------

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    max_message_size=st.sampled_from([1024, 3000, 65519]),
    window=st.sampled_from([PROTOCOL_WINDOW_SIZE, 100_000, 256 * 1024]),
    streams=st.lists(st.booleans(), min_size=1, max_size=5),  # True: the client opens it
    writes=st.lists(
        st.tuples(
            st.integers(0, 4),
            st.one_of(st.integers(0, 3000), st.integers(60_000, 200_000)),
            st.booleans(),
        ),
        min_size=1,
        max_size=20,
    ),
    seed=st.integers(0, 2**32),
)
def test_every_stream_arrives_intact_and_in_order(
    max_message_size: int,
    window: int,
    streams: list[bool],
    writes: list[tuple[int, int, bool]],
    seed: int,
) -> None:
    rng = random.Random(seed)
    config = MuxConfig(initial_window_size=window, max_message_size=max_message_size)
    client, server = pair(config)
    sides = {True: (client, server), False: (server, client)}
    opened = [(sides[c], sides[c][0].open_stream(f"s{i}")) for i, c in enumerate(streams)]
    backlog: dict[int, bytes] = defaultdict(bytes)
    sent: dict[int, bytes] = defaultdict(bytes)
    got: dict[int, bytes] = defaultdict(bytes)

    def pump() -> None:
        for (writer, _), sid in opened:
            n = writer.send_data(sid, backlog[sid])
            sent[sid] += backlog[sid][:n]
            backlog[sid] = backlog[sid][n:]

    def deliver() -> None:
        for session in (client, server):
            for event in drain(session):
                if isinstance(event, DataReceived):
                    got[event.stream_id] += event.data
                    session.consume(event.stream_id, len(event.data))

    for index, size, flush in writes:
        (_, sid) = opened[index % len(opened)]
        backlog[sid] += rng.randbytes(size)
        pump()
        if flush:
            transfer(client, server, 0.0)
            deliver()
    while any(backlog.values()) or client.statistics().pending_send_size:
        pump()
        transfer(client, server, 0.0)
        deliver()
    transfer(client, server, 0.0)
    deliver()
    for (_, _), sid in opened:
        assert got[sid] == sent[sid]


def _session_with_stream() -> MuxSession:
    client, server = pair(SMALL)
    client.open_stream("p")
    server.open_stream("q")
    transfer(client, server, 0.0)
    drain(server)
    return server


def _check_garbage_outcome(session: MuxSession, message: bytes) -> None:
    error: FrameError | FlowControlError | RemoteProtocolError | None = None
    try:
        session.receive_message(message, 1.0)
    except REMOTE_ERRORS as exc:
        error = exc
    if error is not None:
        assert session.is_closed
        assert goaway_code(session.data_to_send(1.0)) == error.code
    else:
        session.data_to_send(1.0)  # whatever was valid produced well-formed output
        drain(session)


@settings(max_examples=300, deadline=None)
@given(message=st.binary(max_size=200))
def test_random_bytes_raise_only_typed_errors(message: bytes) -> None:
    _check_garbage_outcome(_session_with_stream(), message)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(
        st.tuples(
            st.integers(0, 8),
            st.integers(0, 6),
            st.one_of(
                st.binary(max_size=20),
                st.integers(0, 2**33).map(encode_uvarint),
                st.just(reset_payload(3, b"why")),
            ),
        ),
        min_size=1,
        max_size=6,
    ),
    cut=st.integers(0, 400),
    flip=st.tuples(st.integers(0, 400), st.integers(1, 255)),
)
def test_near_valid_frames_raise_only_typed_errors(
    frames: list[tuple[int, int, bytes]], cut: int, flip: tuple[int, int]
) -> None:
    message = bytearray(b"".join(encode_frame(t, s, p) for t, s, p in frames))
    position, mask = flip
    if message and position < len(message) and position % 3 == 0:
        message[position] ^= mask
    if cut < len(message) and cut % 2:
        del message[cut:]
    _check_garbage_outcome(_session_with_stream(), bytes(message))


@FAST
@given(
    window=st.integers(PROTOCOL_WINDOW_SIZE, 300_000),
    split=st.integers(0, 3),
    overshoot=st.integers(1, 5000),
)
def test_data_beyond_the_window_is_a_flow_control_error(
    window: int, split: int, overshoot: int
) -> None:
    client, server = pair(MuxConfig(initial_window_size=window))
    sid = client.open_stream("p")
    transfer(client, server, 0.0)
    total = window + overshoot
    chunks = [total // (split + 1)] * split + [total - split * (total // (split + 1))]
    for chunk in chunks[:-1]:
        server.receive_message(encode_frame(FrameType.DATA, sid, bytes(chunk)), 0.0)
    with pytest.raises(FlowControlError):
        server.receive_message(encode_frame(FrameType.DATA, sid, bytes(chunks[-1])), 0.0)
    assert server.is_closed
    assert goaway_code(server.data_to_send(0.0)) == ErrorCode.FLOW_CONTROL_ERROR


# -- a state machine over random stream operations on both sides ------------------------


class MuxMachine(RuleBasedStateMachine):
    """Random operations on both sessions, checked against a small model.

    Every operation either succeeds or raises the typed error the model predicts, and
    after each transfer every stream's bytes have arrived intact and in order.
    """

    streams = Bundle("streams")

    @initialize()
    def setup(self) -> None:
        config = MuxConfig(
            initial_window_size=PROTOCOL_WINDOW_SIZE, max_message_size=2048, max_streams=4
        )
        self.sessions = pair(config)
        self.now = 0.0
        self.sent: dict[tuple[int, int], bytes] = defaultdict(bytes)  # (side, sid)
        self.got: dict[tuple[int, int], bytes] = defaultdict(bytes)  # (receiving side, sid)
        self.ended: set[tuple[int, int]] = set()  # (side that sent EOF, sid)
        self.known: set[tuple[int, int]] = set()  # (side, sid) the side opened or saw opened
        self.local_reset: set[tuple[int, int]] = set()  # (side, sid) that side reset
        self.saw_reset: set[tuple[int, int]] = set()  # (side that got StreamReset, sid)
        self.saw_end: set[tuple[int, int]] = set()  # (side that got StreamEnded, sid)
        self.refused: set[int] = set()

    @rule(target=streams, side=st.integers(0, 1))
    def open_stream(self, side: int) -> int:
        session = self.sessions[side]
        try:
            sid = session.open_stream(f"p{side}")
        except LocalProtocolError:
            return 0  # too many open: the bundle gets a never-opened id
        self.known.add((side, sid))
        return sid

    @rule(sid=streams, side=st.integers(0, 1), size=st.integers(0, 5000))
    def send(self, sid: int, side: int, size: int) -> None:
        session = self.sessions[side]
        data = bytes((sid + len(self.sent[side, sid]) + i) % 251 for i in range(size))
        error = self.expected_send_error(side, sid)
        if error is None:
            n = session.send_data(sid, data)
            assert 0 <= n <= size
            self.sent[side, sid] += data[:n]
        else:
            with pytest.raises(error):
                session.send_data(sid, data)

    @rule(sid=streams, side=st.integers(0, 1))
    def eof(self, sid: int, side: int) -> None:
        error = self.expected_send_error(side, sid)
        if error is None:
            self.sessions[side].send_eof(sid)
            self.ended.add((side, sid))
        else:
            with pytest.raises(error):
                self.sessions[side].send_eof(sid)

    @rule(
        sid=streams,
        side=st.integers(0, 1),
        code=st.one_of(st.sampled_from(ErrorCode), st.integers(0, 10_000)),
    )
    def reset(self, sid: int, side: int, code: int) -> None:
        session = self.sessions[side]
        if (side, sid) in self.known:
            session.reset_stream(sid, code, "r")
        else:  # unknown to this side, unless it refused the stream (a no-op then)
            try:
                session.reset_stream(sid, code, "r")
            except LocalProtocolError:
                return
        self.local_reset.add((side, sid))

    @rule()
    def transfer(self) -> None:
        self.now += 0.01
        transfer(*self.sessions, self.now)
        self.collect()

    @rule(sid=streams, side=st.integers(0, 1))
    def consume_nothing(self, sid: int, side: int) -> None:
        if (side, sid) in self.known:
            self.sessions[side].consume(sid, 0)

    def expected_send_error(self, side: int, sid: int) -> type[Exception] | None:
        if (side, sid) not in self.known:
            return LocalProtocolError
        if (side, sid) in self.saw_reset:
            return StreamResetError
        if (side, sid) in self.ended or (side, sid) in self.local_reset:
            return LocalProtocolError
        return None

    def collect(self) -> None:
        for side, session in enumerate(self.sessions):
            for event in drain(session):
                if isinstance(event, DataReceived):
                    assert (side, event.stream_id) not in self.saw_end
                    self.got[side, event.stream_id] += event.data
                    session.consume(event.stream_id, len(event.data))
                elif isinstance(event, StreamEnded):
                    assert (1 - side, event.stream_id) in self.ended
                    self.saw_end.add((side, event.stream_id))
                elif isinstance(event, StreamReset):
                    if event.code == ErrorCode.REFUSED and event.message == "too many streams":
                        self.refused.add(event.stream_id)
                    else:
                        assert (1 - side, event.stream_id) in self.local_reset
                    self.saw_reset.add((side, event.stream_id))
                elif isinstance(event, StreamOpened):
                    self.known.add((side, event.stream_id))
                else:
                    assert isinstance(event, WindowUpdated | PongReceived)

    @precondition(lambda self: hasattr(self, "sessions"))
    @invariant()
    def data_arrives_intact_and_in_order(self) -> None:
        for (side, sid), data in self.sent.items():
            delivered = self.got[1 - side, sid]
            assert data.startswith(delivered)

    def teardown(self) -> None:
        if not hasattr(self, "sessions"):
            return
        transfer(*self.sessions, self.now)
        self.collect()
        for (side, sid), data in self.sent.items():
            reset = (0, sid) in self.local_reset or (1, sid) in self.local_reset
            if not reset and sid not in self.refused:
                assert self.got[1 - side, sid] == data
        for session in self.sessions:
            assert not session.is_closed
            stats = session.statistics()
            assert stats.open_streams == stats.local_streams + stats.remote_streams


MuxMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_mux_state_machine = MuxMachine.TestCase


# -- window auto-tuning ----------------------------------------------------------------


def _pump(client: MuxSession, server: MuxSession, sid: int, *, consume_all: bool) -> int:
    """One round: fill the send window, deliver, let the reader consume; return bytes read."""
    client.send_data(sid, bytes(client.send_window(sid)))
    transfer(client, server, 0.0)
    got = len(received(drain(server), sid))
    server.consume(sid, got if consume_all else got // 2)
    transfer(client, server, 0.0)
    drain_all(client)
    return got


def test_a_starved_reader_grows_the_window_up_to_the_maximum() -> None:
    config = MuxConfig(initial_window_size=PROTOCOL_WINDOW_SIZE, max_window_size=1024 * 1024)
    client, server = pair(config)
    sid = client.open_stream("bulk")
    transfer(client, server, 0.0)
    windows = []
    for _ in range(12):
        _pump(client, server, sid, consume_all=True)
        windows.append(client.send_window(sid))
    assert windows == sorted(windows)  # never shrinks
    assert windows[-1] == 1024 * 1024  # doubled up to the cap, not beyond
    assert max(windows) <= config.max_window_size


def test_a_lagging_reader_keeps_the_initial_window() -> None:
    config = MuxConfig(initial_window_size=PROTOCOL_WINDOW_SIZE, max_window_size=1024 * 1024)
    client, server = pair(config)
    sid = client.open_stream("bulk")
    transfer(client, server, 0.0)
    for _ in range(12):
        _pump(client, server, sid, consume_all=False)  # always leaves a backlog
        # credit held by the sender + unread bytes never exceed the initial window
        assert client.send_window(sid) <= PROTOCOL_WINDOW_SIZE


def test_growth_is_bounded_per_connection() -> None:
    budget = 128 * 1024
    config = MuxConfig(
        initial_window_size=PROTOCOL_WINDOW_SIZE,
        max_window_size=1024 * 1024,
        max_connection_window_size=budget,
    )
    client, server = pair(config)
    sids = [client.open_stream(f"s{i}") for i in range(3)]
    transfer(client, server, 0.0)
    for _ in range(10):
        for sid in sids:
            _pump(client, server, sid, consume_all=True)
    total = sum(client.send_window(sid) for sid in sids)
    assert total <= len(sids) * PROTOCOL_WINDOW_SIZE + budget
    assert total > len(sids) * PROTOCOL_WINDOW_SIZE  # some growth happened


def test_a_released_stream_returns_its_growth_to_the_budget() -> None:
    budget = 64 * 1024
    config = MuxConfig(
        initial_window_size=PROTOCOL_WINDOW_SIZE,
        max_window_size=1024 * 1024,
        max_connection_window_size=budget,
    )
    client, server = pair(config)
    first = client.open_stream("first")
    transfer(client, server, 0.0)
    for _ in range(4):
        _pump(client, server, first, consume_all=True)
    assert client.send_window(first) == PROTOCOL_WINDOW_SIZE + budget
    client.reset_stream(first, ErrorCode.CANCELLED)
    transfer(client, server, 0.0)
    drain_all(server)
    second = client.open_stream("second")
    transfer(client, server, 0.0)
    for _ in range(4):
        _pump(client, server, second, consume_all=True)
    assert client.send_window(second) == PROTOCOL_WINDOW_SIZE + budget
