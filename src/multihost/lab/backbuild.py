"""Build what a lab has behind its nodes and in front of its clients (see ``backnet``).

Owns, for a transparent lab (``lab up --transparent``): the back-end switch and each node's
back-end-facing veth, the back ends (addresses, nginx answering its own name and the client
address it saw, logging ``$remote_addr``), each node's transparent proxy in front of them
(nginx ``proxy_bind $remote_addr transparent`` or HAProxy ``source 0.0.0.0 usesrc
client``), the lab's nft table ``inet multihost_lab`` on each node that *counts* the back
ends' replies (``held``: arrived at a node with the connection's socket, ``closed``: at
the node that opened the connection after its socket went, ``stray``: at a node that never
had the connection; the transparent-proxy plumbing itself is the agents', ``transparent =
true``), the back ends' return routes (``multihost backend-routes --apply`` inside each
back end, routes mode) or default route (the return traffic IP, gateway mode); and for a
routed lab (``lab up --routed``): the router namespace, its links to the clients, the
static neighbour entry of the traffic IP and its RFC 1812 ARP filter.

Must not: touch anything outside the lab's namespaces, put a traffic IP on a node or answer
ARP for it (the agents do); :mod:`multihost.lab.build` runs these steps all-or-nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import multihost
from multihost.lab.backnet import (
    ROUTED_SUBNET,
    BackNet,
    Proxy,
    ReturnMode,
    Router,
    client_link,
    router_address_for,
)
from multihost.lab.processes import NGINX, spawn, wait_listening
from multihost.lab.state import LabError, LabState, ProcessRecord
from multihost.lab.topology import Host, Topology
from multihost.lab.wiring import add_veth, configure_host, ifindex, iproute, nft_script, sysctl

#: The lab's own nft table on nodes (it counts the back ends' replies; the agents' table
#: marks them).  Deleted with the node's namespace.
LAB_TABLE = "multihost_lab"
#: HTTP header the nodes' proxies add: which node held the client's connection.
NODE_HEADER = "X-Multihost-Node"
HAPROXY = "/usr/sbin/haproxy"
#: The lab's reply counters on each node (:func:`node_nft`).
REPLY_COUNTERS = ("held", "closed", "stray")


def _backnet(state: LabState) -> BackNet:
    bn = state.topology.backnet
    if bn is None:
        raise LabError("this lab has no back-end network (use 'lab up --transparent')")
    return bn


def _router(state: LabState) -> Router:
    rt = state.topology.router
    if rt is None:
        raise LabError("this lab has no router (use 'lab up --routed')")
    return rt


def network_steps(topo: Topology) -> list[tuple[str, Callable[[LabState], None]]]:
    """Before the services: the router (``--routed``), the back-end network, the nodes'
    reply counters and the back ends (``--transparent``)."""
    steps: list[tuple[str, Callable[[LabState], None]]] = []
    if topo.router is not None:
        steps.append(("wiring the upstream router", wire_router))
    if topo.backnet is not None:
        steps.append(("wiring the back-end network", wire_backnet))
        steps.append(("counting the back ends' replies on the nodes", node_counters))
        steps.append(("starting the back ends", start_backends))
    return steps


def service_steps(topo: Topology) -> list[tuple[str, Callable[[LabState], None]]]:
    """After the agents: the back ends' return routes (``--transparent --return routes``)."""
    if topo.backnet is None:
        return []
    return [("applying the back ends' return routes", apply_return_routes)]


# --- the upstream router ----------------------------------------------------------------

#: RFC 1812 3.3.2: a router must not believe an ARP reply claiming a multicast link-layer
#: address.  Linux believes it; this filter makes the lab's router behave like the routers
#: that don't (Cisco and most others), so only a static neighbour entry reaches the VIP.
ROUTER_NFT = """\
table arp multihost_lab {
    counter refused {}
    chain input {
        type filter hook input priority filter; policy accept;
        arp operation reply arp saddr ether & 01:00:00:00:00:00 == 01:00:00:00:00:00 \\
            counter name refused drop
    }
}
"""


def wire_router(state: LabState) -> None:
    """The router: its front port on the switch, a /24 link per client, forwarding on."""
    topo = state.topology
    rt = _router(state)
    sw = topo.switch
    with iproute(sw.netns) as ipr:
        port = add_veth(ipr, rt.switch_port, rt.interface, rt.netns, rt.mac)
        ipr.link("set", index=port, master=ifindex(ipr, sw.bridge))
        ipr.link("set", index=port, state="up")
    with iproute(rt.netns) as ipr:
        ipr.link("set", index=ifindex(ipr, "lo"), state="up")
        dev = ifindex(ipr, rt.interface)
        ipr.addr("add", index=dev, address=rt.address, prefixlen=_prefixlen(topo))
        ipr.link("set", index=dev, state="up")
        for k, c in enumerate(topo.clients, 1):
            link = add_veth(ipr, c.switch_port, c.interface, c.netns, c.mac)
            ipr.addr(
                "add",
                index=link,
                address=router_address_for(k),
                prefixlen=client_link(k).prefixlen,
            )
            ipr.link("set", index=link, state="up")
    sysctl(rt.netns, "net.ipv4.ip_forward", "1")
    nft_script(rt.netns, ROUTER_NFT)
    for k, c in enumerate(topo.clients, 1):
        configure_host(c)
        with iproute(c.netns) as ipr:
            ipr.route("add", dst="0.0.0.0/0", gateway=router_address_for(k))
    for n in topo.nodes:  # the nodes' way back to the clients
        with iproute(n.netns) as ipr:
            ipr.route("add", dst=str(ROUTED_SUBNET), gateway=rt.address)
    set_router_neigh(state)


def _prefixlen(topo: Topology) -> int:
    return int(topo.subnet.rsplit("/", 1)[1])


def set_router_neigh(state: LabState) -> None:
    """Static mode: the router's neighbour entry for the VIP is the group's multicast MAC."""
    topo = state.topology
    rt = _router(state)
    if rt.neigh.value != "static":
        return
    with iproute(rt.netns) as ipr:
        ipr.neigh(
            "replace",
            dst=topo.vip,
            lladdr=topo.group_mac,
            ifindex=ifindex(ipr, rt.interface),
            state=0x80,  # NUD_PERMANENT
        )


def router_neigh(state: LabState) -> list[dict[str, Any]]:
    """The router's neighbour entries for the traffic IP (``ip -j neigh show VIP``)."""
    rt = _router(state)
    out = subprocess.run(
        ["ip", "-n", rt.netns, "-j", "neigh", "show", state.topology.vip],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return list(json.loads(out or "[]"))


# --- the back-end network ---------------------------------------------------------------


def wire_backnet(state: LabState) -> None:
    """The back-end switch (a plain flooding bridge), a veth per node and back end."""
    topo = state.topology
    bn = _backnet(state)
    with iproute(bn.netns) as ipr:
        ipr.link("set", index=ifindex(ipr, "lo"), state="up")
        ipr.link(
            "add",
            ifname=bn.bridge,
            kind="bridge",
            br_mcast_snooping=0,
            br_nf_call_iptables=0,
            br_nf_call_ip6tables=0,
            br_nf_call_arptables=0,
        )
        bridge = ifindex(ipr, bn.bridge)
        ipr.link("set", index=bridge, state="up")
        ends: list[tuple[str, str, str, str]] = [  # (port, peer netns, peer ifname, MAC)
            (f"p-{n.name}", n.netns, bn.interface, bn.node_mac(i)) for i, n in enumerate(topo.nodes)
        ]
        ends += [(b.switch_port, b.netns, b.interface, b.mac) for b in bn.backends]
        for port, netns, ifname, mac in ends:
            idx = add_veth(ipr, port, ifname, netns, mac)
            ipr.link("set", index=idx, master=bridge)
            ipr.link("set", index=idx, state="up")
    for n in topo.nodes:
        with iproute(n.netns) as ipr:
            dev = ifindex(ipr, bn.interface)
            ipr.addr("add", index=dev, address=bn.gateway(n.name), prefixlen=bn.prefixlen)
            ipr.link("set", index=dev, state="up")
        # ARP requests to back ends carry the node's own address, never a client's
        # (the proxies' sockets are bound to client addresses).
        sysctl(n.netns, f"net.ipv4.conf.{bn.interface}.arp_announce", "2")
    for b in bn.backends:
        with iproute(b.netns) as ipr:
            ipr.link("set", index=ifindex(ipr, "lo"), state="up")
            dev = ifindex(ipr, b.interface)
            # Only the back end's own address here; routes mode adds one per node with
            # 'multihost backend-routes --apply' (apply_return_routes).
            ipr.addr("add", index=dev, address=b.address, prefixlen=bn.prefixlen)
            ipr.link("set", index=dev, state="up")
            if bn.mode is ReturnMode.GATEWAY and bn.return_vip is not None:
                # learnt by ARP: the agents answer for the return group on eth1
                ipr.route("add", dst="0.0.0.0/0", gateway=bn.return_vip)


def node_nft(bn: BackNet) -> str:
    """The lab's table on a node: TCP from the back ends to a non-local address (a
    client's) is counted ``held`` if a transparent socket of this node has it; ``closed``
    if this node's conntrack knows the connection but its socket is gone (a FIN crossing
    the proxy's abortive close: the right node, late); else ``stray`` (a reply routed to a
    node that never held the connection).  It only counts: the agents' table ``inet
    multihost_transparent`` marks the same packets for the ``local`` route."""
    return f"""\
table inet {LAB_TABLE} {{
    counter held {{}}
    counter closed {{}}
    counter stray {{}}
    chain prerouting {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "{bn.interface}" ip saddr {bn.subnet} meta l4proto tcp fib daddr type != local \\
            jump backend_reply
    }}
    chain backend_reply {{
        socket transparent 1 counter name held accept
        ct state established,related counter name closed accept
        counter name stray
    }}
}}
"""


def node_counters(state: LabState) -> None:
    """On every node: the lab's reply counters (the transparent-proxy plumbing itself is the
    agents': ``transparent = true`` in the lab's configuration)."""
    bn = _backnet(state)
    for n in state.topology.nodes:
        nft_script(n.netns, node_nft(bn))
        if bn.proxy is Proxy.HAPROXY and bn.mode is ReturnMode.GATEWAY:
            # HAProxy binds the client's port too (with SO_REUSEADDR): a connection to a
            # back end from a client port whose last one sits in TIME_WAIT on this node may
            # reuse it (timestamps make that safe), as on a busy proxy.
            sysctl(n.netns, "net.ipv4.tcp_tw_reuse", "1")


def reply_counters(state: LabState) -> dict[str, dict[str, int]]:
    """Per node: ``{"held", "closed", "stray"}`` packets of the lab's table."""
    out: dict[str, dict[str, int]] = {}
    for n in state.topology.nodes:
        proc = subprocess.run(
            ["ip", "netns", "exec", n.netns, "nft", "-j", "list", "counters", "table", "inet",
             LAB_TABLE],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise LabError(f"node {n.name}: cannot read its reply counters: {proc.stderr.strip()}")
        counts = dict.fromkeys(REPLY_COUNTERS, 0)
        for obj in json.loads(proc.stdout).get("nftables", []):
            c = obj.get("counter")
            if c and c.get("name") in counts:
                counts[c["name"]] = int(c["packets"])
        out[n.name] = counts
    return out


# --- nginx: proxies on the nodes, servers on the back ends --------------------------------

BACKEND_CONF = """\
# multihost lab: nginx of back end {name} (generated; removed by 'multihost lab down').
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    # The client address as the back end sees it: with IP transparency, the client's own.
    log_format transparent '$remote_addr $remote_port $server_addr $status';
    access_log {dir}/access.log transparent;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 80 default_server backlog=4096;
        server_name _;
        default_type text/plain;
        location / {{
            set $seen "client=$remote_addr:$remote_port";
            return 200 "{name}\\nbackend={name} $seen server=$server_addr:$server_port\\n";
        }}
    }}
}}
"""


def usesrc(bn: BackNet) -> str:
    """HAProxy's transparent source: the client's address and port with a return gateway
    (the return group hashes the reply's destination address and port, which must be the
    client's), its address only with per-node return routes (the kernel picks the port)."""
    return "client" if bn.mode is ReturnMode.GATEWAY else "clientip"


HAPROXY_CONF = """\
# multihost lab: HAProxy of node {name} (generated; removed by 'multihost lab down').
global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 3s
    timeout client 30s
    timeout server 30s
    retries 0
    option httpclose
    maxconn 4096
frontend web
    bind :{port} backlog 4096
    http-response set-header {header} {name}
    default_backend backends
backend backends
    balance roundrobin
    source 0.0.0.0 usesrc {usesrc}
{servers}"""


def haproxy_conf(topo: Topology, node: str) -> str:
    bn = topo.backnet
    assert bn is not None
    servers = "".join(f"    server {b.name} {b.address_for(node)}:80\n" for b in bn.backends)
    return HAPROXY_CONF.format(
        name=node, port=topo.port, header=NODE_HEADER, usesrc=usesrc(bn), servers=servers
    )


def start_haproxy(state: LabState, node: Host) -> ProcessRecord:
    """The node's HAProxy (instead of its nginx): a transparent proxy to the back ends."""
    d = state.directory / f"haproxy-{node.name}"
    d.mkdir()
    conf = d / "haproxy.cfg"
    conf.write_text(haproxy_conf(state.topology, node.name))
    argv = [HAPROXY, "-db", "-f", str(conf)]
    return spawn(state, node, f"haproxy-{node.name}", argv, match=str(conf))


def proxy_http(topo: Topology, node: str) -> str:
    """The ``upstream`` block of a node's nginx (inside ``http``)."""
    bn = topo.backnet
    assert bn is not None
    servers = "".join(
        f"        server {b.address_for(node)}:80 max_fails=0;\n" for b in bn.backends
    )
    return f"    upstream backends {{\n{servers}    }}\n"


def proxy_location(topo: Topology, node: str) -> str:
    """The ``location /`` body of a node's nginx: a transparent proxy to the back ends,
    from the client's address (``proxy_bind`` could name ``$remote_port`` too, but nginx
    binds it without ``SO_REUSEADDR``: a client port seen again while the node's last
    connection from it to that back end sits in TIME_WAIT fails with EADDRINUSE)."""
    return (
        "            proxy_pass http://backends;\n"
        "            proxy_bind $remote_addr transparent;\n"
        "            proxy_next_upstream off;\n"
        "            proxy_connect_timeout 3s;\n"
        f"            add_header {NODE_HEADER} {node} always;\n"
    )


def start_backends(state: LabState) -> None:
    bn = _backnet(state)
    pending = []
    for b in bn.backends:
        d = state.directory / f"nginx-{b.name}"
        (d / "tmp").mkdir(parents=True)
        conf = d / "nginx.conf"
        conf.write_text(BACKEND_CONF.format(name=b.name, dir=d))
        argv = [NGINX, "-p", f"{d}/", "-e", str(d / "error.log"), "-c", str(conf)]
        pending.append(spawn(state, b, f"nginx-{b.name}", argv, match=str(conf)))
    for rec in pending:
        wait_listening(rec, "tcp", 80)
    state.save()


def backend_log(state: LabState, backend: str) -> Path:
    return state.directory / f"nginx-{backend}" / "access.log"


def apply_return_routes(state: LabState) -> None:
    """Routes mode: ``multihost backend-routes --apply`` inside every back end, from the
    lab's cluster configuration (its ``[[backend]]`` tables)."""
    bn = _backnet(state)
    if bn.mode is not ReturnMode.ROUTES:
        return
    config = str(state.agents.get("config") or "")
    if not config:
        raise LabError("no cluster configuration written (the agents' step must run first)")
    for b in bn.backends:
        done = backend_routes(b.netns, config, b.name, "--apply")
        if not done.get("ok"):
            raise LabError(f"back end {b.name}: backend-routes --apply: {done.get('error')}")


def backend_routes(netns: str, config: str, backend: str, action: str) -> dict[str, Any]:
    """Run ``multihost backend-routes ... ACTION --json`` in ``netns``; its JSON object."""
    env = dict(os.environ)
    src = str(Path(multihost.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "multihost", "backend-routes", "--config", config]
    argv += ["--backend", backend, *([action] if action else []), "--json"]
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False, env=env
    )
    try:
        out: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise LabError(
            f"backend-routes in {netns} printed no JSON (status {proc.returncode}): "
            f"{proc.stderr.strip()[-300:]}"
        ) from None
    return out
