#!/usr/bin/env python3
"""An independent HBONE server (python-h2 + ssl) for interop tests.

Listens on 127.0.0.1 (port printed as the first JSON line), requires a
client certificate chaining to --ca whose SPIFFE trust domain is
--trust-domain, answers each CONNECT with 200 and echoes the stream
(END_STREAM answered with END_STREAM). Prints one JSON line per tunnel
and serves --connections connections.
"""
import argparse
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def uri_sans(cert):
    return [v for (k, v) in cert.get("subjectAltName", ()) if k == "URI"]


def serve(sock, trust_domain, sni):
    ids = uri_sans(sock.getpeercert())
    if len(ids) != 1 or not ids[0].startswith(f"spiffe://{trust_domain}/"):
        print(json.dumps({"refused": ids}), flush=True)
        sock.close()
        return
    peer = ids[0]
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
        client_side=False,
        # python-h2 4.1 rejects a CONNECT without :path/:scheme (which RFC
        # 9113 8.5 requires); we check the request shape ourselves below.
        validate_inbound_headers=False,
    ))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    pending = {}  # stream id -> bytearray waiting for window
    closing = set()
    while True:
        data = sock.recv(1 << 16)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                h = {k.decode(): v.decode() for k, v in ev.headers}
                ok = h.get(":method") == "CONNECT" and ":path" not in h and ":scheme" not in h
                print(json.dumps({
                    "peer": peer,
                    "alpn": sock.selected_alpn_protocol(),
                    "sni": sni,
                    "authority": h.get(":authority"),
                    "forwarded": h.get("forwarded"),
                    "baggage": h.get("baggage"),
                    "traceparent": h.get("traceparent"),
                }), flush=True)
                conn.send_headers(ev.stream_id, [(":status", "200" if ok else "400")], end_stream=not ok)
                pending[ev.stream_id] = bytearray()
            elif isinstance(ev, h2.events.DataReceived):
                pending.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                closing.add(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                sock.close()
                return
        # Echo what fits in the peer's windows.
        for sid in list(pending):
            buf = pending[sid]
            while buf:
                n = min(len(buf), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if n <= 0:
                    break
                conn.send_data(sid, bytes(buf[:n]))
                del buf[:n]
            if not buf and sid in closing:
                conn.end_stream(sid)
                closing.discard(sid)
                del pending[sid]
        sock.sendall(conn.data_to_send())
    sock.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--trust-domain", required=True)
    ap.add_argument("--connections", type=int, default=1)
    a = ap.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(a.ca)
    ctx.load_cert_chain(a.cert, a.key)
    ctx.set_alpn_protocols(["h2"])
    seen_sni = {}

    def on_sni(sslobj, name, _ctx):
        seen_sni["name"] = name

    ctx.sni_callback = on_sni
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    ls.settimeout(60)
    print(json.dumps({"port": ls.getsockname()[1]}), flush=True)
    for _ in range(a.connections):
        raw, _ = ls.accept()
        raw.settimeout(60)
        seen_sni.clear()
        try:
            sock = ctx.wrap_socket(raw, server_side=True)
        except ssl.SSLError as e:
            print(json.dumps({"handshake_error": str(e)}), flush=True)
            continue
        serve(sock, a.trust_domain, seen_sni.get("name"))


if __name__ == "__main__":
    sys.exit(main())
