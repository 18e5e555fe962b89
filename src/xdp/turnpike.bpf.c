// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0
//
// turnpike's kernel fast path: forwards ChannelData of bound channels in XDP (issue 13).
//
// The maps are a cache of the userspace route table, written only by src/xdp/mod.rs (`XdpTables`):
// every relay decision (auth, permissions, peer policy) is made in userspace at ChannelBind. This
// program only looks a datagram up and, on a hit, rewrites and sends it; anything it does not know or
// does not handle gets XDP_PASS and the userspace path handles it as if no XDP program were there.
//
//   client -> peer:  [eth][ip][udp client->listener][chan|len][data][pad 0-3]
//                 => [eth][ip][udp relayed->peer][data]                       (4-byte header stripped)
//   peer -> client:  [eth][ip][udp peer->relayed][data]
//                 => [eth][ip][udp listener->client][chan|len][data]          (bpf_xdp_adjust_head -4)
//
// Headers: plain uapi headers (linux/*.h) and libbpf's bpf_helpers.h, no vmlinux.h. The program reads
// only wire formats (Ethernet, IPv4, IPv6, UDP), whose layout is fixed by RFCs rather than by the
// kernel build, so there is nothing for CO-RE to relocate; `-g` still emits BTF for the maps.
//
// The key and value layouts below are mirrored byte for byte by src/sys/xdp.rs.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define CHANNEL_HEADER 4
#define TTL 64
#define MAX_ENTRIES 65536

// A client 5-tuple and channel: client ip/port, listener ip/port. IPv4 addresses use the first 4 bytes.
struct c2p_key {
	__u8 client_ip[16];
	__u8 listener_ip[16];
	__be16 client_port;
	__be16 listener_port;
	__be16 channel;
	__u8 family; // 4 or 6
	__u8 pad;
};

struct c2p_val {
	__u8 relayed_ip[16];
	__u8 peer_ip[16];
	__be16 relayed_port;
	__be16 peer_port;
	__u32 slot; // index into `meters`
};

// A relayed address and a peer with a channel bound.
struct p2c_key {
	__u8 relayed_ip[16];
	__u8 peer_ip[16];
	__be16 relayed_port;
	__be16 peer_port;
	__u8 family;
	__u8 pad[3];
};

struct p2c_val {
	__u8 listener_ip[16];
	__u8 client_ip[16];
	__be16 listener_port;
	__be16 client_port;
	__be16 channel;
	__u16 pad;
	__u32 slot;
};

// A live relayed transport address of this host (relay-to-relay traffic stays in userspace).
struct relayed_key {
	__u8 ip[16];
	__be16 port;
	__u8 family;
	__u8 pad;
};

// What XDP forwarded for one allocation (payload bytes, as the userspace counters count them).
struct meter {
	__u64 to_peer_bytes;
	__u64 to_peer_packets;
	__u64 to_client_bytes;
	__u64 to_client_packets;
};

// Per-path packet counters (indices mirrored by src/sys/xdp.rs `PATH_*`).
enum path_index {
	PATH_XDP_TO_PEER = 0,
	PATH_XDP_TO_CLIENT = 1,
	PATH_PASS_NOT_IP_UDP = 2,  // not UDP over IPv4/IPv6, fragments, IP options, IPv6 extension headers
	PATH_PASS_NO_ENTRY = 3,    // UDP without a channel entry (STUN, indications, unbound, unknown peers)
	PATH_PASS_RELAY_TO_RELAY = 4,
	PATH_PASS_FIB = 5,         // no route/neighbour yet, forwarding disabled, or too big for the MTU
	PATH_ABORTED = 6,          // a helper failed after the packet was changed (dropped)
	PATH_COUNT = 7,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct c2p_key);
	__type(value, struct c2p_val);
} to_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct p2c_key);
	__type(value, struct p2c_val);
} to_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct relayed_key);
	__type(value, __u8);
} relayed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, __u32);
	__type(value, struct meter);
} meters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PATH_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} paths SEC(".maps");

// The headers of one IPv4 or IPv6 UDP datagram, copied to the stack so they survive adjust_head.
struct headers {
	struct ethhdr eth;
	union {
		struct iphdr v4;
		struct ipv6hdr v6;
	};
	struct udphdr udp;
};

static __always_inline int count(__u32 path, int action)
{
	__u64 *n = bpf_map_lookup_elem(&paths, &path);
	if (n)
		*n += 1;
	return action;
}

// RFC 1071 one's-complement arithmetic on 16-bit words as they lie in memory (byte order independent).
static __always_inline __u32 fold(__u64 acc)
{
	acc = (acc & 0xffff) + (acc >> 16);
	acc = (acc & 0xffff) + (acc >> 16);
	acc = (acc & 0xffff) + (acc >> 16);
	acc = (acc & 0xffff) + (acc >> 16);
	return (__u32)acc;
}

static __always_inline __u64 add_words(__u64 acc, const void *p, int words)
{
	const __u16 *w = p;
#pragma unroll
	for (int i = 0; i < 8; i++)
		if (i < words)
			acc += w[i];
	return acc;
}

static __always_inline __u64 sub_words(__u64 acc, const void *p, int words)
{
	const __u16 *w = p;
#pragma unroll
	for (int i = 0; i < 8; i++)
		if (i < words)
			acc += (__u16)~w[i];
	return acc;
}

static __always_inline __u16 ipv4_checksum(struct iphdr *ip)
{
	ip->check = 0;
	return (__u16)~fold(add_words(add_words(0, ip, 8), (__u16 *)ip + 8, 2));
}

static __always_inline __u16 finish_udp(__u64 acc)
{
	__u16 c = (__u16)~fold(acc);
	return c ? c : 0xffff;
}

// Parses Ethernet + IPv4 (no options, not a fragment) or IPv6 (UDP next header) + UDP.
// Returns the family, or 0 to pass. `*udp_len` is the UDP length, checked against the IP length and the
// frame.
static __always_inline int parse(void *data, void *end, struct headers *h, __u32 *udp_len)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return 0;
		if (ip->ihl != 5 || ip->version != 4 || ip->protocol != IPPROTO_UDP)
			return 0;
		if (ip->frag_off & bpf_htons(0x3fff)) // MF or an offset: a fragment
			return 0;
		__u32 ip_len = bpf_ntohs(ip->tot_len);
		__u32 ulen = bpf_ntohs(udp->len);
		if (ulen < sizeof(*udp) || ip_len != sizeof(*ip) + ulen ||
		    (void *)udp + ulen > end)
			return 0;
		__builtin_memcpy(&h->eth, eth, sizeof(*eth));
		__builtin_memcpy(&h->v4, ip, sizeof(*ip));
		__builtin_memcpy(&h->udp, udp, sizeof(*udp));
		*udp_len = ulen;
		return AF_INET;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return 0;
		if (ip->version != 6 || ip->nexthdr != IPPROTO_UDP)
			return 0;
		__u32 ulen = bpf_ntohs(udp->len);
		if (ulen < sizeof(*udp) || bpf_ntohs(ip->payload_len) != ulen ||
		    (void *)udp + ulen > end)
			return 0;
		if (udp->check == 0) // mandatory over IPv6 (RFC 8200 §8.1)
			return 0;
		__builtin_memcpy(&h->eth, eth, sizeof(*eth));
		__builtin_memcpy(&h->v6, ip, sizeof(*ip));
		__builtin_memcpy(&h->udp, udp, sizeof(*udp));
		*udp_len = ulen;
		return AF_INET6;
	}
	return 0;
}

static __always_inline void src_dst(struct headers *h, int family, __u8 src[16], __u8 dst[16])
{
	if (family == AF_INET) {
		__builtin_memcpy(src, &h->v4.saddr, 4);
		__builtin_memcpy(dst, &h->v4.daddr, 4);
	} else {
		__builtin_memcpy(src, &h->v6.saddr, 16);
		__builtin_memcpy(dst, &h->v6.daddr, 16);
	}
}

static __always_inline int is_relayed(const __u8 ip[16], __be16 port, int family)
{
	struct relayed_key k = {};
	__builtin_memcpy(k.ip, ip, 16);
	k.port = port;
	k.family = family == AF_INET ? 4 : 6;
	return bpf_map_lookup_elem(&relayed, &k) != 0;
}

// bpf_fib_lookup for a datagram from `src` to `dst` of `ip_len` bytes (network header on). Fills the
// MACs and returns the egress ifindex, or 0 when the kernel would not forward it this way.
static __always_inline __u32 next_hop(struct xdp_md *ctx, int family, const __u8 src[16],
				      const __u8 dst[16], __u32 ip_len, struct headers *h)
{
	struct bpf_fib_lookup fib = {};
	fib.family = family;
	fib.l4_protocol = IPPROTO_UDP;
	fib.tot_len = ip_len;
	fib.ifindex = ctx->ingress_ifindex;
	if (family == AF_INET) {
		__builtin_memcpy(&fib.ipv4_src, src, 4);
		__builtin_memcpy(&fib.ipv4_dst, dst, 4);
	} else {
		__builtin_memcpy(fib.ipv6_src, src, 16);
		__builtin_memcpy(fib.ipv6_dst, dst, 16);
	}
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	__builtin_memcpy(h->eth.h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(h->eth.h_source, fib.smac, ETH_ALEN);
	return fib.ifindex;
}

// The UDP checksum change for new addresses and ports and a new length (pseudo header and header).
static __always_inline __u64 readdress(__u64 acc, struct headers *h, int family, const __u8 src[16],
				       const __u8 dst[16], __be16 sport, __be16 dport, __be16 len)
{
	int words = family == AF_INET ? 2 : 8;
	if (family == AF_INET) {
		acc = sub_words(acc, &h->v4.saddr, 2);
		acc = sub_words(acc, &h->v4.daddr, 2);
	} else {
		acc = sub_words(acc, &h->v6.saddr, 8);
		acc = sub_words(acc, &h->v6.daddr, 8);
	}
	acc = add_words(acc, src, words);
	acc = add_words(acc, dst, words);
	// Ports, and the length twice (pseudo header and UDP header).
	acc = sub_words(acc, &h->udp.source, 1);
	acc = sub_words(acc, &h->udp.dest, 1);
	acc = sub_words(acc, &h->udp.len, 1);
	acc = sub_words(acc, &h->udp.len, 1);
	acc = add_words(acc, &sport, 1);
	acc = add_words(acc, &dport, 1);
	acc = add_words(acc, &len, 1);
	acc = add_words(acc, &len, 1);
	return acc;
}

// Writes the new IP and UDP headers into `h`.
static __always_inline void rewrite(struct headers *h, int family, const __u8 src[16],
				    const __u8 dst[16], __be16 sport, __be16 dport, __u32 udp_len)
{
	if (family == AF_INET) {
		__builtin_memcpy(&h->v4.saddr, src, 4);
		__builtin_memcpy(&h->v4.daddr, dst, 4);
		h->v4.tot_len = bpf_htons(sizeof(struct iphdr) + udp_len);
		h->v4.ttl = TTL;
		h->v4.check = ipv4_checksum(&h->v4);
	} else {
		__builtin_memcpy(&h->v6.saddr, src, 16);
		__builtin_memcpy(&h->v6.daddr, dst, 16);
		h->v6.payload_len = bpf_htons(udp_len);
		h->v6.hop_limit = TTL;
	}
	h->udp.source = sport;
	h->udp.dest = dport;
	h->udp.len = bpf_htons(udp_len);
}

// Copies `h` to the start of the (adjusted) frame and trims the tail to `frame_len`.
static __always_inline int emit(struct xdp_md *ctx, struct headers *h, int family, __u32 frame_len)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (family == AF_INET) {
		if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) > end)
			return -1;
		__builtin_memcpy(data, &h->eth, sizeof(struct ethhdr));
		__builtin_memcpy(data + sizeof(struct ethhdr), &h->v4, sizeof(struct iphdr));
		__builtin_memcpy(data + sizeof(struct ethhdr) + sizeof(struct iphdr), &h->udp,
				 sizeof(struct udphdr));
	} else {
		if (data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct udphdr) > end)
			return -1;
		__builtin_memcpy(data, &h->eth, sizeof(struct ethhdr));
		__builtin_memcpy(data + sizeof(struct ethhdr), &h->v6, sizeof(struct ipv6hdr));
		__builtin_memcpy(data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr), &h->udp,
				 sizeof(struct udphdr));
	}
	__u32 have = (__u32)(end - data);
	if (have > frame_len && bpf_xdp_adjust_tail(ctx, (int)frame_len - (int)have))
		return -1;
	return 0;
}

static __always_inline int send(struct xdp_md *ctx, __u32 ifindex)
{
	if (ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(ifindex, 0);
}

static __always_inline int to_peer_path(struct xdp_md *ctx, struct headers *h, int family,
					struct c2p_val *v, __u32 data_len, __u64 pad_acc)
{
	__u32 hlen = sizeof(struct ethhdr) + sizeof(struct udphdr) +
		     (family == AF_INET ? sizeof(struct iphdr) : sizeof(struct ipv6hdr));
	__u32 new_udp = sizeof(struct udphdr) + data_len;
	if (is_relayed(v->peer_ip, v->peer_port, family))
		return count(PATH_PASS_RELAY_TO_RELAY, XDP_PASS);
	__u32 ifindex = next_hop(ctx, family, v->relayed_ip, v->peer_ip,
				 (family == AF_INET ? sizeof(struct iphdr) : sizeof(struct ipv6hdr)) +
					 new_udp,
				 h);
	if (!ifindex)
		return count(PATH_PASS_FIB, XDP_PASS);

	if (family == AF_INET && h->udp.check == 0) {
		// No checksum on the way in (IPv4 allows it): none on the way out either.
	} else {
		__u64 acc = (__u16)~h->udp.check;
		acc = readdress(acc, h, family, v->relayed_ip, v->peer_ip, v->relayed_port, v->peer_port,
				bpf_htons(new_udp));
		acc += pad_acc; // minus the ChannelData header and padding (prepared by the caller)
		h->udp.check = finish_udp(acc);
	}
	rewrite(h, family, v->relayed_ip, v->peer_ip, v->relayed_port, v->peer_port, new_udp);

	struct meter *m = bpf_map_lookup_elem(&meters, &v->slot);
	if (bpf_xdp_adjust_head(ctx, CHANNEL_HEADER))
		return count(PATH_ABORTED, XDP_ABORTED);
	if (emit(ctx, h, family, hlen + data_len))
		return count(PATH_ABORTED, XDP_ABORTED);
	if (m) {
		m->to_peer_bytes += data_len;
		m->to_peer_packets += 1;
	}
	return count(PATH_XDP_TO_PEER, send(ctx, ifindex));
}

static __always_inline int to_client_path(struct xdp_md *ctx, struct headers *h, int family,
					  __u32 udp_len, struct p2c_val *v, const __u8 peer_ip[16])
{
	__u32 iplen = family == AF_INET ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	__u32 hlen = sizeof(struct ethhdr) + iplen + sizeof(struct udphdr);
	__u32 data_len = udp_len - sizeof(struct udphdr);
	__u32 new_udp = udp_len + CHANNEL_HEADER;
	if (new_udp > 0xffff)
		return count(PATH_PASS_FIB, XDP_PASS);
	if (is_relayed(peer_ip, h->udp.source, family))
		return count(PATH_PASS_RELAY_TO_RELAY, XDP_PASS);
	__u32 ifindex = next_hop(ctx, family, v->listener_ip, v->client_ip, iplen + new_udp, h);
	if (!ifindex)
		return count(PATH_PASS_FIB, XDP_PASS);

	__be16 cd[2] = {v->channel, bpf_htons(data_len)};
	if (family == AF_INET && h->udp.check == 0) {
		// No checksum on the way in (IPv4 allows it): none on the way out either.
	} else {
		__u64 acc = (__u16)~h->udp.check;
		acc = readdress(acc, h, family, v->listener_ip, v->client_ip, v->listener_port,
				v->client_port, bpf_htons(new_udp));
		acc = add_words(acc, cd, 2);
		h->udp.check = finish_udp(acc);
	}
	rewrite(h, family, v->listener_ip, v->client_ip, v->listener_port, v->client_port, new_udp);

	struct meter *m = bpf_map_lookup_elem(&meters, &v->slot);
	if (bpf_xdp_adjust_head(ctx, -CHANNEL_HEADER))
		return count(PATH_ABORTED, XDP_ABORTED);
	if (emit(ctx, h, family, hlen + CHANNEL_HEADER + data_len))
		return count(PATH_ABORTED, XDP_ABORTED);
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + hlen + CHANNEL_HEADER > end)
		return count(PATH_ABORTED, XDP_ABORTED);
	__builtin_memcpy(data + hlen, cd, CHANNEL_HEADER);
	if (m) {
		m->to_client_bytes += data_len;
		m->to_client_packets += 1;
	}
	return count(PATH_XDP_TO_CLIENT, send(ctx, ifindex));
}

// One parsed UDP datagram of `family` (a constant after inlining).
static __always_inline int handle(struct xdp_md *ctx, struct headers *hp, int family, __u32 udp_len)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct headers h = *hp;
	__u32 iplen = family == AF_INET ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	__u8 src[16] = {}, dst[16] = {};
	src_dst(&h, family, src, dst);
	__u8 *payload = data + sizeof(struct ethhdr) + iplen + sizeof(struct udphdr);
	__u32 plen = udp_len - sizeof(struct udphdr);

	// Client -> peer: ChannelData (RFC 8656 §12.4) with 0-3 bytes of padding after the payload.
	if (plen >= CHANNEL_HEADER && payload + CHANNEL_HEADER <= (__u8 *)end &&
	    payload[0] >= 0x40 && payload[0] <= 0x4f) {
		__u32 data_len = ((__u32)payload[2] << 8) | payload[3];
		__u32 pad = plen - CHANNEL_HEADER - data_len;
		if (data_len + CHANNEL_HEADER <= plen && pad <= 3) {
			struct c2p_key k = {};
			__builtin_memcpy(k.client_ip, src, 16);
			__builtin_memcpy(k.listener_ip, dst, 16);
			k.client_port = h.udp.source;
			k.listener_port = h.udp.dest;
			__builtin_memcpy(&k.channel, payload, 2);
			k.family = family == AF_INET ? 4 : 6;
			struct c2p_val *v = bpf_map_lookup_elem(&to_peer, &k);
			if (v) {
				// The checksum loses the 4 header bytes and the padding. Payload offsets
				// keep their parity (the header is 4 bytes), so padding byte i sits at
				// UDP payload offset 4 + data_len + i.
				__u64 acc = sub_words(0, payload, 2);
				__u32 at = data_len & 0xffff;
				__u32 pad_at = sizeof(struct ethhdr) + iplen + sizeof(struct udphdr) +
					       CHANNEL_HEADER + at;
				for (int i = 0; i < 3; i++) {
					if ((__u32)i >= pad)
						break;
					__u8 b = 0;
					if (bpf_xdp_load_bytes(ctx, pad_at + i, &b, 1))
						return count(PATH_PASS_NO_ENTRY, XDP_PASS);
					__u16 w = 0;
					__u8 *wb = (__u8 *)&w;
					if ((at + i) & 1)
						wb[1] = b;
					else
						wb[0] = b;
					acc = sub_words(acc, &w, 1);
				}
				struct c2p_val val = *v;
				return to_peer_path(ctx, &h, family, &val, data_len, acc);
			}
		}
	}

	// Peer -> client: any UDP datagram from a peer with a channel bound, to its relayed address.
	struct p2c_key k = {};
	__builtin_memcpy(k.relayed_ip, dst, 16);
	__builtin_memcpy(k.peer_ip, src, 16);
	k.relayed_port = h.udp.dest;
	k.peer_port = h.udp.source;
	k.family = family == AF_INET ? 4 : 6;
	struct p2c_val *v = bpf_map_lookup_elem(&to_client, &k);
	if (v) {
		struct p2c_val val = *v;
		return to_client_path(ctx, &h, family, udp_len, &val, src);
	}
	return count(PATH_PASS_NO_ENTRY, XDP_PASS);
}

SEC("xdp")
int turnpike_xdp(struct xdp_md *ctx)
{
	struct headers h = {};
	__u32 udp_len = 0;
	int family = parse((void *)(long)ctx->data, (void *)(long)ctx->data_end, &h, &udp_len);
	if (family == AF_INET)
		return handle(ctx, &h, AF_INET, udp_len);
	if (family == AF_INET6)
		return handle(ctx, &h, AF_INET6, udp_len);
	return count(PATH_PASS_NOT_IP_UDP, XDP_PASS);
}

// Does nothing: attached to the far ends of veth pairs in tests, so that frames XDP sends into a veth
// are not dropped (a veth accepts XDP_TX/redirected frames only when its peer runs XDP or GRO).
SEC("xdp")
int turnpike_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

// The kernel wants a GPL-compatible declaration for bpf_fib_lookup and bpf_redirect's helpers.
char LICENSE[] SEC("license") = "GPL";
