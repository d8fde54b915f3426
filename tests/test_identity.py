from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdtswarm.identity import Identity, IdentityFileError, InvalidKeyError, PublicKey


def test_text_form_round_trips(alice: Identity) -> None:
    pk = alice.public_key
    text = str(pk)
    assert len(text) == 56
    assert text == text.lower()
    assert PublicKey.parse(text) == pk
    assert bytes(PublicKey.parse(text)) == bytes(pk)
    assert len(bytes(pk)) == 32


def test_public_key_value_semantics(alice: Identity, bob: Identity) -> None:
    a, b = alice.public_key, bob.public_key
    assert a == PublicKey(bytes(a))
    assert hash(a) == hash(PublicKey(bytes(a)))
    assert len({a, b, PublicKey(bytes(a))}) == 2
    assert (a < b) == (bytes(a) < bytes(b))
    assert sorted([b, a]) == sorted([a, b])
    assert a != bytes(a)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "x" * 56, "A" * 56, " " + "a" * 55, "é" * 56],
)
def test_parse_rejects_junk(text: str) -> None:
    with pytest.raises(InvalidKeyError):
        PublicKey.parse(text)


def test_parse_rejects_a_typo(alice: Identity) -> None:
    text = str(alice.public_key)
    typo = text[:10] + ("b" if text[10] != "b" else "c") + text[11:]
    with pytest.raises(InvalidKeyError, match="checksum"):
        PublicKey.parse(typo)


def test_parse_rejects_uppercase(alice: Identity) -> None:
    with pytest.raises(InvalidKeyError):
        PublicKey.parse(str(alice.public_key).upper())


def test_invalid_key_error_is_a_value_error() -> None:
    assert issubclass(InvalidKeyError, ValueError)


@given(st.text(max_size=80))
def test_parse_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(InvalidKeyError):
        PublicKey.parse(text)


@given(st.binary(min_size=0, max_size=40))
def test_constructor_validates_bytes(data: bytes) -> None:
    try:
        pk = PublicKey(data)
    except InvalidKeyError:
        return
    assert len(data) == 32
    assert PublicKey.parse(str(pk)) == pk


def test_small_order_point_rejected() -> None:
    # The identity point (y = 1) is on the curve but has small order.
    with pytest.raises(InvalidKeyError):
        PublicKey(bytes([1]) + bytes(31))


def test_sign_and_verify(alice: Identity, bob: Identity) -> None:
    sig = alice.sign(b"hello")
    assert alice.public_key.verify(sig, b"hello")
    assert not alice.public_key.verify(sig, b"hellO")
    assert not bob.public_key.verify(sig, b"hello")
    assert not alice.public_key.verify(sig[:-1], b"hello")


def test_save_load_round_trip(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "id.key"
    alice.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public_key == alice.public_key
    assert loaded.sign(b"x") == alice.sign(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["id.key"]  # no temp file left behind


def test_save_replaces_atomically(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    path = tmp_path / "id.key"
    alice.save(path)
    bob.save(path)
    assert Identity.load(path).public_key == bob.public_key


def test_load_refuses_world_readable(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "id.key"
    alice.save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityFileError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe binary",
        b"secret: not-base64!!\n",
        b"secret: AAAA\n",
        b"public: nope\nsecret: " + b"A" * 43 + b"=\n",
        b"just some text\n",
    ],
)
def test_load_refuses_malformed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "id.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityFileError):
        Identity.load(path)


def test_load_refuses_mismatched_public(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    path = tmp_path / "id.key"
    alice.save(path)
    text = path.read_text().replace(str(alice.public_key), str(bob.public_key))
    path.write_text(text)
    with pytest.raises(IdentityFileError, match="does not match"):
        Identity.load(path)


def test_x25519_conversion_is_consistent(alice: Identity) -> None:
    import nacl.bindings

    assert nacl.bindings.crypto_scalarmult_base(alice.x25519_private()) == (
        alice.public_key.x25519()
    )
