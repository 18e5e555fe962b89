#!/usr/bin/env python3
"""Interop check: aioice's TURN client (a client nobody here wrote) against a running turnpike.

Started by tests/interop.rs, which starts turnpike itself; this script starts nothing but its own
UDP sockets. It allocates over UDP with aioice.turn.create_turn_endpoint, relays datagrams from the
client to a plain asyncio UDP peer on 127.0.0.1 and back, checks each byte and address, and closes
the TURN transport (Refresh with LIFETIME 0, which deletes the allocation).

Usage: interop_aioice.py HOST PORT USER PASSWORD RELAY_PORT_MIN RELAY_PORT_MAX
Exit status 0 on success; 1 with a message naming the failed check otherwise.
"""

import asyncio
import logging
import sys

from aioice.turn import create_turn_endpoint

TIMEOUT = 10.0


class Failure(Exception):
    pass


def check(cond, message):
    if not cond:
        raise Failure(message)


class Inbox(asyncio.DatagramProtocol):
    """Collects (data, addr) pairs; remembers errors and connection loss."""

    def __init__(self):
        self.queue = asyncio.Queue()
        self.errors = []
        self.lost = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr):
        self.queue.put_nowait((bytes(data), (addr[0], addr[1])))

    def error_received(self, exc):
        self.errors.append(exc)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.created:.3f} {record.levelname} {record.getMessage()}")


def payloads():
    """Distinct payloads of several sizes, including ones whose first bytes look like STUN
    (0x00/0x01) or ChannelData (0x40), so nothing may be parsed on the way."""
    out = [b"\x00", b"\x01\x01\x00\x00" + b"\x21\x12\xa4\x42" + bytes(12), b"\x40\x00\x00\x04abcd"]
    for i, size in enumerate([1, 2, 3, 20, 99, 160, 512, 1000, 1200]):
        out.append(bytes((i * 31 + k) % 256 for k in range(size)))
    out.append(b"hello through turnpike")
    return out


async def receive_all(inbox, count, what, sender):
    got = []
    try:
        for _ in range(count):
            got.append(await asyncio.wait_for(inbox.queue.get(), TIMEOUT))
    except asyncio.TimeoutError:
        raise Failure(
            f"{what}: received {len(got)} of {count} datagrams within {TIMEOUT} s"
            f" (sender's errors: {sender.errors or 'none'})"
        )
    return got


RECORDS = None


async def main(host, port, user, password, relay_min, relay_max):
    global RECORDS
    records = RECORDS = Records()
    turn_logger = logging.getLogger("aioice.turn")
    turn_logger.setLevel(logging.DEBUG)
    turn_logger.addHandler(records)

    loop = asyncio.get_running_loop()
    try:
        transport, client = await asyncio.wait_for(
            create_turn_endpoint(Inbox, (host, port), user, password), TIMEOUT
        )
    except asyncio.TimeoutError:
        raise Failure(f"allocation: no answer from {host}:{port} within {TIMEOUT} s")
    relayed = transport.get_extra_info("sockname")
    mapped = transport.get_extra_info("related_address")
    print(f"allocated: relayed {relayed}, mapped {mapped}")
    check(relayed is not None, "allocation: no relayed address")
    relayed = (relayed[0], relayed[1])
    check(relayed[0] == "127.0.0.1", f"relayed address {relayed}: expected 127.0.0.1")
    check(
        relay_min <= relayed[1] <= relay_max,
        f"relayed address {relayed}: port outside the configured range {relay_min}-{relay_max}",
    )
    check(mapped is not None and mapped[0] == "127.0.0.1", f"mapped address {mapped}: expected 127.0.0.1")

    peer_transport, peer = await loop.create_datagram_endpoint(Inbox, local_addr=("127.0.0.2", 0))
    try:
        peer_addr = peer_transport.get_extra_info("sockname")[:2]
        sent = payloads()

        # Client -> peer: the first sendto binds a channel, the rest go as ChannelData.
        for p in sent:
            transport.sendto(p, peer_addr)
        got = await receive_all(peer, len(sent), "client -> peer", client)
        for data, addr in got:
            check(addr == relayed, f"client -> peer: datagram from {addr}, expected the relayed address {relayed}")
        check(
            sorted(d for d, _ in got) == sorted(sent),
            f"client -> peer: payloads differ:\n  sent {sent}\n  got  {[d for d, _ in got]}",
        )
        check(not client.errors, f"client -> peer: send errors {client.errors}")
        print(f"client -> peer: {len(got)} datagrams, byte-exact, from {relayed}")

        # Peer -> client, to the relayed address; aioice hands it over with the peer's address.
        back = [b"back:" + p for p in sent]
        for p in back:
            peer_transport.sendto(p, relayed)
        got = await receive_all(client, len(back), "peer -> client", peer)
        for data, addr in got:
            check(addr == peer_addr, f"peer -> client: datagram attributed to {addr}, expected the peer {peer_addr}")
        check(
            sorted(d for d, _ in got) == sorted(back),
            f"peer -> client: payloads differ:\n  sent {back}\n  got  {[d for d, _ in got]}",
        )
        print(f"peer -> client: {len(got)} datagrams, byte-exact, from {peer_addr}")
    finally:
        peer_transport.close()

    # Closing deletes the allocation (Refresh, LIFETIME 0), then the client sees connection_lost.
    transport.close()
    try:
        await asyncio.wait_for(asyncio.shield(client.lost), TIMEOUT)
    except asyncio.TimeoutError:
        raise Failure(f"close: the allocation was not deleted within {TIMEOUT} s")
    failed = [m for m in records.messages if "deletion failed" in m]
    check(not failed, f"close: {failed}")
    check(
        any("allocation deleted" in m for m in records.messages),
        f"close: aioice did not report the allocation deleted; its log: {records.messages}",
    )
    print("closed: allocation deleted")


def show_log():
    """aioice's own log of the TURN exchange, for a failure's evidence."""
    if RECORDS is not None:
        print("aioice.turn log:", file=sys.stderr)
        for m in RECORDS.messages:
            print(f"  {m}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(f"usage: {sys.argv[0]} HOST PORT USER PASSWORD RELAY_PORT_MIN RELAY_PORT_MAX")
    host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    relay_min, relay_max = int(sys.argv[5]), int(sys.argv[6])
    try:
        asyncio.run(asyncio.wait_for(main(host, port, user, password, relay_min, relay_max), 4 * TIMEOUT))
    except Failure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        show_log()
        sys.exit(1)
    except asyncio.TimeoutError:
        print(f"FAILED: timed out after {4 * TIMEOUT} s", file=sys.stderr)
        show_log()
        sys.exit(1)
    except Exception as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        show_log()
        sys.exit(1)
    print("ok")
