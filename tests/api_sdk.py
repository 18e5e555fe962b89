"""The official Azure Communication Services network-traversal SDK against turnpike's token API, then
TURN with the credentials it returned (aioice's TURN client), then a metrics scrape parsed with
prometheus_client's parsers. Run by tests/api.rs; prints one JSON object with what it saw.

usage: api_sdk.py ENDPOINT ACCESS_KEY [CA_BUNDLE]  (TURNPIKE_SDK_NO_METRICS=1: no scrape)
"""
import asyncio
import json
import os
import socket
import ssl
import sys
import urllib.request

from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import HttpResponseError
from azure.communication.networktraversal import CommunicationRelayClient, RouteType
import aioice.turn
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_parse
from prometheus_client.parser import text_string_to_metric_families as prometheus_parse


class User:
    """What get_relay_configuration needs of a CommunicationUserIdentifier: properties['id']."""

    def __init__(self, id):
        self.properties = {"id": id}


def turn_roundtrip(url, username, password):
    """Allocate on the TURN server of `url` with the credentials, relay one datagram each way."""
    hostport = url.split(":", 1)[1].split("?", 1)[0]
    host, port = hostport.rsplit(":", 1)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Not the relay IP 127.0.0.1: its relay port range is closed to peers, and an ephemeral port may
    # fall inside it.
    peer.bind(("127.0.0.2", 0))
    peer.settimeout(5)

    async def run():
        received = asyncio.get_running_loop().create_future()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                if not received.done():
                    received.set_result((data, addr))

        transport, _ = await aioice.turn.create_turn_endpoint(
            Proto, server_addr=(host, int(port)), username=username, password=password
        )
        relayed = transport.get_extra_info("related_address") or transport.get_extra_info("sockname")
        # aioice binds a channel and sends ChannelData; the peer sees the relayed address.
        transport.sendto(b"hello from the sdk client", peer.getsockname())
        data, from_addr = await asyncio.get_running_loop().run_in_executor(None, peer.recvfrom, 2048)
        peer.sendto(b"hello back", from_addr)
        back, _ = await asyncio.wait_for(received, 5)
        transport.close()
        await asyncio.sleep(0.2)
        return {"peer_got": data.decode(), "relayed": list(from_addr), "client_got": back.decode()}

    return asyncio.run(run())


def main():
    endpoint, key = sys.argv[1], sys.argv[2]
    ca = sys.argv[3] if len(sys.argv) > 3 else None
    kwargs = {"connection_verify": ca} if ca else {}
    out = {}

    client = CommunicationRelayClient(endpoint, AzureKeyCredential(key), **kwargs)
    config = client.get_relay_configuration(user=User("8:acs:sdk-user"), ttl=3600)
    out["expires_on"] = config.expires_on.isoformat()
    out["ice_servers"] = [
        {"urls": s.urls, "username": s.username, "route_type": s.route_type} for s in config.ice_servers
    ]
    nearest = client.get_relay_configuration(route_type=RouteType.NEAREST)
    out["nearest_route_types"] = [s.route_type for s in nearest.ice_servers]

    # A wrong key is refused with 401.
    bad = CommunicationRelayClient(endpoint, AzureKeyCredential("d3Jvbmcta2V5LXdyb25nLWtleQ=="), **kwargs)
    try:
        bad.get_relay_configuration()
        out["bad_key_status"] = 200
    except HttpResponseError as e:
        out["bad_key_status"] = e.status_code

    server = config.ice_servers[0]
    turn_url = next(u for u in server.urls if u.startswith("turn:"))
    out["turn"] = turn_roundtrip(turn_url, server.username, server.credential)

    if os.environ.get("TURNPIKE_SDK_NO_METRICS"):
        # A token API without a relay (`turnpike api`) has no relay counters to scrape.
        print(json.dumps(out))
        return
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    text = urllib.request.urlopen(endpoint + "/metrics", context=ctx, timeout=5).read().decode()
    families = {f.name: f for f in openmetrics_parse(text)}
    list(prometheus_parse(text))  # the classic Prometheus text parser reads it too
    out["metric_families"] = sorted(families)
    out["relayed_bytes"] = {
        s.labels["direction"]: s.value for s in families["turnpike_relayed_bytes"].samples if s.name.endswith("_total")
    }
    out["allocations_created"] = next(
        s.value for s in families["turnpike_allocations_created"].samples if s.name.endswith("_total")
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
