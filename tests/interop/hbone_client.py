#!/usr/bin/env python3
"""An independent HBONE client (python-h2 + ssl) for interop tests.

Opens mTLS (TLS 1.3, ALPN h2, no SNI) to an HBONE server, checks the
server's SPIFFE identity, sends one CONNECT, pushes a payload with
END_STREAM, and expects it echoed back. Prints one JSON line.
"""
import argparse
import hashlib
import json
import os
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def uri_sans(cert):
    return [v for (k, v) in cert.get("subjectAltName", ()) if k == "URI"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True, help="host:port of the HBONE server")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--expect-server-id", required=True)
    ap.add_argument("--authority", required=True)
    ap.add_argument("--forwarded-for", default="10.9.8.7:4321")
    ap.add_argument("--payload", type=int, default=1 << 20)
    a = ap.parse_args()

    host, port = a.addr.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is checked on the SPIFFE URI SAN below
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(a.ca)
    ctx.load_cert_chain(a.cert, a.key)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, int(port)), timeout=30)
    sock = ctx.wrap_socket(raw, server_hostname=None)  # no SNI, as ztunnel
    if sock.selected_alpn_protocol() != "h2":
        sys.exit("server did not select ALPN h2")
    server_ids = uri_sans(sock.getpeercert())
    if server_ids != [a.expect_server_id]:
        sys.exit(f"server identity {server_ids}, want {a.expect_server_id}")

    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
        client_side=True,
        # python-h2 4.1 insists on :path/:scheme even for a plain CONNECT
        # (RFC 9113 8.5 forbids them), so its outbound request validation is off.
        validate_outbound_headers=False,
    ))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [
        (":method", "CONNECT"),
        (":authority", a.authority),
        ("forwarded", f'for="{a.forwarded_for}"'),
    ])
    sock.sendall(conn.data_to_send())

    payload = os.urandom(a.payload)
    sent = 0
    status = None
    received = bytearray()
    ended = False
    while not ended:
        # Push as much as flow control allows once the tunnel is up.
        if status == "200" and sent < len(payload):
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            while window > 0 and sent < len(payload):
                chunk = payload[sent:sent + window]
                sent += len(chunk)
                conn.send_data(sid, chunk, end_stream=sent == len(payload))
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            sock.sendall(conn.data_to_send())
        data = sock.recv(1 << 16)
        if not data:
            sys.exit("connection closed early")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[b":status"].decode()
                if status != "200":
                    print(json.dumps({"status": status}))
                    return
                if len(payload) == 0:
                    conn.end_stream(sid)
            elif isinstance(ev, h2.events.DataReceived):
                received += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
            elif isinstance(ev, h2.events.StreamReset):
                sys.exit(f"stream reset: {ev.error_code}")
        sock.sendall(conn.data_to_send())
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    print(json.dumps({
        "status": status,
        "server_id": server_ids[0],
        "sent": sent,
        "received": len(received),
        "echo_ok": bytes(received) == payload,
        "sha256": hashlib.sha256(payload).hexdigest(),
    }))


if __name__ == "__main__":
    main()
