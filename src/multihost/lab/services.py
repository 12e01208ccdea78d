"""The nodes' services: nginx on port 80 and the UDP echo on port 7, in every node.

Owns: the nodes' nginx configuration (answering the node's own name, or in a transparent
lab proxying to the back ends: :mod:`multihost.lab.backbuild` supplies that part) and
starting both services, recorded by PID and start time like every lab process.  Must not:
start anything outside the nodes' namespaces.
"""

from __future__ import annotations

import sys

from multihost.lab import processes
from multihost.lab.backnet import Proxy
from multihost.lab.clean import proc_cmdline
from multihost.lab.processes import NGINX, spawn
from multihost.lab.state import LabState, ProcessRecord
from multihost.lab.topology import Host

NGINX_CONF = """\
# multihost lab: nginx of node {name} (generated; removed by 'multihost lab down').
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log {dir}/access.log;
{upstream}
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    # Long-lived keep-alive connections for 'lab chaos' (HTTP/1.0 probes still close).
    keepalive_timeout 3600s;
    keepalive_requests 100000000;
    server {{
        # The wildcard address serves the node's own address now and the traffic IP
        # once the agent puts it on the node.
        listen {port} default_server backlog=4096;
{listen6}        server_name _;
        default_type text/plain;
        location / {{
{location}        }}
    }}
}}
"""


#: The ``location /`` body of a node that serves itself (not a transparent lab).
SERVE_LOCATION = """\
            return 200 "{name}\\nnode={name} server=$server_addr:$server_port {peer}\\n";
"""


def start_services(state: LabState) -> None:
    topo = state.topology
    pending: list[tuple[ProcessRecord, str, int]] = []
    bn = topo.backnet
    for node in topo.nodes:
        if bn is not None and bn.proxy is Proxy.HAPROXY:  # instead of the node's nginx
            from multihost.lab import backbuild

            rec = backbuild.start_haproxy(state, node)
            pending.append((rec, "tcp", topo.port))
        else:
            pending.append((_start_nginx(state, node), "tcp", topo.port))
        argv = [sys.executable, "-m", "multihost.lab.udpecho", "--name", node.name]
        argv += ["--port", str(topo.echo_port), *(["--ipv6"] if topo.ipv6 else [])]
        match = f"multihost.lab.udpecho --name {node.name}"
        rec = spawn(state, node, f"udpecho-{node.name}", argv, match=match)
        pending.append((rec, "udp", topo.echo_port))
    for rec, proto, port in pending:
        processes.wait_listening(rec, proto, port)  # through the module: tests replace it
        rec.cmdline = proc_cmdline(rec.pid)
    state.save()


def _start_nginx(state: LabState, node: Host) -> ProcessRecord:
    """The node's nginx: answers its own name, or (transparent lab) proxies to back ends."""
    topo = state.topology
    d = state.directory / f"nginx-{node.name}"
    (d / "tmp").mkdir(parents=True)
    conf = d / "nginx.conf"
    peer = "client=$remote_addr:$remote_port"
    listen6 = (
        f"        listen [::]:{topo.port} default_server ipv6only=on backlog=4096;\n"
        if topo.ipv6
        else ""
    )
    upstream, location = "", SERVE_LOCATION.format(name=node.name, peer=peer)
    if topo.backnet is not None:  # a transparent proxy in front of the back ends
        from multihost.lab import backbuild

        upstream = backbuild.proxy_http(topo, node.name)
        location = backbuild.proxy_location(topo, node.name)
    conf.write_text(
        NGINX_CONF.format(
            name=node.name,
            dir=d,
            port=topo.port,
            listen6=listen6,
            upstream=upstream,
            location=location,
        )
    )
    argv = [NGINX, "-p", f"{d}/", "-e", str(d / "error.log"), "-c", str(conf)]
    return spawn(state, node, f"nginx-{node.name}", argv, match=str(conf))
