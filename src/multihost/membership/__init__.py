"""Cluster membership: who is alive, and which buckets this node may serve right now.

Owns the heartbeat wire format (:mod:`.wire`), datagram screening (:mod:`.admission`), the
per-member state table (:mod:`.state`), the pure bucket-mask and lease helpers
(:mod:`.ownership`, :mod:`.leases`), the core's configuration (:mod:`.config`) and effects
(:mod:`.effects`), and the sans-I/O protocol state machine (:mod:`.protocol`) that turns
received heartbeats and clock ticks into claims that are never held by two nodes at once
(see ``docs/membership.md`` for the argument and its assumptions).

Must not: open sockets, read clocks, sleep, draw randomness or touch the kernel.  The
agent feeds datagrams and times in, performs the returned effects, and confirms applied
claims; everything here is deterministic and testable in a simulator.
"""
