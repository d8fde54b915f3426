"""The click group, the error policy and the commands that need no module of their own."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from crdtswarm.errors import CrdtSwarmError
from crdtswarm.identity import Identity

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["CliError", "cli", "main", "write_new_identity"]


class CliError(click.ClickException):
    """A failure the user can act on: printed as one line, exit status 1."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Verbose logs, and a traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """crdtswarm: a peer-to-peer swarm of replicated Yjs documents."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@cli.group()
def key() -> None:
    """Create identity files and show their public keys."""


@key.command("generate")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace PATH if it exists (its key is lost).")
def key_generate(path: str, force: bool) -> None:
    """Write a new identity (Ed25519 keypair) to PATH (mode 0600); print its public key."""
    if not force and os.path.lexists(path):
        raise CliError(f"{path} exists: not replacing it (its key would be lost); use --force")
    click.echo(str(write_new_identity(path).public_key))


def write_new_identity(path: str | os.PathLike[str]) -> Identity:
    """Generate an identity and save it to ``path`` (mode 0600), creating missing folders.

    Raises:
        CliError: the file or its folder cannot be written.
    """
    identity = Identity.generate()
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity.save(path)
    except OSError as exc:
        raise CliError(f"cannot write identity file {path}: {exc.strerror or exc}") from None
    return identity


@key.command("swarm")
def key_swarm() -> None:
    """Print a new random swarm key (64 hex digits) for a private swarm.

    Give it to every node of the swarm with --swarm-key or the CRDTSWARM_SWARM_KEY
    environment variable; nodes without it cannot link to them.
    """
    click.echo(secrets.token_hex(32))


@key.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
def key_show(path: str) -> None:
    """Print the public key (the node's address) of the identity file PATH."""
    click.echo(str(Identity.load(path).public_key))


def _register() -> None:
    # Imported here so that `crdtswarm key show` does not pay for aiortc & co.
    from crdtswarm.cli import bench, demo, doc, node, signal_server

    demo.register(cli)
    bench.register(cli)
    node.register(cli)
    doc.register(cli)
    signal_server.register(cli)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _register()
    try:
        result: Any = cli.main(args=args, prog_name="crdtswarm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("crdtswarm: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        if debug and not isinstance(exc, click.UsageError):
            raise
        click.echo(f"crdtswarm: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except (CrdtSwarmError, OSError, ValueError) as exc:
        if debug:
            raise
        click.echo(f"crdtswarm: error: {exc}", err=True)
        return 1
    return result if isinstance(result, int) else 0
