from __future__ import annotations

import crdtswarm
import crdtswarm.testing


def test_all_is_sorted_and_complete() -> None:
    assert crdtswarm.__all__ == sorted(crdtswarm.__all__)
    for name in crdtswarm.__all__:
        assert getattr(crdtswarm, name) is not None


def test_contract_names_are_exported() -> None:
    for name in ("Swarm", "Identity", "PublicKey", "PeerConnected", "PeerDisconnected"):
        assert name in crdtswarm.__all__
    assert "SimulatedNetwork" in crdtswarm.testing.__all__


def test_no_public_name_is_missing_from_all() -> None:
    public = {
        name
        for name, value in vars(crdtswarm).items()
        if not name.startswith("_") and not isinstance(value, type(crdtswarm))
    }
    assert public <= set(crdtswarm.__all__)
