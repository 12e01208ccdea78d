// SPDX-License-Identifier: Apache-2.0
/*
 * multihost XDP data plane: keep this node's share of the traffic IPs, drop the rest.
 *
 * Owns: the per-packet decision on the cluster interface.  A packet to a traffic IP (looked
 * up in mh_addrs) is hashed exactly like the nft rule `jhash <fields> mod B seed S` (the
 * Linux jhash over the nft register layout: addresses in network order, ports as 2 bytes +
 * 2 zero bytes; reciprocal_scale for `mod`), and the bucket's state in the group's active
 * table (mh_groups, mh_buckets) decides:
 *
 *   owned     lease held: pass.  Lease lapsed: TCP packets of a local connection only.
 *   draining  TCP: packets of a local connection (never a pure SYN); other protocols: pass
 *             (and remembered in mh_udp_flows).
 *   incoming  TCP: a pure SYN while the lease is held, or a local connection's packet;
 *             other protocols: only flows remembered in mh_udp_flows.
 *   none      drop.
 *
 * "A local connection" is bpf_skc_lookup_tcp finding a socket that is not a listener: no
 * conntrack anywhere.  Passed packets get the interface's own MAC as destination, so the
 * stack sees PACKET_HOST (they arrive on the cluster's multicast MAC).
 *
 * Replies to clients (IP transparency, return groups): a frame to a cluster MAC of its
 * ingress interface (mh_ifaces) with a unicast destination that is no traffic IP is a back
 * end's reply to a client, sent to the multi-hosted gateway.  It is hashed with the return
 * group's mode (the destination side: the client's address [and port]) and decided by its
 * front group's table (mh_group.table), so it lands on the node that owns the request.
 *
 * ICMP errors and ICMPv6 neighbour discovery to a traffic IP pass on every node.  Non-first
 * fragments follow the verdict of their datagram's first fragment (mh_frags, LRU).
 * Everything else not addressed to a traffic IP passes untouched.
 *
 * The lease is a deadline in jiffies (mh_node.lease_jiffies), compared with bpf_jiffies64(),
 * which the verifier inlines into one load: the coarse clock, bpf_ktime_get_coarse_ns(),
 * is a helper call that cost 18 of the owned path's 63 ns here.  The loader converts its
 * CLOCK_MONOTONIC deadline with a (jiffies, coarse ns) pair read by mh_clock just before,
 * one tick early, so the lease still lapses no later than its deadline.
 *
 * Must not: keep state the loader cannot see (all state is in the maps declared in
 * multihost_layout.h, generated from multihost/dataplane/xdplayout.py), or call helpers
 * beyond map access, the clocks and socket lookup.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "multihost_layout.h"

#ifndef MH_BUILD_ID
#error "MH_BUILD_ID must be defined by the build (see the Makefile)"
#endif

/* Found by the loader in the object file to refuse a stale build (see xdp.py). */
const char mh_build_id[] SEC("mh_build") __attribute__((used)) = "MHBUILD:" MH_BUILD_ID;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MH_VIP4_SLOTS);
	__type(key, __u32);
	__type(value, struct mh_vip4);
} mh_vip4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MH_MAX_ADDRS);
	__type(key, struct mh_addr_key);
	__type(value, struct mh_addr_val);
} mh_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MH_MAX_GROUPS);
	__type(key, __u32);
	__type(value, struct mh_group);
} mh_groups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1); /* sized by the loader */
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u8[MH_BUCKETS_PER_ELEMENT]);
} mh_buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mh_node);
} mh_node SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MH_MAX_IFACES);
	__type(key, __u32);
	__type(value, struct mh_iface);
} mh_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MH_MAX_GROUPS);
	__type(key, __u32);
	__type(value, struct mh_stats);
} mh_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MH_FRAG_ENTRIES);
	__type(key, struct mh_frag_key);
	__type(value, struct mh_frag_val);
} mh_frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MH_UDP_FLOW_ENTRIES);
	__type(key, struct mh_flow_key);
	__type(value, struct mh_flow_val);
} mh_udp_flows SEC(".maps");

#define IPPROTO_DCCP_ 33
#define IPPROTO_SCTP_ 132
#define IPPROTO_UDPLITE_ 136
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60
#define IPV6_EXT_MAX 4
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* ------------------------------------------------------------------ jhash (linux/jhash.h) */
static __always_inline __u32 rol32(__u32 w, unsigned int s)
{
	return (w << s) | (w >> (32 - s));
}

#define JHASH_MIX(a, b, c)                                                                 \
	do {                                                                               \
		a -= c; a ^= rol32(c, 4); c += b;                                          \
		b -= a; b ^= rol32(a, 6); a += c;                                          \
		c -= b; c ^= rol32(b, 8); b += a;                                          \
		a -= c; a ^= rol32(c, 16); c += b;                                         \
		b -= a; b ^= rol32(a, 19); a += c;                                         \
		c -= b; c ^= rol32(b, 4); b += a;                                          \
	} while (0)

#define JHASH_FINAL(a, b, c)                                                               \
	do {                                                                               \
		c ^= b; c -= rol32(b, 14);                                                 \
		a ^= c; a -= rol32(c, 11);                                                 \
		b ^= a; b -= rol32(a, 25);                                                 \
		c ^= b; c -= rol32(b, 16);                                                 \
		a ^= c; a -= rol32(c, 4);                                                  \
		b ^= a; b -= rol32(a, 14);                                                 \
		c ^= b; c -= rol32(b, 24);                                                 \
	} while (0)

/* The kernel's jhash(k, 4 * n, seed) on a little-endian CPU, for n in 1..10 words. */
static __always_inline __u32 jhash_words(const __u32 *k, __u32 n, __u32 seed)
{
	__u32 a, b, c;
	__u32 i = 0;

	a = b = c = 0xdeadbeef + (n << 2) + seed;
#pragma unroll
	for (int round = 0; round < 3; round++) {
		if (n <= 3)
			break;
		a += k[i];
		b += k[i + 1];
		c += k[i + 2];
		JHASH_MIX(a, b, c);
		n -= 3;
		i += 3;
	}
	if (n == 3)
		c += k[i + 2];
	if (n >= 2)
		b += k[i + 1];
	a += k[i];
	JHASH_FINAL(a, b, c);
	return c;
}

/* ------------------------------------------------------------------ parsed packet */
struct pkt {
	__u32 saddr[4]; /* IPv4: saddr[0] only; network byte order, as nft loads them */
	__u32 daddr[4];
	__u16 sport; /* network byte order */
	__u16 dport;
	__u8 family; /* 4 or 6 */
	__u8 proto;
	__u8 has_ports;
	__u8 to_all; /* ICMP error / neighbour discovery: every node takes it */
	__u8 tcp_flags;
	__u8 first_frag; /* offset 0 with more fragments: remember the verdict */
	__u8 later_frag; /* offset != 0: no ports, use the remembered verdict */
	__u8 pad;
	__u32 frag_id;
};

static __always_inline int is_port_proto(__u8 p)
{
	return p == IPPROTO_TCP || p == IPPROTO_UDP || p == IPPROTO_SCTP_ ||
	       p == IPPROTO_DCCP_ || p == IPPROTO_UDPLITE_;
}

/* Transport header at l4 (bounds-checked): ports, TCP flags, ICMP type. 0 = malformed. */
static __always_inline int parse_l4(struct pkt *p, void *l4, void *end)
{
	if (p->later_frag)
		return 1;
	if (is_port_proto(p->proto)) {
		__u16 *ports = l4;
		if ((void *)(ports + 2) > end)
			return 0;
		p->sport = ports[0];
		p->dport = ports[1];
		p->has_ports = 1;
		if (p->proto == IPPROTO_TCP) {
			__u8 *th = l4;
			if ((void *)(th + 14) > end)
				return 0;
			p->tcp_flags = th[13];
		}
		return 1;
	}
	if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		__u8 *type = l4;
		if ((void *)(type + 1) > end)
			return 0;
		if (p->proto == IPPROTO_ICMP)
			p->to_all = *type == 3 || *type == 11 || *type == 12;
		else
			p->to_all = (*type >= 1 && *type <= 4) || (*type >= 135 && *type <= 137);
	}
	return 1;
}

/* ------------------------------------------------------------------ the flow's bucket */
static __always_inline __u32 flow_hash(const struct pkt *p, __u32 mode, __u32 seed)
{
	__u32 k[10] = {};
	__u32 sport = p->sport, dport = p->dport; /* 2 port bytes + 2 zero bytes */

	if (mode >= MH_HASH_SOURCE_IP_PORT) {
		/* one side only: source (front group) or destination (return group) address,
		 * then that side's port when the mode and the protocol have one */
		int src = mode == MH_HASH_SOURCE_IP_PORT;
		const __u32 *a = src ? p->saddr : p->daddr;
		__u32 port = src ? sport : dport;
		__u32 n = p->family == 4 ? 1 : 4;

		k[0] = a[0];
		if (p->family == 6) {
			k[1] = a[1];
			k[2] = a[2];
			k[3] = a[3];
		}
		if (p->has_ports && mode != MH_HASH_DESTINATION_IP) {
			if (p->family == 4)
				k[1] = port;
			else
				k[4] = port;
			n += 1;
		}
		return jhash_words(k, n, seed);
	}
	if (p->family == 4) {
		if (mode == MH_HASH_SOURCE_IP) {
			k[0] = p->saddr[0];
			return jhash_words(k, 1, seed);
		}
		if (!p->has_ports) {
			k[0] = p->saddr[0];
			k[1] = p->daddr[0];
			return jhash_words(k, 2, seed);
		}
		if (mode == MH_HASH_THREE_TUPLE) {
			k[0] = p->saddr[0];
			k[1] = p->daddr[0];
			k[2] = dport;
			return jhash_words(k, 3, seed);
		}
		k[0] = p->saddr[0];
		k[1] = sport;
		k[2] = p->daddr[0];
		k[3] = dport;
		return jhash_words(k, 4, seed);
	}
	k[0] = p->saddr[0];
	k[1] = p->saddr[1];
	k[2] = p->saddr[2];
	k[3] = p->saddr[3];
	if (mode == MH_HASH_SOURCE_IP)
		return jhash_words(k, 4, seed);
	if (!p->has_ports || mode == MH_HASH_THREE_TUPLE) {
		k[4] = p->daddr[0];
		k[5] = p->daddr[1];
		k[6] = p->daddr[2];
		k[7] = p->daddr[3];
		if (!p->has_ports)
			return jhash_words(k, 8, seed);
		k[8] = dport;
		return jhash_words(k, 9, seed);
	}
	k[4] = sport;
	k[5] = p->daddr[0];
	k[6] = p->daddr[1];
	k[7] = p->daddr[2];
	k[8] = p->daddr[3];
	k[9] = dport;
	return jhash_words(k, 10, seed);
}

static __always_inline __u32 bucket_state(const struct mh_group *g, __u32 bucket)
{
	__u32 idx = g->base[g->active & 1] + bucket;
	__u32 key = idx / MH_BUCKETS_PER_ELEMENT;
	__u8 *elem = bpf_map_lookup_elem(&mh_buckets, &key);

	if (!elem)
		return MH_STATE_NONE;
	return elem[idx & (MH_BUCKETS_PER_ELEMENT - 1)];
}

/* ------------------------------------------------------------------ local flows */
static __always_inline int local_tcp(struct xdp_md *ctx, const struct pkt *p)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 size;
	int found;

	if (p->family == 4) {
		t.ipv4.saddr = p->saddr[0];
		t.ipv4.daddr = p->daddr[0];
		t.ipv4.sport = p->sport;
		t.ipv4.dport = p->dport;
		size = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, p->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, p->daddr, 16);
		t.ipv6.sport = p->sport;
		t.ipv6.dport = p->dport;
		size = sizeof(t.ipv6);
	}
	sk = bpf_skc_lookup_tcp(ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	found = sk->state != BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return found;
}

static __always_inline void flow_key(struct mh_flow_key *k, const struct pkt *p)
{
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->sport = p->sport;
	k->dport = p->dport;
	k->family = p->family;
	k->proto = p->proto;
}

/* ------------------------------------------------------------------ the decision */
static __always_inline int pure_syn(const struct pkt *p)
{
	return (p->tcp_flags & (TCPF_FIN | TCPF_SYN | TCPF_RST | TCPF_ACK)) == TCPF_SYN;
}

static __always_inline __u32 decide(struct xdp_md *ctx, const struct pkt *p, __u32 state,
				    const struct mh_node *node)
{
	int tcp = p->proto == IPPROTO_TCP;
	struct mh_flow_key fk = {};
	struct mh_flow_val fv = {};

	if (state == MH_STATE_OWNED) {
		if (bpf_jiffies64() < node->lease_jiffies)
			return MH_V_OWNED;
		/* lease lapsed: this node takes no new flow (docs/handover.md) */
		if (tcp && !pure_syn(p) && local_tcp(ctx, p))
			return MH_V_HANDOVER_PASSED;
		return MH_V_LEASE_LAPSED;
	}
	if (state == MH_STATE_DRAINING) {
		if (tcp)
			return !pure_syn(p) && local_tcp(ctx, p) ? MH_V_HANDOVER_PASSED
								  : MH_V_HANDOVER_DROPPED;
		flow_key(&fk, p);
		fv.last_seen_ns = bpf_ktime_get_coarse_ns();
		bpf_map_update_elem(&mh_udp_flows, &fk, &fv, BPF_ANY);
		return MH_V_HANDOVER_PASSED;
	}
	if (state == MH_STATE_INCOMING) {
		if (tcp) {
			if (pure_syn(p))
				return bpf_jiffies64() < node->lease_jiffies
					       ? MH_V_HANDOVER_PASSED
					       : MH_V_LEASE_LAPSED;
			return local_tcp(ctx, p) ? MH_V_HANDOVER_PASSED : MH_V_HANDOVER_DROPPED;
		}
		flow_key(&fk, p);
		return bpf_map_lookup_elem(&mh_udp_flows, &fk) ? MH_V_HANDOVER_PASSED
							       : MH_V_HANDOVER_DROPPED;
	}
	return MH_V_DROPPED;
}

static __always_inline int passes(__u32 v)
{
	return v == MH_V_OWNED || v == MH_V_HANDOVER_PASSED || v == MH_V_TO_ALL ||
	       v == MH_V_FRAG_PASSED;
}

static __always_inline void count(__u32 group, __u32 v, __u64 len, __u32 bucket, __u32 state)
{
	struct mh_stats *st = bpf_map_lookup_elem(&mh_stats, &group);

	if (!st || v >= MH_N_VERDICTS)
		return;
	st->packets[v] += 1;
	st->bytes[v] += len;
	st->last_bucket = bucket;
	st->last_state = state;
}

static __always_inline void frag_key(struct mh_frag_key *k, const struct pkt *p)
{
	k->family = p->family;
	k->proto = p->proto;
	k->id = p->frag_id;
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
}

static __always_inline int verdict(struct xdp_md *ctx, struct ethhdr *eth, struct pkt *p,
				   __u32 group_id, const __u8 *own_mac)
{
	struct mh_group *g = bpf_map_lookup_elem(&mh_groups, &group_id);
	struct mh_group *t = g;
	__u32 zero = 0, v, bucket = 0, state = MH_STATE_NONE;
	struct mh_node *node = bpf_map_lookup_elem(&mh_node, &zero);
	struct mh_frag_key fk = {};
	__u64 len = ctx->data_end - ctx->data;

	if (!g || !node)
		return XDP_DROP;
	if (g->table != group_id) { /* a return group: its front group's table decides */
		__u32 front = g->table, ifindex = ctx->ingress_ifindex;

		t = bpf_map_lookup_elem(&mh_groups, &front);
		if (!t)
			return XDP_DROP;
		if (!own_mac) { /* to the gateway address itself: the MAC of where it came in */
			struct mh_iface *ifc = bpf_map_lookup_elem(&mh_ifaces, &ifindex);

			if (ifc)
				own_mac = ifc->own_mac;
		}
	}
	if (p->later_frag) {
		struct mh_frag_val *fv;

		frag_key(&fk, p);
		fv = bpf_map_lookup_elem(&mh_frags, &fk);
		v = fv && fv->pass ? MH_V_FRAG_PASSED : MH_V_FRAG_DROPPED;
	} else if (p->to_all) {
		v = MH_V_TO_ALL;
	} else {
		if (g->buckets == 0)
			return XDP_DROP;
		bucket = (__u32)(((__u64)flow_hash(p, g->mode, g->seed) * g->buckets) >> 32);
		state = bucket_state(t, bucket);
		v = decide(ctx, p, state, node);
	}
	if (p->first_frag) {
		struct mh_frag_val val = {.pass = passes(v), .group = group_id};

		frag_key(&fk, p);
		bpf_map_update_elem(&mh_frags, &fk, &val, BPF_ANY);
	}
	count(group_id, v, len, bucket, state);
	if (!passes(v))
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, own_mac ? own_mac : node->mac, ETH_ALEN);
	return XDP_PASS;
}

/* The return group of a reply: a frame to the cluster MAC of its family on an interface
 * carrying one (NULL: not a reply, let it pass untouched). */
static __always_inline struct mh_iface *reply_iface(struct xdp_md *ctx, struct ethhdr *eth,
						    int family, __u32 *group)
{
	__u32 ifindex = ctx->ingress_ifindex;
	struct mh_iface *ifc;
	const __u8 *mac;
	__u32 plus_one;

	if (!(eth->h_dest[0] & 1)) /* unicast frame: the only test ordinary traffic pays */
		return NULL;
	ifc = bpf_map_lookup_elem(&mh_ifaces, &ifindex);
	if (!ifc)
		return NULL;
	plus_one = family == 4 ? ifc->group4_plus_one : ifc->group6_plus_one;
	mac = family == 4 ? ifc->mac4 : ifc->mac6;
	if (!plus_one)
		return NULL;
#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++) /* no memcmp in BPF */
		if (eth->h_dest[i] != mac[i])
			return NULL;
	*group = plus_one - 1;
	return ifc;
}

/* ------------------------------------------------------------------ parsing */
static __always_inline int ipv4(struct xdp_md *ctx, struct ethhdr *eth, void *l3, void *end)
{
	struct iphdr *ip = l3;
	struct mh_addr_key ak = {.family = 4};
	struct mh_addr_val *av;
	struct pkt p = {.family = 4};
	__u16 frag;

	__u32 slot, group = 0;
	struct mh_vip4 *fast;
	struct mh_iface *ifc = NULL;

	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return XDP_PASS;
	/* fast path: one inlined array lookup (a hash map lookup costs ~25 ns here) */
	slot = (ip->daddr * MH_VIP4_MULT) >> MH_VIP4_SHIFT;
	fast = bpf_map_lookup_elem(&mh_vip4, &slot);
	if (!fast || !fast->group_plus_one)
		goto not_vip;
	if (fast->group_plus_one != MH_VIP4_COLLIDE) {
		if (fast->addr != ip->daddr)
			goto not_vip;
		group = fast->group_plus_one - 1;
	} else {
		__builtin_memcpy(ak.addr, &ip->daddr, 4);
		av = bpf_map_lookup_elem(&mh_addrs, &ak);
		if (!av)
			goto not_vip;
		group = av->group;
	}
	goto parse;
not_vip:
	ifc = reply_iface(ctx, eth, 4, &group);
	if (!ifc || (bpf_ntohl(ip->daddr) >> 28) == 0xe) /* IP multicast is no reply */
		return XDP_PASS;
parse:
	p.saddr[0] = ip->saddr;
	p.daddr[0] = ip->daddr;
	p.proto = ip->protocol;
	frag = bpf_ntohs(ip->frag_off);
	if (frag & 0x1fff) {
		p.later_frag = 1;
		p.frag_id = ip->id;
	} else if (frag & 0x2000) {
		p.first_frag = 1;
		p.frag_id = ip->id;
	}
	if (!parse_l4(&p, (void *)ip + ip->ihl * 4, end)) {
		count(group, MH_V_DROPPED, ctx->data_end - ctx->data, 0, 0);
		return XDP_DROP;
	}
	return verdict(ctx, eth, &p, group, ifc ? ifc->own_mac : NULL);
}

static __always_inline int ipv6(struct xdp_md *ctx, struct ethhdr *eth, void *l3, void *end)
{
	struct ipv6hdr *ip6 = l3;
	struct mh_addr_key ak = {.family = 6};
	struct mh_addr_val *av;
	struct pkt p = {.family = 6};
	struct mh_iface *ifc = NULL;
	__u32 group = 0;
	void *l4;
	__u8 next;

	if ((void *)(ip6 + 1) > end)
		return XDP_PASS;
	__builtin_memcpy(ak.addr, &ip6->daddr, 16);
	av = bpf_map_lookup_elem(&mh_addrs, &ak);
	if (av) {
		group = av->group;
	} else {
		ifc = reply_iface(ctx, eth, 6, &group);
		if (!ifc || ip6->daddr.in6_u.u6_addr8[0] == 0xff) /* IPv6 multicast is no reply */
			return XDP_PASS;
	}
	__builtin_memcpy(p.saddr, &ip6->saddr, 16);
	__builtin_memcpy(p.daddr, &ip6->daddr, 16);
	next = ip6->nexthdr;
	l4 = ip6 + 1;
#pragma unroll
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		__u8 *h = l4;

		if (next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST &&
		    next != NEXTHDR_FRAGMENT && next != NEXTHDR_AUTH)
			break;
		if ((void *)(h + 8) > end)
			goto malformed;
		if (next == NEXTHDR_FRAGMENT) {
			__u16 off = bpf_ntohs(*(__u16 *)(h + 2));

			if (off & 0xfff8)
				p.later_frag = 1;
			else if (off & 1)
				p.first_frag = 1;
			p.frag_id = *(__u32 *)(h + 4);
			next = h[0];
			l4 = h + 8;
			if (p.later_frag)
				break;
			continue;
		}
		if (next == NEXTHDR_AUTH)
			l4 = h + ((__u32)h[1] + 2) * 4;
		else
			l4 = h + ((__u32)h[1] + 1) * 8;
		next = h[0];
	}
	p.proto = next;
	if (!parse_l4(&p, l4, end))
		goto malformed;
	return verdict(ctx, eth, &p, group, ifc ? ifc->own_mac : NULL);
malformed:
	count(group, MH_V_DROPPED, ctx->data_end - ctx->data, 0, 0);
	return XDP_DROP;
}

SEC("xdp")
int mh_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return ipv4(ctx, eth, eth + 1, end);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return ipv6(ctx, eth, eth + 1, end);
	return XDP_PASS;
}

/* The loader's clock pair, run with BPF_PROG_RUN on a scratch frame (never attached):
 * struct mh_clocks at the start of the frame = (jiffies, CLOCK_MONOTONIC_COARSE ns), read
 * together, so the loader can turn a lease deadline into jiffies. */
SEC("xdp")
int mh_clock(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct mh_clocks *c = data;

	if ((void *)(c + 1) > end)
		return XDP_ABORTED;
	c->jiffies = bpf_jiffies64();
	c->coarse_ns = bpf_ktime_get_coarse_ns();
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Apache-2.0";
