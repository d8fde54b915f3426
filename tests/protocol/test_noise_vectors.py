"""crdtswarm.protocol.noise against the cacophony vectors, plus the spec's rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest

from crdtswarm.errors import FrameError, HandshakeError, LocalProtocolError
from crdtswarm.protocol.noise import (
    MAX_MESSAGE_SIZE,
    MAX_NONCE,
    SUPPORTED_PATTERNS,
    CipherState,
    HandshakePattern,
    HandshakeState,
    parse_protocol_name,
)

# Same folder as tests/conftest.py's SHARED: /work/shared next to the repository.
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
VECTOR_DIR = SHARED / "data" / "noise"
VECTOR_FILE = VECTOR_DIR / "cacophony-25519-chachapoly.json"

if not VECTOR_DIR.is_dir():
    pytest.skip(f"Noise test vectors not present: {VECTOR_DIR} is missing", allow_module_level=True)

REQUIRED = (
    "Noise_XX_25519_ChaChaPoly_BLAKE2b",
    "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b",
    "Noise_NN_25519_ChaChaPoly_BLAKE2b",
    "Noise_IK_25519_ChaChaPoly_BLAKE2b",
)


def is_supported(protocol_name: str) -> bool:
    try:
        parse_protocol_name(protocol_name)
    except ValueError:
        return False
    return True


ALL_VECTORS: list[dict[str, Any]] = json.loads(VECTOR_FILE.read_text())["vectors"]
VECTORS = [v for v in ALL_VECTORS if is_supported(v["protocol_name"])]
RUN_NAMES = {v["protocol_name"] for v in VECTORS}


def _key(vector: dict[str, Any], name: str) -> bytes | None:
    value = vector.get(name)
    return None if value is None else bytes.fromhex(value)


def _side(vector: dict[str, Any], prefix: str, *, initiator: bool) -> HandshakeState:
    return HandshakeState(
        vector["protocol_name"],
        initiator=initiator,
        prologue=bytes.fromhex(vector[f"{prefix}_prologue"]),
        s=_key(vector, f"{prefix}_static"),
        e=_key(vector, f"{prefix}_ephemeral"),
        rs=_key(vector, f"{prefix}_remote_static"),
        psks=[bytes.fromhex(psk) for psk in vector.get(f"{prefix}_psks", [])],
    )


@pytest.mark.parametrize(
    "vector", VECTORS, ids=[f"{i}-{v['protocol_name']}" for i, v in enumerate(VECTORS)]
)
def test_vector(vector: dict[str, Any]) -> None:
    initiator = _side(vector, "init", initiator=True)
    responder = _side(vector, "resp", initiator=False)
    messages = vector["messages"]
    handshake_length = len(initiator.pattern.messages)
    assert len(messages) > handshake_length

    for index, message in enumerate(messages[:handshake_length]):
        writer, reader = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        payload = bytes.fromhex(message["payload"])
        ciphertext = writer.write_message(payload)
        assert ciphertext.hex() == message["ciphertext"], f"handshake message {index}"
        assert reader.read_message(ciphertext) == payload
    assert initiator.is_complete
    assert responder.is_complete
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash.hex() == vector["handshake_hash"]

    # After Split() the initiator sends with c1 and the responder with c2.
    init_c1, init_c2 = initiator.split()
    resp_c1, resp_c2 = responder.split()
    one_way = initiator.pattern.is_one_way
    for index in range(handshake_length, len(messages)):
        payload = bytes.fromhex(messages[index]["payload"])
        if one_way or index % 2 == 0:
            sender, receiver = init_c1, resp_c1
        else:
            sender, receiver = resp_c2, init_c2
        ciphertext = sender.encrypt_with_ad(b"", payload)
        assert ciphertext.hex() == messages[index]["ciphertext"], f"transport message {index}"
        assert receiver.decrypt_with_ad(b"", ciphertext) == payload


def test_required_vectors_are_run() -> None:
    for name in REQUIRED:
        assert name in RUN_NAMES, name


def test_every_vector_in_the_file_is_supported() -> None:
    unsupported = sorted(
        v["protocol_name"] for v in ALL_VECTORS if not is_supported(v["protocol_name"])
    )
    assert not unsupported
    assert len(VECTORS) == len(ALL_VECTORS) > 100


# --- The spec's rules beyond the vectors -----------------------------------------


KEY = bytes(range(32))


def test_cipher_state_without_key_passes_through() -> None:
    cipher = CipherState()
    assert not cipher.has_key()
    assert cipher.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cipher.decrypt_with_ad(b"ad", b"plain") == b"plain"


def test_nonce_counts_and_failed_decryption_does_not_advance() -> None:
    sender, receiver = CipherState(KEY), CipherState(KEY)
    first = sender.encrypt_with_ad(b"", b"one")
    second = sender.encrypt_with_ad(b"", b"two")
    assert sender.nonce == 2
    with pytest.raises(FrameError):
        receiver.decrypt_with_ad(b"", second)  # out of order
    assert receiver.nonce == 0
    assert receiver.decrypt_with_ad(b"", first) == b"one"
    with pytest.raises(FrameError):
        receiver.decrypt_with_ad(b"", first)  # replayed
    assert receiver.decrypt_with_ad(b"", second) == b"two"
    with pytest.raises(FrameError):
        receiver.decrypt_with_ad(b"other ad", sender.encrypt_with_ad(b"ad", b"x"))


def test_nonce_exhaustion_raises() -> None:
    sender, receiver = CipherState(KEY), CipherState(KEY)
    sender.set_nonce(MAX_NONCE - 1)
    receiver.set_nonce(MAX_NONCE - 1)
    assert receiver.decrypt_with_ad(b"", sender.encrypt_with_ad(b"", b"last")) == b"last"
    with pytest.raises(LocalProtocolError):
        sender.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(FrameError):
        receiver.decrypt_with_ad(b"", bytes(32))
    with pytest.raises(ValueError, match="nonce out of range"):
        sender.set_nonce(MAX_NONCE + 1)


def test_rekey_follows_the_spec() -> None:
    sender, receiver = CipherState(KEY), CipherState(KEY)
    sender.rekey()
    receiver.rekey()
    expected_key = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
        bytes(32), None, b"\x00" * 4 + MAX_NONCE.to_bytes(8, "little"), KEY
    )[:32]
    ciphertext = sender.encrypt_with_ad(b"", b"after rekey")
    assert ciphertext == CipherState(expected_key).encrypt_with_ad(b"", b"after rekey")
    assert receiver.decrypt_with_ad(b"", ciphertext) == b"after rekey"
    with pytest.raises(LocalProtocolError):
        CipherState().rekey()


def test_transport_message_size_limits() -> None:
    sender, receiver = CipherState(KEY), CipherState(KEY)
    largest = sender.encrypt_with_ad(b"", bytes(MAX_MESSAGE_SIZE - 16))
    assert len(largest) == MAX_MESSAGE_SIZE
    assert receiver.decrypt_with_ad(b"", largest) == bytes(MAX_MESSAGE_SIZE - 16)
    with pytest.raises(ValueError, match="at most"):
        sender.encrypt_with_ad(b"", bytes(MAX_MESSAGE_SIZE - 15))
    with pytest.raises(FrameError, match="at most"):
        receiver.decrypt_with_ad(b"", bytes(MAX_MESSAGE_SIZE + 1))
    with pytest.raises(FrameError, match="at least"):
        receiver.decrypt_with_ad(b"", bytes(15))


def _nn_pair(
    name: str = "Noise_NN_25519_ChaChaPoly_BLAKE2b",
) -> tuple[HandshakeState, HandshakeState]:
    return HandshakeState(name, initiator=True), HandshakeState(name, initiator=False)


def test_handshake_message_size_limits() -> None:
    initiator, responder = _nn_pair()
    with pytest.raises(ValueError, match="exceeds"):
        initiator.write_message(bytes(MAX_MESSAGE_SIZE - 32 + 1))
    message = initiator.write_message(bytes(MAX_MESSAGE_SIZE - 32))  # e + payload, no key yet
    assert len(message) == MAX_MESSAGE_SIZE
    assert responder.read_message(message) == bytes(MAX_MESSAGE_SIZE - 32)

    initiator, responder = _nn_pair()
    with pytest.raises(HandshakeError, match="exceeds"):
        responder.read_message(initiator.write_message(b"") + bytes(MAX_MESSAGE_SIZE))
    with pytest.raises(LocalProtocolError):
        responder.write_message(b"")  # dead after a failed read


def test_handshake_rejects_truncated_and_corrupted_messages() -> None:
    initiator, responder = _nn_pair()
    with pytest.raises(HandshakeError, match="truncated"):
        responder.read_message(initiator.write_message(b"")[:31])

    initiator, responder = _nn_pair()
    responder.read_message(initiator.write_message(b""))
    reply = responder.write_message(b"payload")
    with pytest.raises(HandshakeError, match="decryption failed"):
        initiator.read_message(reply[:-1] + bytes([reply[-1] ^ 1]))
    with pytest.raises(LocalProtocolError, match="failed"):
        initiator.read_message(reply)


def test_low_order_public_key_raises_handshake_error() -> None:
    initiator, responder = _nn_pair()
    initiator.write_message(b"")
    responder.read_message(bytes(32))  # an all-zero "ephemeral" key
    with pytest.raises(HandshakeError, match="low-order"):
        responder.write_message(b"")


def test_turns_split_once_and_oriented_ciphers() -> None:
    initiator, responder = _nn_pair()
    with pytest.raises(LocalProtocolError, match="turn"):
        initiator.read_message(bytes(32))
    with pytest.raises(LocalProtocolError, match="turn"):
        responder.write_message(b"")
    with pytest.raises(LocalProtocolError):
        initiator.split()
    with pytest.raises(LocalProtocolError):
        _ = initiator.handshake_hash
    responder.read_message(initiator.write_message(b""))
    initiator.read_message(responder.write_message(b""))
    with pytest.raises(LocalProtocolError, match="complete"):
        initiator.write_message(b"")
    init_send, init_receive = initiator.transport_ciphers()
    resp_send, resp_receive = responder.transport_ciphers()
    assert resp_receive.decrypt_with_ad(b"", init_send.encrypt_with_ad(b"", b"a")) == b"a"
    assert init_receive.decrypt_with_ad(b"", resp_send.encrypt_with_ad(b"", b"b")) == b"b"
    with pytest.raises(LocalProtocolError, match="already"):
        initiator.split()


def test_multiple_psks_and_psk_validation() -> None:
    name = "Noise_NNpsk0+psk2_25519_ChaChaPoly_SHA256"
    pattern = HandshakePattern.parse("NNpsk0+psk2")
    assert pattern.messages == (("psk", "e"), ("e", "ee", "psk"))
    psks = [bytes(32), bytes(range(32))]
    initiator = HandshakeState(name, initiator=True, psks=psks)
    responder = HandshakeState(name, initiator=False, psks=psks)
    assert responder.read_message(initiator.write_message(b"hello")) == b"hello"
    assert initiator.read_message(responder.write_message(b"world")) == b"world"
    assert initiator.handshake_hash == responder.handshake_hash

    wrong = HandshakeState(name, initiator=False, psks=[bytes(32), bytes(32)])
    first = HandshakeState(name, initiator=True, psks=psks)
    wrong.read_message(first.write_message(b""))
    with pytest.raises(HandshakeError):
        first.read_message(wrong.write_message(b""))

    with pytest.raises(ValueError, match="needs 2 psks"):
        HandshakeState(name, initiator=True, psks=psks[:1])
    with pytest.raises(ValueError, match="psk is 32 bytes"):
        HandshakeState(name, initiator=True, psks=[bytes(32), bytes(31)])


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("Noise_XX_25519_ChaChaPoly_BLAKE2b", {}, "needs 's'"),
        ("Noise_IK_25519_ChaChaPoly_BLAKE2b", {"s": KEY}, "needs 'rs'"),
        ("Noise_NN_25519_ChaChaPoly_BLAKE2b", {"s": KEY}, "no use for 's'"),
        ("Noise_XX_25519_ChaChaPoly_BLAKE2b", {"s": KEY, "rs": KEY}, "no use for 'rs'"),
        ("Noise_XX_25519_ChaChaPoly_BLAKE2b", {"s": KEY[:31]}, "32 bytes"),
        ("Noise_XX_448_ChaChaPoly_BLAKE2b", {}, "DH"),
        ("Noise_XX_25519_AESGCM_BLAKE2b", {}, "cipher"),
        ("Noise_XX_25519_ChaChaPoly_SHA512", {}, "hash"),
        ("Noise_ZZ_25519_ChaChaPoly_BLAKE2b", {}, "pattern"),
        ("Noise_XXfallback_25519_ChaChaPoly_BLAKE2b", {}, "modifier"),
        ("Noise_NNpsk3_25519_ChaChaPoly_BLAKE2b", {}, "out of range"),
        ("Noise_XX_25519", {}, "not a Noise protocol name"),
    ],
)
def test_bad_configuration_raises_value_error(
    name: str, kwargs: dict[str, bytes], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        HandshakeState(name, initiator=True, **kwargs)


def test_supported_patterns() -> None:
    fundamental = {"NN", "NK", "NX", "KN", "KK", "KX", "XN", "XK", "XX", "IN", "IK", "IX"}
    assert fundamental | {"N", "K", "X"} <= SUPPORTED_PATTERNS
    assert HandshakePattern.parse("N").is_one_way
    assert not HandshakePattern.parse("XX").is_one_way
    with pytest.raises(LocalProtocolError, match="one-way"):
        HandshakeState(
            "Noise_N_25519_ChaChaPoly_BLAKE2b", initiator=True, rs=bytes(32)
        ).transport_ciphers()
