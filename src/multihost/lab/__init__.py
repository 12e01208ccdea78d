"""The lab: a cluster of network namespaces on one Linux host to demonstrate ``multihost``.

As Mininet does, the lab is first *described* (:mod:`multihost.lab.topology`, pure: names
(:mod:`multihost.lab.naming`), addresses and MACs (:mod:`multihost.lab.addressing`), the
traffic IP, the group and the hash seed) and then *built* (:mod:`multihost.lab.build`:
namespaces, a bridge with IGMP snooping as the switch, veth pairs and addresses through
pyroute2 (:mod:`multihost.lab.wiring`), nginx and a UDP echo service per node
(:mod:`multihost.lab.services`, :mod:`multihost.lab.processes`), then the agents).
Everything a build creates or starts is recorded in ``/run/multihost-lab/<prefix>/state.json``
(:mod:`multihost.lab.state`), and :mod:`multihost.lab.clean` removes the leftovers of any lab
with a prefix, even after a crash.
:mod:`multihost.lab.probe` sends TCP, UDP or ICMP probes from a client and compares the node
that answered each flow with the model's prediction.

Must not: touch the root namespace's interfaces, routes or firewall, use addresses outside
198.18.0.0/15 (hosts) and 239.192.0.0/14 (the group), or stop anything it did not start.
"""
