#!/usr/bin/env bash
# Certificates for trying (and testing) gemmq over TLS, and the RabbitMQ settings that use them:
#
#   scripts/tls-certs.sh DIR
#
# writes into DIR (created if missing):
#   ca.pem, ca.key                  a CA: give ca.pem to gemmq as GEMMQ_TLS_CA_FILE
#   server.pem, server.key          the broker's certificate, signed by it, for DNS:localhost and
#                                   IP:127.0.0.1 (add names: TLS_SERVER_NAMES="DNS:broker.lan,IP:10.0.0.5")
#   client.pem, client.key          a client certificate signed by the CA (GEMMQ_TLS_CERT_FILE/KEY_FILE)
#   wrong-ca.pem                    an unrelated CA: trusting it instead must fail
#   wrong-client.pem, wrong-client.key  a client certificate the broker must refuse
#   rabbitmq-tls.conf               the listener settings, with the certificates in /etc/rabbitmq/certs
#
# For tests only: the keys are unencrypted and world-readable (the broker's user in a container
# must read them from a mounted directory); keep real keys 600 and owned by their user.
set -euo pipefail
dir="${1:?usage: scripts/tls-certs.sh DIR}"
names="DNS:localhost,IP:127.0.0.1${TLS_SERVER_NAMES:+,$TLS_SERVER_NAMES}"
mkdir -p "$dir"
# The broker's user in a container reads them through a mount (mktemp -d makes a 700 directory).
chmod 755 "$dir"
cd "$dir"

ca() { # name subject
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$2" \
    -keyout "$1.key" -out "$1.pem" 2>/dev/null
}
signed() { # name subject ca extensions
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3.key" -CAcreateserial -days 30 \
    -extfile <(printf '%s\n' "$4") -out "$1.pem" 2>/dev/null
  rm -f "$1.csr"
}

ca ca "gemmq test CA"
ca wrong-ca "some other CA"
signed server localhost ca "subjectAltName=$names
extendedKeyUsage=serverAuth"
signed client gemmq-client ca "extendedKeyUsage=clientAuth"
signed wrong-client gemmq-client wrong-ca "extendedKeyUsage=clientAuth"
rm -f ./*.srl
chmod 644 ./*.pem ./*.key

cat > rabbitmq-tls.conf <<'CONF'
# TLS listeners: AMQP on 5671, the management API over https on 15671.
listeners.ssl.default = 5671
ssl_options.cacertfile = /etc/rabbitmq/certs/ca.pem
ssl_options.certfile = /etc/rabbitmq/certs/server.pem
ssl_options.keyfile = /etc/rabbitmq/certs/server.key
# A client certificate is checked when one is presented, and not required (true requires one).
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
management.ssl.port = 15671
management.ssl.cacertfile = /etc/rabbitmq/certs/ca.pem
management.ssl.certfile = /etc/rabbitmq/certs/server.pem
management.ssl.keyfile = /etc/rabbitmq/certs/server.key
CONF
echo "$dir"
