# Certificates as docs/operations.md makes them ("TLS on the control plane"), for the shell tests
# (sourced, not run): EC P-256, a CA per name, node certificates for client and server use.
#
#   source tests/tools/tls_certs.sh DIR
#   tls_make_ca NAME           -> DIR/NAME.pem, DIR/NAME.key
#   tls_make_cert CA NAME      -> DIR/NAME.pem, DIR/NAME.key, signed by DIR/CA.pem
# Each returns non-zero when openssl fails (its messages are dropped: the caller says what failed).
TLS_DIR=$1
mkdir -p "$TLS_DIR"
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' \
  >"$TLS_DIR/node.ext"
tls_make_ca() {
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days 3650 \
    -subj "/O=moe/CN=$1" -keyout "$TLS_DIR/$1.key" -out "$TLS_DIR/$1.pem" 2>/dev/null
}
tls_make_cert() {
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj "/O=moe/CN=$2" \
    -keyout "$TLS_DIR/$2.key" -out "$TLS_DIR/$2.csr" 2>/dev/null &&
    openssl x509 -req -in "$TLS_DIR/$2.csr" -CA "$TLS_DIR/$1.pem" -CAkey "$TLS_DIR/$1.key" \
      -CAcreateserial -sha256 -days 30 -extfile "$TLS_DIR/node.ext" -out "$TLS_DIR/$2.pem" 2>/dev/null
}
