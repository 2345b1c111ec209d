"""A real EC2 API on loopback (moto in server mode), a fault-injecting proxy in front of
it, and a simulated hypervisor that makes every instance the API reports reachable.

``MotoServer``: ``moto_server`` bound to 127.0.0.1 on a free port; boto3 talks
to it over HTTP exactly as to EC2. Or started under an argv prefix (``nsenter``
into a network namespace the tests made), bound there, behind TLS (``tls``:
certificate, key and the CA that signed them) and reached from this machine
through a loopback relay (``local_port``): the e2e node's pods reach it so. ``Ec2Proxy``: a loopback HTTP proxy that
forwards to it and, per API action, answers ``RequestLimitExceeded`` (HTTP
503, EC2's XML error) a given number of times, forwards a call and then
never answers it (a client killed after the cloud acted), holds a call
back without forwarding it and then refuses it (a request lost in transit), or
refuses spot launches for lack of capacity. ``Hypervisor``: a
thread that lists the instances through the API; for each new one it reads
the user data the way cloud-init does (the host key in ``ssh_keys``) and the
key pair's public key, and boots an SSH test host (``sshhosts.py``) at the
instance's private address with that identity; a terminated instance's host
is destroyed. Faults: instances that never boot, boot with another host key,
or boot only after a delay (``boot_delay``). Only the hypervisor is simulated.
"""
from __future__ import annotations

import base64
import http.client
import re
import ssl
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import boto3

from mpc.runner.cloud import host_key_from_user_data

from .paths import REPO
from .procs import free_port, wait_for
from .sshhosts import HostFarm, SSHHost, keypair

REGION = "us-east-1"
CREDS = {"access-key-id": "testing", "secret-access-key": "testing"}


class MotoServer:
    def __init__(self, log: Path, argv_prefix: tuple[str, ...] = (), bind: str = "127.0.0.1",
                 tls: tuple[Path, Path, Path] | None = None):
        self.port = free_port()
        self.local_port = self.port     # where this machine reaches it (a relay's, if not here)
        self.bind, self.prefix, self.tls = bind, list(argv_prefix), tls
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """As this machine reaches it."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.local_port}"

    @property
    def ca(self) -> str | None:
        """The CA file clients verify it with (None: plain HTTP)."""
        return str(self.tls[2]) if self.tls else None

    def _conn(self) -> http.client.HTTPConnection:
        if self.tls:
            return http.client.HTTPSConnection("127.0.0.1", self.local_port, timeout=30,
                                               context=ssl.create_default_context(cafile=self.ca))
        return http.client.HTTPConnection("127.0.0.1", self.local_port, timeout=30)

    def start(self) -> "MotoServer":
        tls = ["-c", str(self.tls[0]), "-k", str(self.tls[1])] if self.tls else []
        self.proc = subprocess.Popen(
            [*self.prefix, str(REPO / ".venv/bin/moto_server"), "-H", self.bind,
             "-p", str(self.port), *tls],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def up() -> bool:
            try:
                c = self._conn()
                c.request("GET", "/moto-api/config")
                c.getresponse().read()
                return True
            except (OSError, http.client.HTTPException):
                return False
        wait_for("moto_server", up, timeout=60, log=self.log)
        return self

    def reset(self) -> None:
        c = self._conn()
        c.request("POST", "/moto-api/reset")
        c.getresponse().read()

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def client(url: str, verify: str | None = None):
    return boto3.client("ec2", region_name=REGION, endpoint_url=url, verify=verify,
                        aws_access_key_id=CREDS["access-key-id"],
                        aws_secret_access_key=CREDS["secret-access-key"])


def moto_world(ec2, subnet: str, key_name: str) -> tuple[str, str, str]:
    """In a fresh moto: a VPC and a subnet over the host farm's ``subnet`` (a.b.c), the
    first of moto's AMIs, and key pair ``key_name`` for a new admin key.
    Returns (subnet id, AMI id, the admin's private key)."""
    vpc = ec2.create_vpc(CidrBlock=f"{subnet}.0/24")["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc, CidrBlock=f"{subnet}.0/25")["Subnet"]["SubnetId"]
    ami = next(i["ImageId"] for i in ec2.describe_images()["Images"]
               if re.fullmatch(r"ami-[0-9a-f]{8,17}", i["ImageId"]))
    admin_priv, admin_pub = keypair()
    ec2.import_key_pair(KeyName=key_name, PublicKeyMaterial=admin_pub.encode())
    return subnet_id, ami, admin_priv


THROTTLED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
             b'<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>'
             b'</Error></Errors><RequestID>mpc-test-proxy</RequestID></Response>')


NO_CAPACITY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
               b'<Code>InsufficientInstanceCapacity</Code><Message>There is no Spot capacity '
               b'available that matches your request.</Message></Error></Errors>'
               b'<RequestID>mpc-test-proxy</RequestID></Response>')


class Ec2Proxy:
    """Loopback proxy in front of moto that injects faults per EC2 action."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.throttle: dict[str, int] = {}         # action -> how many more to refuse
        self.injected: dict[str, int] = {}         # action -> refused so far
        self.hold: set[str] = set()                # actions forwarded but never answered
        # the next n calls of an action wait (never forwarded) until ``unstall`` is set,
        # then are refused as throttled: a request lost in transit, retried later
        self.stall: dict[str, int] = {}
        self.refuse_spot = 0                       # the next n spot launches: no capacity
        self.stalled = threading.Event()
        self.unstall = threading.Event()
        self.held = threading.Event()              # set once a held call reached moto
        self.release = threading.Event()
        self.calls: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                action = urllib.parse.parse_qs(body.decode()).get("Action", [""])[0]
                with proxy._lock:
                    proxy.calls.append(action)
                    stall = proxy.stall.get(action, 0) > 0
                    if stall:
                        proxy.stall[action] -= 1
                    spot = (action == "RunInstances" and proxy.refuse_spot > 0
                            and b"InstanceMarketOptions.MarketType=spot" in body)
                    if spot:
                        proxy.refuse_spot -= 1
                        proxy.injected["spot"] = proxy.injected.get("spot", 0) + 1
                    refuse = stall or proxy.throttle.get(action, 0) > 0
                    if refuse and not stall:
                        proxy.throttle[action] -= 1
                    if refuse:
                        proxy.injected[action] = proxy.injected.get(action, 0) + 1
                if spot:
                    self.send_response(400)
                    self.send_header("Content-Type", "text/xml")
                    self.send_header("Content-Length", str(len(NO_CAPACITY)))
                    self.end_headers()
                    self.wfile.write(NO_CAPACITY)
                    return
                if stall:
                    proxy.stalled.set()
                    proxy.unstall.wait()
                if refuse:
                    self.send_response(503)
                    self.send_header("Content-Type", "text/xml")
                    self.send_header("Content-Length", str(len(THROTTLED)))
                    self.end_headers()
                    self.wfile.write(THROTTLED)
                    return
                c = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                c.request("POST", self.path, body=body, headers=headers)
                r = c.getresponse()
                data = r.read()
                if action in proxy.hold:
                    proxy.held.set()
                    proxy.release.wait()
                    self.close_connection = True
                    return
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "Ec2Proxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.unstall.set()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Hypervisor:
    """Boots an SSH host for every instance EC2 reports; destroys it when terminated."""

    ec2_url: str
    farm: HostFarm
    ca: str | None = None               # CA file of a TLS endpoint
    place: Callable[[SSHHost], SSHHost] | None = None   # wires a booted host up (e2e: into the node)
    interval: float = 0.2
    never_boot: int = 0                 # the next n instances never become reachable
    wrong_key: int = 0                  # the next n boot with a host key mpc did not give
    boot_delay: float = 0.0             # seconds from an instance's first sighting to its boot
    hosts: dict[str, SSHHost] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)     # seen, never booted
    seen: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    max_alive: int = 0                  # most non-terminated instances in one listing
    pending: dict[str, float] = field(default_factory=dict)    # seen, boots at (monotonic)

    def __post_init__(self):
        self.ec2 = client(self.ec2_url, self.ca)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Hypervisor":
        self._thread.start()
        return self

    def instances(self) -> list[dict]:
        out = []
        for page in self.ec2.get_paginator("describe_instances").paginate():
            for r in page["Reservations"]:
                out += r["Instances"]
        return out

    def alive(self) -> list[dict]:
        return [i for i in self.instances() if i["State"]["Name"] != "terminated"]

    def _boot(self, inst: dict) -> None:
        iid = inst["InstanceId"]
        raw = self.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
        text = base64.b64decode(raw.get("UserData", {}).get("Value", "")).decode()
        hk = host_key_from_user_data(text)
        pair = self.ec2.describe_key_pairs(KeyNames=[inst["KeyName"]], IncludePublicKey=True)
        admin_pub = pair["KeyPairs"][0]["PublicKey"].strip()
        if hk is None:
            self.errors.append(f"{iid}: no host key in the user data")
            return
        key = (hk[0].encode(), hk[1])
        if self.wrong_key > 0:
            self.wrong_key -= 1
            key = keypair()
        host = self.farm.add(name=iid[:20], address=inst["PrivateIpAddress"],
                             given_host_key=key, given_admin_public_key=admin_pub)
        self.hosts[iid] = host
        if self.place:
            self.place(host)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                insts = self.instances()
                live = [i for i in insts if i["State"]["Name"] != "terminated"]
                self.max_alive = max(self.max_alive, len(live))
                for i in insts:
                    iid = i["InstanceId"]
                    if i["State"]["Name"] == "terminated" and iid in self.hosts:
                        self.hosts.pop(iid).destroy()
                for i in live:
                    iid = i["InstanceId"]
                    if iid not in self.seen:
                        self.seen.append(iid)
                        if self.never_boot > 0:
                            self.never_boot -= 1
                            self.dead.add(iid)
                            continue
                        self.pending[iid] = time.monotonic() + self.boot_delay
                    if iid in self.pending and time.monotonic() >= self.pending[iid]:
                        del self.pending[iid]
                        self._boot(i)
            except Exception as e:      # noqa: BLE001 - keep simulating; the test reads errors
                self.errors.append(repr(e))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for h in self.hosts.values():
            h.destroy()
        self.hosts.clear()
