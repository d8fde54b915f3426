import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_the_seed_example_meshes_three_nodes_over_webrtc() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "seed.py")],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # node3 called node1 only, yet it is linked to both, over WebRTC
    assert re.search(r"^node3 <-> node1: webrtc://\w{56}$", out, re.MULTILINE), out
    assert re.search(r"^node3 <-> node2: webrtc://\w{56}$", out, re.MULTILINE), out
    assert re.search(r"^node3 linked with every node in \d+ ms$", out, re.MULTILINE), out
    # every node reported its peers as they came
    for name in ("node1", "node2", "node3"):
        assert re.search(rf"^\s*[\d.]+ s  {name}: PeerConnected \w{{8}}$", out, re.MULTILINE), out
    assert out.count("PeerConnected") == 6  # three links, seen from both ends
