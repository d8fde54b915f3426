"""A small internet on one machine, built from Linux network namespaces.

::

                     cs<tag>-pub  ("the internet": a router, ip_forward=1)
                     lo 192.0.2.1: coturn :3478 udp+tcp, rendezvous :7000 tcp,
                                   (per test) crdtswarm signaling :8765 ws
                     default route -> veth "void" (silently dropped)
          s1 100.64.1.1 /              \\ s2 100.64.2.1    (site i: 100.64.i.0/24)
                       /                \\
     wan 100.64.1.2  cs<tag>-na      cs<tag>-nb  wan 100.64.2.2    NAT routers
     lan 10.1.0.1        |                |      lan 10.2.0.1      (site i: 10.i.0.0/24)
    eth0 10.1.0.2    cs<tag>-a        cs<tag>-b  eth0 10.2.0.2     hosts

Every namespace and interface name is scoped to this run's random 4-hex ``tag``:
namespaces are called ``cs<tag>-...`` and every veth pair is created directly inside
its two namespaces (``ip link add ... netns X type veth peer ... netns Y``), so no
interface ever exists in the root namespace and deleting the namespaces deletes every
veth. `Internet.close` kills the processes started here and deletes the namespaces.

NAT kinds (iptables in the NAT router's namespace, see `Site`):

* ``port-preserving``: ``MASQUERADE``, which keeps the host's source port whenever
  the resulting tuple is free; the mapping is endpoint independent in practice, so a
  STUN server-reflexive address is reachable by peers that hole-punch to it.
* ``symmetric``: ``MASQUERADE --random-fully``, a fresh random port per destination
  (address-and-port-dependent mapping): the port a STUN server sees is useless to
  a peer, so only a TURN relay connects two such sites.

Both kinds filter alike: the router forwards from wan to lan only packets of
conntrack-known flows (ESTABLISHED,RELATED) and silently drops everything else that
arrives on wan, so unsolicited inbound packets never reach the host, except on a
TCP port the site forwards (`Site.forward_tcp`: DNAT, as a home router exposes a
service).
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

NatKind = Literal["port-preserving", "symmetric"]

SERVICE_IP = "192.0.2.1"  # TEST-NET-1, on the public namespace's loopback
TURN_PORT = 3478
RENDEZVOUS_PORT = 7000
TURN_REALM = "crdtswarm.test"
TURN_USER = "swarm"
TURN_PASSWORD = "hunter2-netns"  # a throwaway credential of the test TURN server

COMMAND_TIMEOUT = 10.0  # seconds for one ip / iptables command


class TopologyError(RuntimeError):
    """A command building the topology failed."""


def run(args: Sequence[str], *, check: bool = True) -> str:
    """Run one command, return its stdout; raise `TopologyError` on failure."""
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if check and proc.returncode != 0:
        raise TopologyError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class Namespace:
    """One network namespace; commands run in it through ``ip netns exec``."""

    name: str

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True) -> str:
        return run(self.argv(*args), check=check)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}")


def veth(a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
    """Create a veth pair with one end in each namespace, both up."""
    run(["ip", "link", "add", a_name, "netns", a.name, "type", "veth", "peer", "name", b_name,
         "netns", b.name])  # fmt: skip
    a.run("ip", "link", "set", a_name, "up")
    b.run("ip", "link", "set", b_name, "up")


def delete_namespace(ns: Namespace) -> None:
    """Kill what still runs inside (a node a failed test left behind), then delete it."""
    for pid in run(["ip", "netns", "pids", ns.name], check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "del", ns.name], check=False)


IPTABLES_VARIANTS = ("iptables", "iptables-nft", "iptables-legacy")


def pick_iptables() -> tuple[str | None, str]:
    """The first iptables variant that can NAT and filter in a namespace, and why not.

    Debian 12's ``iptables`` is the nf_tables backend; ``iptables-legacy`` is the
    fallback for kernels without nf_tables. The probe installs the rules a site uses.
    """
    probe = Namespace(f"cs{secrets.token_hex(2)}-probe")
    errors = []
    try:
        run(["ip", "netns", "add", probe.name])
    except (TopologyError, subprocess.TimeoutExpired) as exc:
        return None, f"cannot create a network namespace: {exc}"
    try:
        for binary in IPTABLES_VARIANTS:
            if shutil.which(binary) is None:
                continue
            try:
                probe.run(binary, "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j",
                          "MASQUERADE", "--random-fully")  # fmt: skip
                probe.run(binary, "-A", "FORWARD", "-m", "conntrack", "--ctstate",
                          "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
            except (TopologyError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
                continue
            return binary, ""
    finally:
        delete_namespace(probe)
    return None, "; ".join(errors) or "no iptables binary"


def missing_prerequisite() -> tuple[str | None, str]:
    """(None, iptables binary) when the netns tests can run here, else (reason, "")."""
    if os.geteuid() != 0:
        return "needs root: network namespaces", ""
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("turnserver", "coturn")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install {package})", ""
    binary, why = pick_iptables()
    if binary is None:
        return f"network namespaces with iptables NAT unusable here: {why}", ""
    return None, binary


@dataclass
class Site:
    """A host behind its own NAT router, attached to the public namespace."""

    name: str
    index: int
    kind: NatKind
    nat: Namespace
    host: Namespace
    wan_ip: str  # the NAT router's public address
    host_ip: str  # the host's private address
    iptables: str = "iptables"  # the binary pick_iptables() chose
    _udp_blocked: bool = False
    _cut: bool = False

    # Rules that cut the site off: everything the router forwards to or from the LAN.
    _CUT_RULES = (("-i", "lan", "-j", "DROP"), ("-o", "lan", "-j", "DROP"))
    _UDP_RULE = ("-i", "lan", "-p", "udp", "-j", "DROP")

    def _ipt(self, *args: str) -> None:
        self.nat.run(self.iptables, "-w", "5", *args)

    def block_udp(self) -> None:
        """Drop every UDP packet the host sends out: only TCP (e.g. TURN over TCP) leaves."""
        if not self._udp_blocked:
            self._ipt("-I", "FORWARD", "1", *self._UDP_RULE)
            self._udp_blocked = True

    def forward_tcp(self, port: int) -> None:
        """Port-forward TCP ``port`` of the router's public address to the host (DNAT).

        Connections from anywhere to ``wan_ip:port`` reach ``host_ip:port``; the rest of
        the filtering is unchanged (and `cut` still drops them).
        """
        target = f"{self.host_ip}:{port}"
        self._ipt("-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "tcp", "--dport",
                  str(port), "-j", "DNAT", "--to-destination", target)  # fmt: skip
        self._ipt("-A", "FORWARD", "-i", "wan", "-o", "lan", "-p", "tcp", "-d", self.host_ip,
                  "--dport", str(port), "-m", "conntrack", "--ctstate", "DNAT",
                  "-j", "ACCEPT")  # fmt: skip

    def cut(self) -> None:
        """Silently drop all of the host's traffic, both ways (a dead uplink)."""
        if not self._cut:
            for rule in self._CUT_RULES:
                self._ipt("-I", "FORWARD", "1", *rule)
            self._cut = True

    def restore(self) -> None:
        """Undo `cut`."""
        if self._cut:
            for rule in self._CUT_RULES:
                self._ipt("-D", "FORWARD", *rule)
            self._cut = False

    def nat_rules(self) -> str:
        """The router's iptables rules (filter and nat tables), for failure reports."""
        return self.nat.run(f"{self.iptables}-save", check=False)


class LineReader:
    """Reads a process's output lines on a daemon thread; `wait_for` takes a deadline."""

    def __init__(self, stream: IO[str], log: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream, log), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str], log: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):  # the stream closed under us
            for line in stream:
                log.write(line)
                log.flush()
                self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise TopologyError("process exited before it was ready")
            if predicate(line):
                return line
        raise TopologyError(f"not ready within {timeout} s")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class Service:
    """A long-running process in a namespace, logging to a file."""

    name: str
    proc: subprocess.Popen[str]
    log_path: Path
    reader: LineReader
    _log: IO[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def start_service(ns: Namespace, name: str, argv: Sequence[str], log_dir: Path) -> Service:
    log_path = log_dir / f"{name}.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        ns.argv(*argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    return Service(name, proc, log_path, LineReader(proc.stdout, log), log)


@dataclass
class Internet:
    """The public namespace, its services, and the NATed sites hanging off it."""

    iptables: str = "iptables"
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    sites: dict[str, Site] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    _namespaces: list[Namespace] = field(default_factory=list)
    _next_index: int = 1

    @property
    def public(self) -> Namespace:
        return Namespace(f"cs{self.tag}-pub")

    def _add_namespace(self, name: str) -> Namespace:
        ns = Namespace(name)
        run(["ip", "netns", "add", ns.name])
        self._namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def create(self) -> None:
        """Create the public namespace: a router with the service address on loopback."""
        pub = self._add_namespace(self.public.name)
        pub.run("ip", "addr", "add", f"{SERVICE_IP}/32", "dev", "lo")
        pub.sysctl("net.ipv4.ip_forward", "1")
        # "The rest of the internet": a default route into a veth whose far end drops
        # everything, so packets to unroutable addresses (a peer's private host
        # candidate, relayed by coturn) vanish silently as they would upstream. Without
        # it, sendto() fails with ENETUNREACH and coturn closes the whole allocation.
        veth(pub, "void", pub, "voidsink")
        pub.run("ip", "addr", "add", "169.254.0.1/30", "dev", "void")
        pub.run("ip", "neigh", "add", "169.254.0.2", "lladdr", "02:00:00:00:00:02",
                "dev", "void", "nud", "permanent")  # fmt: skip
        pub.run("ip", "route", "add", "default", "via", "169.254.0.2", "dev", "void")

    def add_site(self, name: str, kind: NatKind) -> Site:
        """A NAT router and a host behind it; the site's index picks its subnets."""
        if name in self.sites:
            raise ValueError(f"site {name!r} exists")
        i = self._next_index
        self._next_index += 1
        if i > 250:
            raise ValueError("too many sites")
        pub = self.public
        nat = self._add_namespace(f"cs{self.tag}-n{name}")
        host = self._add_namespace(f"cs{self.tag}-{name}")
        wan_net, lan_net = f"100.64.{i}", f"10.{i}.0"
        site = Site(name, i, kind, nat, host, wan_ip=f"{wan_net}.2", host_ip=f"{lan_net}.2",
                    iptables=self.iptables)  # fmt: skip

        # public <-> NAT router: a /24 per site, the public side routes it
        veth(pub, f"s{i}", nat, "wan")
        pub.run("ip", "addr", "add", f"{wan_net}.1/24", "dev", f"s{i}")
        nat.run("ip", "addr", "add", f"{wan_net}.2/24", "dev", "wan")
        nat.run("ip", "route", "add", "default", "via", f"{wan_net}.1")

        # NAT router <-> host: the private LAN
        veth(nat, "lan", host, "eth0")
        nat.run("ip", "addr", "add", f"{lan_net}.1/24", "dev", "lan")
        host.run("ip", "addr", "add", f"{lan_net}.2/24", "dev", "eth0")
        host.run("ip", "route", "add", "default", "via", f"{lan_net}.1")

        nat.sysctl("net.ipv4.ip_forward", "1")
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        if kind == "symmetric":
            masquerade.append("--random-fully")
        site._ipt(*masquerade)
        # Filtering: only replies to flows the host opened come in; the rest is dropped.
        established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        site._ipt("-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT")
        site._ipt("-A", "FORWARD", "-i", "wan", "-o", "lan", *established)
        site._ipt("-P", "FORWARD", "DROP")
        site._ipt("-A", "INPUT", "-i", "wan", *established)
        site._ipt("-A", "INPUT", "-i", "wan", "-j", "DROP")
        self.sites[name] = site
        return site

    def remove_site(self, name: str) -> None:
        site = self.sites.pop(name)
        for ns in (site.host, site.nat):
            delete_namespace(ns)
            with contextlib.suppress(ValueError):
                self._namespaces.remove(ns)

    def start_services(self, log_dir: Path, python: str, rendezvous_script: Path) -> None:
        """Start coturn (STUN + TURN, UDP and TCP) and the rendezvous in the public namespace."""
        turn = start_service(
            self.public,
            "turnserver",
            [
                "turnserver",
                "-n",  # no configuration file: everything is on this command line
                "--listening-ip", SERVICE_IP,
                "--relay-ip", SERVICE_IP,
                "--listening-port", str(TURN_PORT),
                "--min-port", "49152",
                "--max-port", "65535",
                "--realm", TURN_REALM,
                "--lt-cred-mech",
                "--user", f"{TURN_USER}:{TURN_PASSWORD}",
                "--fingerprint",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--no-software-attribute",
                "--userdb", str(log_dir / "turndb.sqlite"),
                "--pidfile", str(log_dir / "turnserver.pid"),
                "--log-file", "stdout",
                "--simple-log",
                "--verbose",
            ],
            log_dir,
        )  # fmt: skip
        self.services.append(turn)
        turn.reader.wait_for(lambda line: "Total General servers" in line, timeout=10)
        self._wait_listening(TURN_PORT, udp=True)

        rendezvous = start_service(
            self.public,
            "rendezvous",
            [python, str(rendezvous_script), "--host", SERVICE_IP, "--port", str(RENDEZVOUS_PORT)],
            log_dir,
        )
        self.services.append(rendezvous)
        rendezvous.reader.wait_for(lambda line: '"ready"' in line, timeout=20)

    def _wait_listening(self, port: int, *, udp: bool, timeout: float = 10.0) -> None:
        """Poll ``ss`` until TCP (and UDP) sockets listen on ``port`` in the public namespace."""
        deadline = time.monotonic() + timeout
        kinds = ["-t", "-u"] if udp else ["-t"]
        while True:
            found = [
                bool(self.public.run("ss", "-Hln", kind, f"sport = :{port}").strip())
                for kind in kinds
            ]
            if all(found):
                return
            if time.monotonic() > deadline:
                raise TopologyError(f"nothing listens on port {port} after {timeout} s")
            time.sleep(0.05)

    def ice_servers(self, *kinds: Literal["stun", "turn-udp", "turn-tcp"]) -> list[dict[str, str]]:
        """RTCIceServer dicts for this internet's coturn."""
        servers: list[dict[str, str]] = []
        for kind in kinds:
            if kind == "stun":
                servers.append({"urls": f"stun:{SERVICE_IP}:{TURN_PORT}"})
            else:
                transport = kind.removeprefix("turn-")
                servers.append(
                    {
                        "urls": f"turn:{SERVICE_IP}:{TURN_PORT}?transport={transport}",
                        "username": TURN_USER,
                        "credential": TURN_PASSWORD,
                    }
                )
        return servers

    @property
    def rendezvous(self) -> str:
        return f"{SERVICE_IP}:{RENDEZVOUS_PORT}"

    def close(self) -> None:
        """Stop the services and delete every namespace; safe to call twice."""
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        for ns in reversed(self._namespaces):
            delete_namespace(ns)
        self._namespaces.clear()
        self.sites.clear()
