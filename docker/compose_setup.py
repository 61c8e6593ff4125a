"""One-shot setup for docker/compose.yaml: development keys and certificates, then the sample schema.

Runs in the pgproxy image as the `init` service before the proxy starts. Keys are created only when
missing, so restarting the stack keeps tokens, certificates and the audit log's signing key valid;
`docker compose down -v` starts over. The sample schema is recreated on every run (it DROPs schema
``shop``): point it only at the throwaway compose database, never at one holding real data.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from psycopg.conninfo import make_conninfo

from pgproxy.audit.keys import generate_key
from pgproxy.demo_data import seed_sample_schema
from pgproxy.identity import generate_dev_keys
from pgproxy.tlsutil import generate_dev_ca_and_cert

KEYS_DIR = Path("/etc/pgproxy/keys")
# Names the proxy, the JWKS server and host-side clients use: the compose services and localhost.
TLS_HOSTNAMES = ("pgproxy", "jwks", "localhost", "127.0.0.1", "::1")


def ensure_keys(keys_dir: Path) -> list[Path]:
    """Create whatever is missing under ``keys_dir``; returns the files created."""
    created: list[Path] = []
    identity = keys_dir / "identity"
    if not (identity / "jwks.json").exists():
        keys = generate_dev_keys(identity)
        created += [keys.private_key_file, keys.jwks_file]
    tls = keys_dir / "tls"
    if not (tls / "server.key").exists():
        generated = generate_dev_ca_and_cert(tls, hostnames=TLS_HOSTNAMES)
        generated.ca_key_file.unlink()  # no further certificates are issued; don't keep the CA key
        created += [generated.ca_file, generated.cert_file, generated.key_file]
    audit_key = keys_dir / "audit" / "audit-signing.key"
    if not audit_key.exists():
        pub, _ = generate_key(audit_key)
        created += [audit_key, pub]
    masking_key = keys_dir / "masking.key"
    if not masking_key.exists():
        fd = os.open(masking_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        created.append(masking_key)
    return created


def main() -> None:
    for path in ensure_keys(KEYS_DIR):
        print(f"created {path}", file=sys.stderr)
    password = os.environ["POSTGRES_PASSWORD"]
    dsn = make_conninfo(host="postgres", port=5432, user="postgres", dbname="postgres", password=password)
    seed_sample_schema(dsn, password)
    print("sample schema shop loaded; roles agent_reader, agent_writer, dba", file=sys.stderr)


if __name__ == "__main__":
    main()
