#!/usr/bin/env python3
"""Run third-party PostgreSQL test suites through a byte relay and through pgproxy, and compare.

What for: the proxy must be as transparent as a TCP relay for everything its policy allows. This
script runs PostgreSQL's own regression suite (pg_regress, standard parallel schedule), the psycopg
test suite and the asyncpg test suite twice against one throwaway PostgreSQL cluster:

- **relay**: a plain byte-for-byte TCP relay in front of the server (the baseline: same hop, no
  protocol work);
- **proxy**: ``pgproxy serve`` as a subprocess, the password is a JWT, the policy is ``default:
  allow``, the audit log is the signed log.

It prints, per suite, passed/failed on each path and the tests whose outcome differs. It is a
benchmark-style script, not a test: it downloads the suites (only from the Debian and PyPI package
registries, with their own clients), builds ``regress.so`` with PGXS and caches all of it in
``--workdir``. psycopg's tests are not in its sdist: pass a psycopg git clone with
``--psycopg-repo``. Every listener binds port 0 on 127.0.0.1.

Run: ``.venv/bin/python bench/conformance.py [--suites pg_regress,asyncpg,psycopg]
[--psycopg-repo DIR] [--rounds N] [--pytest-args-psycopg ARGS] [--out FILE]`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgproxy.devdb import Database, TemporaryCluster
from pgproxy.identity import generate_dev_keys, mint_token

REPO = Path(__file__).resolve().parent.parent
PGPROXY_BIN = Path(sys.executable).parent / "pgproxy"
SUITES = ("pg_regress", "asyncpg", "psycopg")
PATHS = ("relay", "proxy")
ISSUER = "pgproxy-conformance"
AUDIENCE = "pgproxy-conformance"
SUPERUSER = "postgres"  # asyncpg's suite connects as "postgres"
ASYNCPG_VERSION = "0.31.0"
PSYCOPG_TAG = "3.3.4"
DEBIAN_SOURCES = (
    "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {codename} main\n"
    "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security "
    "{codename}-security main\n"
)
SUITE_TIMEOUT_S = 3 * 3600


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a preparation command, failing loudly with its output."""
    proc = subprocess.run(list(cmd), text=True, capture_output=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def server_user_ids() -> tuple[int, int] | None:
    """(uid, gid) of the OS user the throwaway server runs as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


# --------------------------------------------------------------------------------------------------
# Fetching and building the suites (cached in the work directory)
# --------------------------------------------------------------------------------------------------


def pg_config(flag: str) -> str:
    return run(["pg_config", flag]).stdout.strip()


def prepare_pg_regress(work: Path) -> tuple[Path, Path]:
    """The regression sources matching the installed server and a PGXS-built regress.so.

    Returns (source dir with sql/, expected/, data/ and parallel_schedule; dlpath dir). The source
    comes from Debian's ``postgresql-<major>`` source package (``apt-get source`` with a private
    deb-src list, so the system's apt configuration is not changed).
    """
    version = pg_config("--version").split()[1]  # "15.18"
    major = version.split(".")[0]
    src = work / f"postgresql-{version}" / "src" / "test" / "regress"
    dlpath = work / f"regress-lib-{version}"
    if (dlpath / "regress.so").exists() and (src / "parallel_schedule").exists():
        return src, dlpath
    package = f"postgresql-{major}"
    deb_version = run(["dpkg-query", "-W", "-f=${Version}", package]).stdout.strip()
    codename = run(["sh", "-c", ". /etc/os-release && echo $VERSION_CODENAME"]).stdout.strip()
    apt_dir = work / "apt"
    (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list").write_text(DEBIAN_SOURCES.format(codename=codename))
    opts = [f"-oDir::Etc::SourceList={apt_dir / 'sources.list'}", "-oDir::Etc::SourceParts=/nonexistent",
            f"-oDir::State::Lists={apt_dir / 'lists'}", "-oDir::Cache::pkgcache=", "-oDir::Cache::srcpkgcache=",
            "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oAPT::Sandbox::User=" + os.environ.get("USER", "")]
    log(f"apt-get source --download-only {package}={deb_version} ...")
    run(["apt-get", *opts, "update"], timeout=600)
    download = apt_dir / "download"
    download.mkdir(exist_ok=True)
    run(["apt-get", *opts, "source", "--download-only", f"{package}={deb_version}"], cwd=download, timeout=1800)
    orig = next(download.glob(f"postgresql-{major}_{version}.orig.tar.*"))
    log(f"extracting {orig.name} ...")
    with tarfile.open(orig) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"postgresql-{version}/src/test/regress/")]
        tar.extractall(work, members=members, filter="data")
    # regress.so from regress.c with PGXS; refint and autoinc (contrib/spi) ship with the server
    dlpath.mkdir(exist_ok=True)
    shutil.copy(src / "regress.c", dlpath / "regress.c")
    (dlpath / "Makefile").write_text(
        "MODULES = regress\nPG_CONFIG = pg_config\nPGXS := $(shell $(PG_CONFIG) --pgxs)\ninclude $(PGXS)\n")
    log("building regress.so with PGXS ...")
    run(["make", "-C", str(dlpath)], timeout=600)
    for lib in ("refint", "autoinc"):
        shutil.copy(Path(pg_config("--pkglibdir")) / f"{lib}.so", dlpath / f"{lib}.so")
    return src, dlpath


def prepare_venv(work: Path, psycopg_tag: str) -> Path:
    """A virtualenv with the clients and test tools the suites need; returns its python."""
    venv = work / f"venv-psycopg{psycopg_tag}-asyncpg{ASYNCPG_VERSION}"
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv} ...")
        run([sys.executable, "-m", "venv", str(venv)])
    # both projects' test dependencies (a no-op when already installed); not uvloop: pproxy, which
    # psycopg's network-failure tests start, then finds no event loop
    run([str(python), "-m", "pip", "install", "-q", f"psycopg[binary]=={psycopg_tag}", "psycopg-pool",
         f"asyncpg=={ASYNCPG_VERSION}", "pytest<9.1", "pytest-timeout", "anyio", "pproxy", "distro~=1.9.0"],
        timeout=1800)
    return python


def prepare_asyncpg(work: Path, python: Path) -> Path:
    """asyncpg's tests/ from its PyPI sdist (pip download); returns the directory holding tests/."""
    root = work / f"asyncpg-{ASYNCPG_VERSION}-tests"
    if (root / "tests" / "__init__.py").exists():
        return root
    download = work / "sdist"
    download.mkdir(exist_ok=True)
    sdist = download / f"asyncpg-{ASYNCPG_VERSION}.tar.gz"
    if not sdist.exists():  # pip builds the sdist's metadata: minutes (Cython), hence the cache
        log(f"pip download asyncpg=={ASYNCPG_VERSION} (sdist) ...")
        run([str(python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(download),
             f"asyncpg=={ASYNCPG_VERSION}"], timeout=1800)
    prefix = f"asyncpg-{ASYNCPG_VERSION}/tests/"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix):
                m.name = "tests/" + m.name[len(prefix):]
                members.append(m)
        tar.extractall(root, members=members, filter="data")
    return root


def prepare_psycopg(work: Path, repo: Path, tag: str) -> Path:
    """psycopg's tests/, tools/ and pytest configuration at ``tag`` from a local git clone."""
    root = work / f"psycopg-{tag}-tests"
    if (root / "tools" / "pproxy_fix.py").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    # tools/ holds the helper the network-failure tests start (pproxy_fix.py)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", tag, "tests", "tools",
                              "pyproject.toml"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


# --------------------------------------------------------------------------------------------------
# The two paths
# --------------------------------------------------------------------------------------------------


class Relay:
    """A byte-for-byte TCP relay from 127.0.0.1:<port 0> to the server, in a background thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(self.db.host, self.db.port)
        except OSError:
            c_writer.close()
            return
        # when either side closes (or fails), close both, as the server's own socket would
        pipes = [asyncio.ensure_future(self._pipe(c_reader, s_writer)),
                 asyncio.ensure_future(self._pipe(s_reader, c_writer))]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for w in (c_writer, s_writer):
                w.close()

    def start(self) -> None:
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = int(server.sockets[0].getsockname()[1])
        self._thread.start()

    async def _close(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class Proxy:
    """``pgproxy serve``: plaintext loopback listener, JWT login, ``default: allow``, signed audit log."""

    def __init__(self, workdir: Path, db: Database) -> None:
        self.workdir = workdir
        self.audit_dir = workdir / "audit"
        keys = generate_dev_keys(workdir / "keys")
        password_file = workdir / "upstream-password"
        password_file.write_text(db.password)
        password_file.chmod(0o600)
        run([str(PGPROXY_BIN), "audit", "keygen", "--out", str(workdir / "audit.key")])
        (workdir / "policy.yaml").write_text("default: allow\n")
        config = {
            "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
            "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"],
                         "jwks_file": str(keys.jwks_file)},
            "upstream": {"host": db.host, "port": db.port, "sslmode": "disable",
                         "credentials": [{"role": SUPERUSER, "password_file": str(password_file)}]},
            "audit": {"dir": str(self.audit_dir), "signing_key_file": str(workdir / "audit.key")},
            "policy": {"file": str(workdir / "policy.yaml")},
        }
        self.config_file = workdir / "pgproxy.yaml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.token = mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject="conformance",
                                db_role=[SUPERUSER], ttl_seconds=24 * 3600)
        self.log_file = workdir / "pgproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        with self.log_file.open("wb") as out:
            self.proc = subprocess.Popen([str(PGPROXY_BIN), "serve", "-c", str(self.config_file)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.workdir,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = re.search(r"pgproxy (?:\S+ )?listening on ports (\d+)", self.log_file.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"pgproxy did not start:\n{self.log_file.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Endpoint:
    name: str
    port: int
    password: str

    def env(self) -> dict[str, str]:
        """libpq variables for psql/pg_regress and asyncpg's suite (which reads PGHOST and the rest)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSYCOPG"))}
        env.update({"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": SUPERUSER,
                    "PGPASSWORD": self.password, "PGSSLMODE": "disable", "PGGSSENCMODE": "disable",
                    "PGCONNECT_TIMEOUT": "30"})
        return env

    def dsn(self, database: str = "postgres") -> str:
        return (f"host=127.0.0.1 port={self.port} user={SUPERUSER} password={self.password} dbname={database} "
                "sslmode=disable")

    def dsn_only_env(self) -> dict[str, str]:
        """psycopg's suite: the DSN in PSYCOPG_TEST_DSN and no PG* variables (its conninfo tests read them)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSYCOPG"))}
        env["PSYCOPG_TEST_DSN"] = self.dsn()
        return env


# --------------------------------------------------------------------------------------------------
# Running the suites and reading their results
# --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Per-test results of one suite on one path: test id -> 'passed' | 'failed' | 'skipped'."""

    results: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    def count(self, status: str) -> int:
        return sum(1 for s in self.results.values() if s == status)


_PG_REGRESS_LINE = re.compile(r"^(?:test\s+|\s+)(\S+)\s+\.\.\.\s+(ok|FAILED|failed \(ignored\))", re.M)


def merge(rounds: Sequence[Outcome]) -> Outcome:
    """One outcome over several rounds: a test whose result changed between rounds is ``flaky``."""
    merged = Outcome(seconds=sum(o.seconds for o in rounds), note=" ".join(o.note for o in rounds if o.note))
    for test in {t for o in rounds for t in o.results}:
        seen = [o.results.get(test, "missing") for o in rounds]
        merged.results[test] = seen[0] if len(set(seen)) == 1 else f"flaky ({seen.count('failed')}/{len(seen)} failed)"
        merged.messages[test] = next((o.messages[test] for o in rounds if test in o.messages), "")
    return merged


def run_pg_regress(endpoint: Endpoint, src: Path, dlpath: Path, out: Path) -> Outcome:
    """pg_regress in installcheck mode (it recreates database "regression"), parallel schedule."""
    (out / "results").mkdir(parents=True)
    ids = server_user_ids()
    if ids is not None:  # the server writes COPY TO files into results/
        os.chown(out / "results", *ids)
    pg_regress = Path(pg_config("--pkglibdir")) / "pgxs" / "src" / "test" / "regress" / "pg_regress"
    cmd = [str(pg_regress), f"--inputdir={src}", f"--outputdir={out}", f"--bindir={pg_config('--bindir')}",
           f"--dlpath={dlpath}", f"--schedule={src / 'parallel_schedule'}", "--no-locale",
           "--encoding=UTF8", "--host=127.0.0.1", f"--port={endpoint.port}", f"--user={SUPERUSER}"]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=endpoint.env(), cwd=out, text=True, capture_output=True, timeout=SUITE_TIMEOUT_S)
    outcome = Outcome(seconds=time.monotonic() - started)
    (out / "pg_regress.out").write_text(proc.stdout + proc.stderr)
    for name, status in _PG_REGRESS_LINE.findall(proc.stdout):
        outcome.results[name] = "passed" if status == "ok" else "failed"
    diffs = out / "regression.diffs"
    if diffs.exists():
        for chunk in re.split(r"^diff ", diffs.read_text(errors="replace"), flags=re.M)[1:]:
            found = re.search(r"/results/(\S+)\.out", chunk.splitlines()[0])
            if found:
                outcome.messages[found.group(1)] = "\n".join(chunk.splitlines()[3:12])
    if not outcome.results:
        outcome.note = f"pg_regress exited {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}"
    return outcome


def run_pytest(python: Path, root: Path, args: Sequence[str], env: dict[str, str], out: Path) -> Outcome:
    """pytest in ``root`` with a JUnit XML report, read per test."""
    out.mkdir(parents=True)
    junit = out / "junit.xml"
    cmd = [str(python), "-m", "pytest", "-q", "--timeout=300", f"--junitxml={junit}", f"-ocache_dir={out / 'cache'}",
           *args]
    started = time.monotonic()
    with (out / "pytest.out").open("w") as output:  # written as the suite runs: tail it to follow
        proc = subprocess.run(cmd, env=env, cwd=root, stdout=output, stderr=subprocess.STDOUT,
                              timeout=SUITE_TIMEOUT_S)
    outcome = Outcome(seconds=time.monotonic() - started)
    if not junit.exists():
        text = (out / "pytest.out").read_text(errors="replace")
        outcome.note = f"pytest exited {proc.returncode}: {text[-800:]}"
        return outcome
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
                outcome.messages[test_id] = (child.get("message") or child.text or "").strip()[:600]
                break
            if child.tag == "skipped":
                status = "skipped"
        # a test can fail in teardown after passing: the last verdict counts
        if outcome.results.get(test_id) != "failed":
            outcome.results[test_id] = status
    return outcome


def run_suite(suite: str, endpoint: Endpoint, prepared: dict[str, Any], out: Path,
              args: argparse.Namespace) -> Outcome:
    log(f"{suite} through the {endpoint.name} ...")
    if suite == "pg_regress":
        src, dlpath = prepared[suite]
        outcome = run_pg_regress(endpoint, src, dlpath, out)
    elif suite == "asyncpg":
        outcome = run_pytest(prepared["python"], prepared[suite], ["tests", *shlex.split(args.pytest_args_asyncpg)],
                             endpoint.env(), out)
    else:
        outcome = run_pytest(prepared["python"], prepared[suite], ["tests", *shlex.split(args.pytest_args_psycopg)],
                             endpoint.dsn_only_env(), out)
    log(f"{suite} through the {endpoint.name}: {outcome.count('passed')} passed, {outcome.count('failed')} failed, "
        f"{outcome.count('skipped')} skipped in {outcome.seconds:.0f} s {outcome.note}")
    return outcome


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def report(results: dict[str, dict[str, Outcome]], facts: list[str]) -> str:
    lines = ["# Conformance: relay vs proxy", "", *facts, "",
             "| suite | relay passed | relay failed | proxy passed | proxy failed | skipped (relay/proxy) | "
             "differing tests | minutes (relay/proxy) |",
             "|---|---|---|---|---|---|---|---|"]
    details: list[str] = []
    for suite, by_path in results.items():
        relay, proxy = by_path["relay"], by_path["proxy"]
        differing = sorted(t for t in set(relay.results) | set(proxy.results)
                           if relay.results.get(t, "missing") != proxy.results.get(t, "missing"))
        lines.append(f"| {suite} | {relay.count('passed')} | {relay.count('failed')} | {proxy.count('passed')} | "
                     f"{proxy.count('failed')} | {relay.count('skipped')}/{proxy.count('skipped')} | "
                     f"{len(differing)} | {relay.seconds / 60:.1f}/{proxy.seconds / 60:.1f} |")
        for note in (relay.note, proxy.note):
            if note:
                details.append(f"- {suite}: {note}")
        if differing:
            details += ["", f"## {suite}: tests that differ", ""]
            for test in differing:
                r, p = relay.results.get(test, "missing"), proxy.results.get(test, "missing")
                message = proxy.messages.get(test) or relay.messages.get(test) or ""
                first = " ".join(message.split())[:300]
                details.append(f"- `{test}`: relay {r}, proxy {p}" + (f": {first}" if first else ""))
    return "\n".join([*lines, "", *details]) + "\n"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pgproxy-conformance",
                   help="cache for downloads, builds and the suites' venv; each run's output goes in runs/")
    p.add_argument("--psycopg-repo", type=Path, help="a git clone of github.com/psycopg/psycopg (needed for psycopg)")
    p.add_argument("--psycopg-tag", default=PSYCOPG_TAG, help="psycopg release whose tests (and client) to use")
    p.add_argument("--pytest-args-psycopg", default="-m 'not slow and not mypy'",
                   help="extra pytest arguments for psycopg ('-m \"not mypy\"' adds the slow tests: much longer)")
    p.add_argument("--pytest-args-asyncpg", default="", help="extra pytest arguments for asyncpg")
    p.add_argument("--rounds", type=int, default=1, help="run each suite this often per path (finds flaky tests)")
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = p.parse_args(argv)
    args.suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        p.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    if "psycopg" in args.suites and args.psycopg_repo is None:
        p.error("psycopg's tests are not in its sdist: pass --psycopg-repo (git clone https://github.com/psycopg/"
                "psycopg) or leave psycopg out of --suites")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # the server (user postgres) reads regression data files from here
    prepared: dict[str, Any] = {"python": prepare_venv(work, args.psycopg_tag)}
    if "pg_regress" in args.suites:
        prepared["pg_regress"] = prepare_pg_regress(work)
    if "asyncpg" in args.suites:
        prepared["asyncpg"] = prepare_asyncpg(work, prepared["python"])
    if "psycopg" in args.suites:
        prepared["psycopg"] = prepare_psycopg(work, args.psycopg_repo, args.psycopg_tag)

    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=runs))
    run_dir.chmod(0o755)
    results: dict[str, dict[str, Outcome]] = {}
    with contextlib.ExitStack() as stack:
        log("starting a temporary PostgreSQL cluster ...")
        cluster = TemporaryCluster(superuser=SUPERUSER, auth_method="scram-sha-256",
                                   extra_conf={"max_prepared_transactions": "10"})
        stack.callback(cluster.stop)
        db = cluster.start()
        relay = Relay(db)
        relay.start()
        stack.callback(relay.stop)
        (run_dir / "proxy").mkdir()
        proxy = Proxy(run_dir / "proxy", db)
        proxy.start()
        stack.callback(proxy.stop)
        endpoints = {"relay": Endpoint("relay", relay.port, db.password),
                     "proxy": Endpoint("proxy", proxy.port, proxy.token)}
        version = run(["psql", "-XAtc", "SHOW server_version"], env=endpoints["relay"].env()).stdout.strip()
        for suite in args.suites:
            # one at a time: the suites share the cluster and the CPU
            rounds: dict[str, list[Outcome]] = {path: [] for path in PATHS}
            for n in range(args.rounds):  # interleaved, so a neighbour's load hits both paths alike
                for path in PATHS:
                    out = run_dir / suite / path / (f"round-{n + 1}" if args.rounds > 1 else "")
                    rounds[path].append(run_suite(suite, endpoints[path], prepared, out, args))
            results[suite] = {path: merge(rounds[path]) for path in PATHS}
        proxy.stop()  # its last checkpoint is signed on shutdown
        verified = subprocess.run([str(PGPROXY_BIN), "audit", "verify", str(proxy.audit_dir), "--pubkey",
                                   str(proxy.audit_dir.parent / "audit.key.pub")], text=True, capture_output=True)
    facts = [f"PostgreSQL {version}; psycopg {args.psycopg_tag} tests (pytest `{args.pytest_args_psycopg}`); "
             f"asyncpg {ASYNCPG_VERSION} tests; outputs in `{run_dir}`.",
             f"Signed audit log of the proxy runs, `pgproxy audit verify` (exit {verified.returncode}): "
             + " ".join((verified.stdout.strip() or verified.stderr.strip()).splitlines()[-1:])]
    text = report(results, facts)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
