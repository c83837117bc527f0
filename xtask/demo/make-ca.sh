#!/usr/bin/env bash
# The demo's stand-in for the public web PKI: a CA that signs httpbin.org's
# server certificate. The waypoint trusts it through the DestinationRule's
# `caCertificates`; the mesh CA (`shunt ca init`) is a different one.
# Usage: make-ca.sh DIR  → DIR/{ca.pem,ca.key,httpbin.org.pem,httpbin.org.key}
set -euo pipefail
dir=$1
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout ca.key -out ca.pem -days 7 -subj "/CN=shunt demo public CA" \
  -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout httpbin.org.key -out httpbin.org.csr -subj "/CN=httpbin.org" 2>/dev/null
cat > httpbin.org.ext <<'EXT'
subjectAltName = DNS:httpbin.org
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
EXT
openssl x509 -req -in httpbin.org.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -days 7 -extfile httpbin.org.ext -out httpbin.org.pem 2>/dev/null
rm -f httpbin.org.csr httpbin.org.ext ca.srl
