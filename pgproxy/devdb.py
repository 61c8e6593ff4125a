"""Throwaway PostgreSQL servers for the demo, the tests and the benchmarks.

What for: ``TemporaryCluster`` runs ``initdb`` in a fresh temporary directory and starts a server on a
free loopback port with durability switched off (fsync, synchronous_commit, full_page_writes), then
stops it and deletes everything on close. ``start_database`` is the policy the tests and the demo use
to get *some* superuser connection: ``PGPROXY_TEST_DSN`` > a testcontainers container (only when a
Docker engine answers) > a local ``TemporaryCluster``.

Must never: touch a database it did not create (an external ``PGPROXY_TEST_DSN`` server is used, never
stopped or wiped); listen anywhere but 127.0.0.1; use a fixed port; run the server as root (when the
euid is 0 every server binary runs as the ``postgres`` system user via ``runuser``); hold data anyone
should keep — there is no durability and everything is deleted on stop.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from pgproxy.tlsutil import DevTLS, generate_dev_ca_and_cert

__all__ = [
    "AUTH_METHODS",
    "Database",
    "TemporaryCluster",
    "create_role",
    "find_postgres_bindir",
    "start_database",
]

#: pg_hba methods a TemporaryCluster can be configured with.
AUTH_METHODS: tuple[str, ...] = ("scram-sha-256", "md5", "password", "trust")

#: Environment variable naming an existing superuser connection (postgresql:// URL) to use instead.
TEST_DSN_ENV = "PGPROXY_TEST_DSN"
#: Environment variable naming the directory holding initdb/pg_ctl/postgres (optional).
BINDIR_ENV = "PGPROXY_PG_BINDIR"
#: User the server runs as when we are root.
SERVER_OS_USER = "postgres"

_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
_START_ATTEMPTS = 5
_INITDB_TIMEOUT_S = 180.0
_PG_CTL_TIMEOUT_S = 60
_CONF_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_PORT_CLASH_MARKERS = ("could not bind", "Address already in use", "could not create any TCP/IP sockets")


@dataclass
class Database:
    """Connection facts of a running server (superuser credentials included)."""

    host: str
    port: int
    superuser: str
    password: str
    database: str = "postgres"

    def dsn(
        self,
        *,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> str:
        """A ``postgresql://`` URL; defaults to the superuser and ``self.database``.

        ``params`` become the query string (e.g. ``{"sslmode": "verify-full", "sslrootcert": ...}``).
        """
        u = self.superuser if user is None else user
        pw = self.password if password is None else password
        db = self.database if database is None else database
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = quote(u, safe="")
        if pw:
            auth += ":" + quote(pw, safe="")
        url = f"postgresql://{auth}@{host}:{self.port}/{quote(db, safe='')}"
        if params:
            url += "?" + urlencode(dict(params))
        return url


# --------------------------------------------------------------------------------------------------
# Locating binaries and running them as the right OS user
# --------------------------------------------------------------------------------------------------


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (0,)


def find_postgres_bindir() -> Path:
    """Directory with ``initdb``, ``pg_ctl`` and ``postgres``.

    Order: ``$PGPROXY_PG_BINDIR``; the directory ``initdb`` on PATH resolves to; the newest
    ``/usr/lib/postgresql/*/bin``.
    """
    candidates: list[Path] = []
    env = os.environ.get(BINDIR_ENV)
    if env:
        candidates.append(Path(env))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        candidates.append(Path(found))
    for d in candidates:
        if all(os.access(d / exe, os.X_OK) and (d / exe).is_file() for exe in _SERVER_BINARIES):
            return d
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install the Debian package "
        f"'postgresql' or point ${BINDIR_ENV} at their directory"
    )


@dataclass(frozen=True)
class _OsUser:
    prefix: tuple[str, ...]  # command prefix (runuser ... --) or empty
    uid: int | None  # uid/gid to chown files to, None when running as ourselves
    gid: int | None


def _server_os_user() -> _OsUser:
    if os.geteuid() != 0:
        return _OsUser((), None, None)
    import pwd

    try:
        pw = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, but PostgreSQL refuses to run as root and the '{SERVER_OS_USER}' system "
            f"user does not exist; create it, e.g.: useradd --system --home-dir /var/lib/postgresql "
            f"--shell /bin/bash {SERVER_OS_USER}"
        ) from None
    runuser = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)), None
    )
    if runuser is None:
        raise RuntimeError("running as root but 'runuser' (util-linux) is not available")
    return _OsUser((runuser, "-u", SERVER_OS_USER, "--"), pw.pw_uid, pw.pw_gid)


def _clean_env() -> dict[str, str]:
    # libpq/PG* variables of the caller must not leak into initdb/pg_ctl.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _conf_line(key: str, value: str) -> str:
    if not _CONF_KEY_RE.match(key):
        raise ValueError(f"invalid postgresql.conf parameter name {key!r}")
    if "\n" in value or "\r" in value:
        raise ValueError(f"newline in value of postgresql.conf parameter {key!r}")
    return f"{key} = '{value.replace(chr(39), chr(39) * 2)}'\n"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------------
# TemporaryCluster
# --------------------------------------------------------------------------------------------------


class TemporaryCluster:
    """initdb in a fresh temp dir, start on a free loopback port, stop + delete on close."""

    def __init__(
        self,
        *,
        superuser: str = "postgres",
        password: str | None = None,
        auth_method: str = "scram-sha-256",
        extra_conf: Mapping[str, str] | None = None,
        ssl: bool = False,
    ) -> None:
        if auth_method not in AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {AUTH_METHODS}, not {auth_method!r}")
        if not superuser or "\x00" in superuser:
            raise ValueError("invalid superuser name")
        self.superuser = superuser
        self.password = password if password is not None else secrets.token_urlsafe(24)
        if not self.password or "\n" in self.password or "\r" in self.password:
            raise ValueError("the superuser password must be non-empty and on one line (--pwfile)")
        self.auth_method = auth_method
        self.extra_conf: dict[str, str] = dict(extra_conf or {})
        for key, value in self.extra_conf.items():
            _conf_line(key, value)  # validate early
        self.ssl = ssl
        self._base: Path | None = None
        self._tls: DevTLS | None = None
        self._db: Database | None = None
        self._running = False
        self._bindir: Path | None = None
        self._user: _OsUser | None = None
        #: seconds the last start() took (initdb + server start), for reports.
        self.start_seconds: float | None = None

    # -- properties ---------------------------------------------------------------------------------

    def _need_base(self) -> Path:
        if self._base is None:
            raise RuntimeError("cluster not started")
        return self._base

    @property
    def base_dir(self) -> Path:
        """The temporary directory holding everything (data dir, log, sockets, TLS files)."""
        return self._need_base()

    @property
    def data_dir(self) -> Path:
        return self._need_base() / "data"

    @property
    def log_file(self) -> Path:
        return self._need_base() / "postgres.log"

    @property
    def ssl_ca_file(self) -> Path | None:
        """CA certificate to verify the server with (``None`` unless ``ssl=True``)."""
        return self._tls.ca_file if self._tls is not None else None

    @property
    def database(self) -> Database:
        if self._db is None:
            raise RuntimeError("cluster not started")
        return self._db

    @property
    def running(self) -> bool:
        return self._running

    # -- helpers ------------------------------------------------------------------------------------

    def _run(self, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        assert self._user is not None and self._base is not None
        return subprocess.run(
            [*self._user.prefix, *args],
            cwd=self._base,  # readable by the server user, unlike possibly the caller's cwd
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _chown(self, path: Path) -> None:
        assert self._user is not None
        if self._user.uid is not None and self._user.gid is not None:
            os.chown(path, self._user.uid, self._user.gid)

    def _pg(self, exe: str) -> str:
        assert self._bindir is not None
        return str(self._bindir / exe)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Database:
        """Create and start the cluster; returns its connection facts."""
        if self._running:
            raise RuntimeError("cluster already running")
        t0 = time.monotonic()
        self._bindir = find_postgres_bindir()
        self._user = _server_os_user()
        self._base = Path(tempfile.mkdtemp(prefix="pgproxy-devdb-", dir=tempfile.gettempdir()))
        atexit.register(self.stop)
        try:
            self._chown(self._base)
            self._initdb()
            self._configure()
            port = self._start_server()
            self._running = True
            self._db = Database(host="127.0.0.1", port=port, superuser=self.superuser, password=self.password)
            if self.auth_method == "md5":
                # initdb stored the password as SCRAM (the bootstrap default), with which the server
                # silently upgrades md5 to SCRAM; re-store it as an md5 hash so md5 is really used.
                _alter_password(self._db, self.superuser, self.password)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self._db

    def _initdb(self) -> None:
        base = self._need_base()
        pwfile = base / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.password + "\n")
        self._chown(pwfile)
        try:
            proc = self._run(
                [
                    self._pg("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.superuser,
                    f"--pwfile={pwfile}",
                    f"--auth-local={self.auth_method}",
                    f"--auth-host={self.auth_method}",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                timeout=_INITDB_TIMEOUT_S,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            hint = ""
            if self._user is not None and self._user.uid is not None:
                hint = (
                    f"\n(running as root: the '{SERVER_OS_USER}' user must be able to reach {base}; "
                    "check the permissions of the temp directory's parents / TMPDIR)"
                )
            raise RuntimeError(
                f"initdb failed with exit code {proc.returncode}:\n{proc.stdout}\n{proc.stderr}{hint}"
            )

    def _configure(self) -> None:
        base = self._need_base()
        settings: dict[str, str] = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(base),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "password_encryption": "md5" if self.auth_method == "md5" else "scram-sha-256",
            "shared_buffers": "128MB",
            "logging_collector": "off",
        }
        if self.ssl:
            tls_dir = base / "tls"
            self._tls = generate_dev_ca_and_cert(tls_dir)
            # The server refuses a key that is not 0600 and owned by the server user (or root + 0640).
            for p in (tls_dir, self._tls.cert_file, self._tls.key_file, self._tls.ca_file):
                self._chown(p)
            settings.update(
                {
                    "ssl": "on",
                    "ssl_cert_file": str(self._tls.cert_file),
                    "ssl_key_file": str(self._tls.key_file),
                    "ssl_ca_file": str(self._tls.ca_file),
                    "ssl_min_protocol_version": "TLSv1.2",
                }
            )
        settings.update(self.extra_conf)
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write("\n# --- pgproxy.devdb settings ---\n")
            for key, value in settings.items():
                fh.write(_conf_line(key, value))
            # the port lives in its own file, rewritten on every start attempt
            fh.write("include_if_exists = 'pgproxy_port.conf'\n")

        m = self.auth_method
        hba = (
            "# pgproxy.devdb: loopback only\n"
            "# TYPE  DATABASE     USER  ADDRESS        METHOD\n"
            f"local   all          all                  {m}\n"
            f"host    all          all   127.0.0.1/32   {m}\n"
            f"host    all          all   ::1/128        {m}\n"
            f"host    replication  all   127.0.0.1/32   {m}\n"
        )
        (self.data_dir / "pg_hba.conf").write_text(hba)

    def _start_server(self) -> int:
        last_error = ""
        for _attempt in range(_START_ATTEMPTS):
            port = _free_port()
            port_conf = self.data_dir / "pgproxy_port.conf"
            port_conf.write_text(f"port = {port}\n")
            self._chown(port_conf)
            with contextlib.suppress(FileNotFoundError):
                self.log_file.unlink()  # keep only the current attempt's log
            proc = self._run(
                [
                    self._pg("pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    str(_PG_CTL_TIMEOUT_S),
                    "-s",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                ],
                timeout=_PG_CTL_TIMEOUT_S + 30,
            )
            if proc.returncode == 0:
                return port
            log = _tail(self.log_file)
            last_error = (
                f"pg_ctl start failed (exit {proc.returncode}) on port {port}:\n{proc.stdout}{proc.stderr}\n"
                f"--- {self.log_file} (tail) ---\n{log}"
            )
            if not any(marker in log for marker in _PORT_CLASH_MARKERS):
                break
            # make sure nothing is left half-running before retrying on another port
            self._pg_ctl_stop()
        raise RuntimeError(last_error)

    def _pg_ctl_stop(self) -> None:
        if self._base is None or not (self.data_dir / "postmaster.pid").exists():
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(
                [
                    self._pg("pg_ctl"),
                    "stop",
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    "-s",
                    "-D",
                    str(self.data_dir),
                ],
                timeout=60,
            )

    def stop(self) -> None:
        """Stop the server (immediate mode) and delete the temp dir. Idempotent."""
        atexit.unregister(self.stop)
        base = self._base
        if base is None:
            return
        try:
            if self._bindir is not None and self._user is not None:
                self._pg_ctl_stop()
        finally:
            self._running = False
            shutil.rmtree(base, ignore_errors=True)
            self._base = None
            self._tls = None

    def __enter__(self) -> Database:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self._db.host}:{self._db.port}" if self._db and self._running else "stopped"
        return f"<TemporaryCluster {self.auth_method} ssl={self.ssl} {where}>"


# --------------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------------


def _alter_password(db: Database, role: str, password: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(db.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))


def create_role(
    db: Database, name: str, password: str | None, *, superuser: bool = False, login: bool = True
) -> None:
    """Create role ``name`` (or bring an existing one to these attributes), as the superuser.

    ``password=None`` means no password (``PASSWORD NULL``). The password is hashed server-side
    according to the server's ``password_encryption``.
    """
    import psycopg
    from psycopg import sql

    attrs = sql.SQL(" ").join(
        [
            sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"),
            sql.SQL("LOGIN" if login else "NOLOGIN"),
            sql.SQL("PASSWORD {}").format(sql.Literal(password) if password is not None else sql.SQL("NULL")),
        ]
    )
    with psycopg.connect(db.dsn(), autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None
        verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
        conn.execute(sql.SQL("{} {} WITH {}").format(verb, sql.Identifier(name), attrs))


# --------------------------------------------------------------------------------------------------
# start_database policy
# --------------------------------------------------------------------------------------------------


def _database_from_dsn(dsn: str) -> Database:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"{TEST_DSN_ENV} must be a postgresql:// URL")
    if not parts.username:
        raise ValueError(f"{TEST_DSN_ENV} must name the superuser")
    return Database(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        superuser=unquote(parts.username),
        password=unquote(parts.password or ""),
        database=unquote(parts.path.lstrip("/")) or "postgres",
    )


def docker_available(timeout: float = 2.0) -> bool:
    """True only if a Docker engine answers a ping within ``timeout`` seconds."""
    try:
        docker: Any = importlib.import_module("docker")
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _start_container() -> tuple[Database, Callable[[], None]]:
    try:
        module: Any = importlib.import_module("testcontainers.community.postgres")
    except ImportError:
        module = importlib.import_module("testcontainers.postgres")
    password = secrets.token_urlsafe(24)
    container = module.PostgresContainer(
        "postgres:15", username="postgres", password=password, dbname="postgres", driver=None
    )
    container.start()
    try:
        host = str(container.get_container_host_ip())
        if host == "localhost":
            host = "127.0.0.1"
        port = int(container.get_exposed_port(5432))
    except BaseException:
        container.stop()
        raise
    return Database(host=host, port=port, superuser="postgres", password=password), container.stop


def start_database() -> tuple[Database, Callable[[], None]]:
    """A superuser connection for tests/demo, and the function that releases it.

    ``$PGPROXY_TEST_DSN`` (an existing server; the stop function does nothing) if set; else a
    ``postgres:15`` testcontainer if a Docker engine answers; else a local :class:`TemporaryCluster`.
    """
    dsn = os.environ.get(TEST_DSN_ENV)
    if dsn:
        return _database_from_dsn(dsn), lambda: None
    if docker_available():
        try:
            return _start_container()
        except Exception as exc:  # no image and no network, testcontainers missing, ...
            warnings.warn(
                f"Docker answers but the postgres:15 container could not be started ({exc!r}); "
                "falling back to a local temporary cluster",
                RuntimeWarning,
                stacklevel=2,
            )
    cluster = TemporaryCluster()
    return cluster.start(), cluster.stop
