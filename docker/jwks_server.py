"""Development JWKS endpoint for docker/compose.yaml: serves one JWKS file over HTTPS, nothing else.

It stands in for an identity provider's ``jwks_uri`` so that the proxy fetches its keys from
``identity.jwks_url`` over verified TLS, as in production. The file is read on every request, so a key
rotated on disk is served at once. Standard library only: it runs in the pgproxy image.

Usage: python jwks_server.py JWKS_FILE CERT_FILE KEY_FILE PORT
"""

from __future__ import annotations

import signal
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

JWKS_PATH = "/.well-known/jwks.json"


def make_handler(jwks_file: Path) -> type[BaseHTTPRequestHandler]:
    class JWKSHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != JWKS_PATH:
                self.send_error(404)
                return
            try:
                body = jwks_file.read_bytes()
            except OSError:
                self.send_error(503, "JWKS file not readable")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=300")
            self.end_headers()
            self.wfile.write(body)

    return JWKSHandler


def main(argv: list[str]) -> None:
    jwks_file, cert_file, key_file, port = Path(argv[0]), argv[1], argv[2], int(argv[3])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    server = ThreadingHTTPServer(("0.0.0.0", port), make_handler(jwks_file))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    # PID 1 in a container gets no default SIGTERM handling: exit cleanly on `docker compose stop`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"serving {jwks_file} at https://0.0.0.0:{port}{JWKS_PATH}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
