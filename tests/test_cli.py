"""The crdtswarm command line, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from crdtswarm.identity import PublicKey


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crdtswarm.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_key_generate_then_show(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    generated = run("key", "generate", str(path))
    assert generated.returncode == 0, generated.stderr
    key = PublicKey.parse(generated.stdout.strip())
    shown = run("key", "show", str(path))
    assert shown.returncode == 0
    assert PublicKey.parse(shown.stdout.strip()) == key


def test_key_generate_creates_folders_and_reports_what_it_cannot_write(tmp_path: Path) -> None:
    nested = tmp_path / "keys" / "node.key"
    assert run("key", "generate", str(nested)).returncode == 0
    assert nested.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = run("key", "generate", str(a_file / "node.key"))
    assert result.returncode == 1
    assert result.stderr.startswith("crdtswarm: error: cannot write identity file")
    assert "Traceback" not in result.stderr


def test_key_generate_never_replaces_a_key_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = run("key", "generate", str(path)).stdout.strip()
    again = run("key", "generate", str(path))
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert "--force" in again.stderr
    assert run("key", "show", str(path)).stdout.strip() == first  # still the same key
    forced = run("key", "generate", "--force", str(path))
    assert forced.returncode == 0
    assert forced.stdout.strip() != first


def test_a_readable_identity_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    assert run("key", "generate", str(path)).returncode == 0
    os.chmod(path, 0o644)
    result = run("key", "show", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "chmod 600" in result.stderr
