"""The ``casf-proxy`` command line (README.md, "Commands").

Exit codes: 0 ok; 1 a check failed (deny, broken chain, failing test,
overlapping routes, policy that does not compile); 2 usage, config or
connectivity error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.config import Config, ConfigError, load_config
from proxy.settings import Environment

if TYPE_CHECKING:
    from proxy.app import WorkerSpec
    from proxy.audit.verify import AuditReader

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def _config(args: argparse.Namespace, env: Environment) -> Config:
    path = args.config or env.config_path
    if not path:
        raise ConfigError("casf-proxy", "", "no config file given",
                          "pass -c/--config FILE or set CASF_CONFIG")
    return load_config(path, env)


def _setup_logging(env: Environment, worker: int | None = None) -> None:
    from proxy.logs import setup_logging

    setup_logging(env.log_level, {"worker": worker} if worker is not None else None)


# ------------------------------------------------------------ run


async def _serve_forever(cfg: Config, env: Environment, worker: WorkerSpec | None = None
                         ) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (docs/operations.md).

    A second SIGTERM/SIGINT skips what is left of the shutdown delay; SIGHUP
    reloads the config.
    """
    from proxy.app import Runtime, graceful_stop, serve
    from proxy.logs import redact_url
    from proxy.tasks import spawn

    log = logging.getLogger("casf")
    stop, hurry, hup = asyncio.Event(), asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    async with Runtime.open(cfg, env, worker=worker) as rt:
        serving = await serve(rt)
        log.warning(
            "casf-proxy listening: traffic %s:%d → %s, admin %s:%d, decisions %s, mode %s, "
            "policy %s, config %s", rt.cfg.traffic.host, serving.traffic_port,
            redact_url(cfg.upstream.url), rt.cfg.admin.host, serving.admin_port,
            f"{rt.cfg.decisions_listener.host}:{serving.decisions_port}"
            if rt.cfg.decisions_listener is not None else "off",
            rt.mode.current().value, rt.pipeline.policy_hash, cfg.digest[:12])

        async def reloads() -> None:
            while True:
                await hup.wait()
                hup.clear()
                await rt.reload("SIGHUP")

        reloader = spawn(reloads(), name="casf-sighup")
        if worker is not None:
            from proxy.workers import watch_parent

            spawn(watch_parent(stop), name="casf-parent-watch")
        await stop.wait()
        reloader.cancel()
        await graceful_stop(rt, serving, hurry)
    log.warning("casf-proxy stopped: requests drained, audit flushed, connections closed")


def cmd_run(args: argparse.Namespace, env: Environment) -> int:
    # a SIGHUP before the loop's handler is installed must not kill the process
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cfg = _config(args, env)
    worker: WorkerSpec | None = None
    if args.worker is not None:  # started by the supervisor of `run --workers N`
        from proxy.app import WorkerSpec

        worker = WorkerSpec(args.worker, args.workers, args.traffic_port, args.admin_port,
                            args.decisions_port)
        _setup_logging(env, args.worker)
    elif args.workers > 1:
        from proxy.workers import supervise

        if not env.redis_url:
            logging.getLogger("casf").error(
                "--workers %d needs REDIS_URL: replay protection, rate limits and the mode "
                "must be shared by the workers (run one worker without it)", args.workers)
            return EXIT_ERROR
        if cfg.policy.engine == "regorus":  # fail here, not in N workers
            from proxy.policy_regorus import RegorusEngine

            RegorusEngine(cfg.policy).close()
        return supervise(args.config or env.config_path or "", cfg, env, args.workers)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve_forever(cfg, env, worker))
    else:
        uvloop.run(_serve_forever(cfg, env, worker))
    return EXIT_OK


# ------------------------------------------------------------ validate


def cmd_validate(args: argparse.Namespace, env: Environment) -> int:
    from proxy.policy_regorus import PolicyLoadError, PolicyQueryError, RegorusEngine

    try:
        cfg = _config(args, env)
    except ConfigError as exc:
        if "overlap" in str(exc):
            print(f"casf-proxy validate: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise
    try:
        if cfg.policy.files:  # an external OPA without a local copy has nothing to check
            RegorusEngine(cfg.policy).close()
    except PolicyQueryError as exc:
        print(f"casf-proxy validate: policy cannot decide: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PolicyLoadError as exc:
        print(f"casf-proxy validate: policy does not compile: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"ok: {cfg.source}: {len(cfg.routes)} routes, {len(cfg.rate_limits)} rate limits, "
          f"{len(cfg.policy.files)} policy files ({cfg.policy.policy_hash})")
    return EXIT_OK


# ------------------------------------------------------------ policy test


def cmd_policy_test(args: argparse.Namespace, env: Environment) -> int:
    from proxy.policy_regorus import PolicyLoadError
    from proxy.policytest import run_tests

    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"casf-proxy policy test: {directory} is not a directory", file=sys.stderr)
        return EXIT_ERROR
    try:
        results = run_tests(directory, rego_v0=args.v0_compatible)
    except PolicyLoadError as exc:
        print(f"casf-proxy policy test: {exc}", file=sys.stderr)
        return EXIT_FAILED
    failed = [r for r in results if not r.passed]
    for r in results:
        if args.verbose or not r.passed:
            status = "PASS" if r.passed else ("ERROR" if r.error else "FAIL")
            print(f"{r.rule}: {status}" + (f" ({r.error})" if r.error else ""))
    print("-" * 40)
    print(f"PASS: {len(results) - len(failed)}/{len(results)}")
    if failed:
        print(f"FAIL: {len(failed)}/{len(results)}")
    if not results:
        print("no test_* rules found", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if failed else EXIT_OK


# ------------------------------------------------------------ audit


def _store_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the audit store cannot be reached or read" (exit 2)."""
    import sqlite3

    import asyncpg

    from proxy.ports import AuditUnavailable

    return (OSError, TimeoutError, sqlite3.Error, AuditUnavailable, asyncpg.PostgresError,
            asyncpg.InterfaceError)


@contextlib.asynccontextmanager
async def _open_reader(cfg: Config, env: Environment) -> AsyncIterator[tuple[AuditReader, str]]:
    """The configured audit store, read-only: PostgreSQL when PG_DSN is set, else SQLite."""
    if env.pg_dsn:
        from proxy.audit.postgres import PostgresReader

        async with PostgresReader.open(env.pg_dsn) as pg:
            yield pg, "postgresql"
    else:
        from proxy.audit.sqlite import SqliteReader

        async with SqliteReader.open(cfg.audit.sqlite_path) as lite:
            yield lite, "sqlite"


def _window(args: argparse.Namespace) -> tuple[str | None, str | None]:
    from proxy.audit.verify import normalise_ts

    since = normalise_ts(args.since) if args.since else None
    until = normalise_ts(args.until) if args.until else None
    return since, until


def _run_store(name: str, coro: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(coro)
    except _store_errors() as exc:
        print(f"casf-proxy {name}: audit store unavailable: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_ERROR


def cmd_audit_verify(args: argparse.Namespace, env: Environment) -> int:
    cfg = _config(args, env)
    try:
        since, until = _window(args)
    except ValueError as exc:
        print(f"casf-proxy audit verify: --since/--until: {exc}", file=sys.stderr)
        return EXIT_ERROR
    anchor: bytes | None = None
    if args.digest:
        try:
            anchor = Path(args.digest).read_bytes()
        except OSError as exc:
            print(f"casf-proxy audit verify: cannot read {args.digest}: {exc.strerror}",
                  file=sys.stderr)
            return EXIT_ERROR
    return _run_store("audit verify", _verify(cfg, env, args.chain, since, until, anchor))


async def _verify(cfg: Config, env: Environment, chain: str | None, since: str | None,
                  until: str | None, anchor: bytes | None) -> int:
    from proxy.audit.digest import verify as verify_digest
    from proxy.audit.verify import check_chains, compare_with_digest

    broken = chains = total = 0
    seen: list[str] = []
    async with _open_reader(cfg, env) as (reader, store):
        async for res in check_chains(reader, chain, since, until):
            chains += 1
            if res.check.chain_id == res.chain_id:  # not a row of no chain
                seen.append(res.chain_id)
            if res.broken is not None:
                broken += 1
                print(f"BROKEN {res.broken} [{res.broken.kind}]")
                continue
            c = res.check
            total += c.count
            print(f"ok chain {res.chain_id!r}: {c.count} records (seq {c.first_seq}.."
                  f"{c.last_seq}), last hash {c.last_hash}")
        if anchor is not None:
            ok, notes = verify_digest(anchor)
            if not ok:
                print("BROKEN digest file: " + "; ".join(notes))
                broken += 1
            else:
                import orjson

                if since is not None or until is not None:  # every chain, not the window's
                    seen = [cid for cid, _, _ in await reader.chains(chain, None, None)]
                for f in await compare_with_digest(reader, orjson.loads(anchor), seen, chain):
                    broken += f.status == "broken"
                    print({"ok": "ok ", "broken": "BROKEN ", "new": "NEW "}[f.status]
                          + f.message)
    if broken:
        print(f"chain verification FAILED ({store}): {broken} problem(s)")
        return EXIT_FAILED
    if chain is not None and chains == 0 and since is None and until is None:
        print(f"chain verification FAILED ({store}): no records for chain {chain!r}")
        return EXIT_FAILED
    print(f"chain verification ok ({store}): {chains} chain(s), {total} records")
    return EXIT_OK


def cmd_audit_export(args: argparse.Namespace, env: Environment) -> int:
    cfg = _config(args, env)
    try:
        since, until = _window(args)
    except ValueError as exc:
        print(f"casf-proxy audit export: --since/--until: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return _run_store("audit export", _export(cfg, env, args, since, until))


async def _export(cfg: Config, env: Environment, args: argparse.Namespace,
                  since: str | None, until: str | None) -> int:
    from proxy.audit.export import run_export

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    out = sys.stdout.buffer
    try:
        async with _open_reader(cfg, env) as (reader, store):
            exp, brk = await run_export(reader, out.write, out.flush, chain=args.chain,
                                        since=since, until=until, follow=args.follow,
                                        interval_s=args.interval, stop=stop)
    except BrokenPipeError:  # the consumer went away: nothing more to do
        import os

        # no second BrokenPipeError when the interpreter flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if brk is not None:
        print(f"casf-proxy audit export: BROKEN {brk} [{brk.kind}]: export stopped; "
              f"{exp.written} record(s) before it were written", file=sys.stderr)
        return EXIT_FAILED
    if stop.is_set() and not args.follow:
        print(f"casf-proxy audit export: interrupted: the output is incomplete "
              f"({exp.written} record(s) written)", file=sys.stderr)
        return EXIT_ERROR
    if args.chain is not None and not exp.checks:
        print(f"casf-proxy audit export: no records for chain {args.chain!r} ({store})",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"casf-proxy audit export: {exp.written} record(s) of {len(exp.checks)} chain(s) "
          f"written and verified ({store})", file=sys.stderr)
    return EXIT_OK


def cmd_audit_migrate(args: argparse.Namespace, env: Environment) -> int:
    cfg = _config(args, env)
    if not env.pg_dsn:
        from proxy.audit.sqlite import MigrationRefused, migrate_file

        try:
            state = migrate_file(cfg.audit.sqlite_path)
        except MigrationRefused as exc:
            print(f"casf-proxy audit migrate: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except _store_errors() as exc:
            print(f"casf-proxy audit migrate: {exc}", file=sys.stderr)
            return EXIT_ERROR
        print(f"ok: SQLite audit store ready at {cfg.audit.sqlite_path} (schema {state}; "
              "PG_DSN is not set)")
        return EXIT_OK
    from proxy.audit.postgres import migrate

    async def run() -> int:
        assert env.pg_dsn is not None
        for version, state in await migrate(env.pg_dsn):
            print(f"{version}: {'applied' if state == 'applied' else 'already applied'}")
        print("ok: PostgreSQL audit schema is up to date")
        return EXIT_OK

    return _run_store("audit migrate", run())


def cmd_audit_digest(args: argparse.Namespace, env: Environment) -> int:
    from proxy.audit import digest

    if args.verify:
        try:
            raw = Path(args.verify).read_bytes()
            key = digest.load_key(Path(args.key)) if args.key else None
        except OSError as exc:
            print(f"casf-proxy audit digest: cannot read {args.verify}: {exc.strerror}",
                  file=sys.stderr)
            return EXIT_ERROR
        except digest.DigestError as exc:
            print(f"casf-proxy audit digest: {exc}", file=sys.stderr)
            return EXIT_ERROR
        ok, notes = digest.verify(raw, key)
        for note in notes:
            print(note)
        print(f"digest {args.verify}: {'ok' if ok else 'FAILED'}")
        return EXIT_OK if ok else EXIT_FAILED
    cfg = _config(args, env)
    window: tuple[str, str] | None = None
    if args.date:
        from proxy.audit.verify import day_window

        try:
            window = day_window(args.date)
        except ValueError as exc:
            print(f"casf-proxy audit digest: --date: {exc} (use YYYY-MM-DD, UTC)",
                  file=sys.stderr)
            return EXIT_ERROR
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer: Ed25519PrivateKey | None = None
    if args.sign:
        try:
            loaded = digest.load_key(Path(args.sign))
        except digest.DigestError as exc:
            print(f"casf-proxy audit digest: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(loaded, Ed25519PrivateKey):
            signer = loaded
        else:
            print(f"casf-proxy audit digest: --sign needs a private key; {args.sign} is a "
                  "public key", file=sys.stderr)
            return EXIT_ERROR
    previous: dict[str, Any] | None = None
    if args.previous:
        import orjson

        try:
            raw_prev = Path(args.previous).read_bytes()
        except OSError as exc:
            print(f"casf-proxy audit digest: cannot read {args.previous}: {exc.strerror}",
                  file=sys.stderr)
            return EXIT_ERROR
        ok, notes = digest.verify(raw_prev)
        if not ok:
            print(f"casf-proxy audit digest: --previous {args.previous}: " + "; ".join(notes),
                  file=sys.stderr)
            return EXIT_FAILED
        previous = orjson.loads(raw_prev)
    built: list[dict[str, Any]] = []
    code = _run_store("audit digest", _digest(cfg, env, args.date, window, built, previous))
    if code != EXIT_OK:
        return code
    doc = built[0]
    if signer is not None:
        doc = digest.sign(doc, signer)
    data = digest.serialise(doc)
    if args.out:
        try:
            Path(args.out).write_bytes(data)
        except OSError as exc:
            print(f"casf-proxy audit digest: cannot write {args.out}: {exc.strerror}",
                  file=sys.stderr)
            return EXIT_ERROR
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    print(f"digest: {len(doc['chains'])} chain(s), {doc['records']} records, merkle root "
          f"{doc['merkle_root']}, digest hash {doc['digest_hash']}"
          + (f", signed (key {doc['signature']['key_id']})" if signer is not None else ""),
          file=sys.stderr)
    return EXIT_OK


async def _digest(cfg: Config, env: Environment, day: str | None,
                  window: tuple[str, str] | None, out: list[dict[str, Any]],
                  previous: dict[str, Any] | None = None) -> int:
    """Verify what the digest covers and build it (appended to ``out``); exit code.

    With ``previous`` (the last digest), the store must still hold what it
    covered, and every chain it does not know is named (new, or forged when it
    has records in the time the previous digest covers).
    """
    from proxy.audit import digest
    from proxy.audit.records import now_iso
    from proxy.audit.verify import check_chains, compare_with_digest

    since, until = window if window else (None, None)
    entries: list[dict[str, Any]] = []
    broken = 0
    async with _open_reader(cfg, env) as (reader, store):
        async for res in check_chains(reader, None, since, until):
            if res.broken is not None:
                broken += 1
                print(f"BROKEN {res.broken} [{res.broken.kind}]", file=sys.stderr)
            else:
                entries.append(res.summary())
        if previous is not None:
            every = [cid for cid, _, _ in await reader.chains(None, None, None)]
            for f in await compare_with_digest(reader, previous, every):
                if f.status == "broken":
                    broken += 1
                    print(f"BROKEN {f.message}", file=sys.stderr)
                elif f.status == "new":
                    print(f"NEW {f.message}", file=sys.stderr)
    if broken:
        print(f"casf-proxy audit digest: {broken} broken chain(s): no digest written "
              "(run `casf-proxy audit verify`, see docs/audit.md runbook)", file=sys.stderr)
        return EXIT_FAILED
    out.append(digest.build(entries, store=store, created_at=now_iso(), day=day,
                            window=window))
    return EXIT_OK


# ------------------------------------------------------------ main


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casf-proxy",
                                     description="Inline policy-enforcing sidecar proxy")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="config file (default: $CASF_CONFIG)")

    p_run = sub.add_parser("run", help="run the proxy")
    with_config(p_run)
    p_run.add_argument("--workers", type=_positive, default=1, metavar="N",
                       help="N worker processes sharing the ports (SO_REUSEPORT; needs "
                       "REDIS_URL when N > 1)")
    # set by the supervisor for its workers (proxy/workers.py)
    p_run.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p_run.add_argument("--traffic-port", type=int, default=0, help=argparse.SUPPRESS)
    p_run.add_argument("--admin-port", type=int, default=0, help=argparse.SUPPRESS)
    p_run.add_argument("--decisions-port", type=int, default=0, help=argparse.SUPPRESS)
    p_run.set_defaults(func=cmd_run)

    p_val = sub.add_parser("validate", help="check the config and compile the policies")
    with_config(p_val)
    p_val.set_defaults(func=cmd_validate)

    p_pol = sub.add_parser("policy", help="policy tools")
    pol_sub = p_pol.add_subparsers(dest="policy_command", required=True)
    p_test = pol_sub.add_parser("test", help="run Rego test_* rules in a directory")
    p_test.add_argument("dir")
    p_test.add_argument("--v0-compatible", action="store_true",
                        help="accept Rego v0 syntax (as OPA's flag)")
    p_test.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")
    p_test.set_defaults(func=cmd_policy_test)

    p_audit = sub.add_parser("audit", help="audit trail tools")
    audit_sub = p_audit.add_subparsers(dest="audit_command", required=True)
    p_verify = audit_sub.add_parser("verify", help="verify the hash chains")
    with_config(p_verify)
    p_verify.add_argument("--chain", help="verify one chain only")
    p_verify.add_argument("--since", help="ISO-8601 start of a time window (inclusive)")
    p_verify.add_argument("--until", help="ISO-8601 end of a time window (exclusive)")
    p_verify.add_argument("--digest", metavar="FILE",
                          help="also check the store still holds the records a digest covers")
    p_verify.set_defaults(func=cmd_audit_verify)

    p_export = audit_sub.add_parser("export", help="the records as JSON lines on stdout, "
                                    "each verified against its chain as it is written")
    with_config(p_export)
    p_export.add_argument("--chain", help="export one chain only")
    p_export.add_argument("--since", help="ISO-8601: only records at or after (inclusive)")
    p_export.add_argument("--until", help="ISO-8601: only records before (exclusive)")
    p_export.add_argument("--follow", action="store_true",
                          help="keep polling for new records until SIGINT/SIGTERM")
    p_export.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                          help="with --follow: seconds between polls (0.05..60, default 1)")
    p_export.set_defaults(func=cmd_audit_export)

    p_migrate = audit_sub.add_parser("migrate", help="create or upgrade the audit schema "
                                     "(PostgreSQL with PG_DSN, else the SQLite file)")
    with_config(p_migrate)
    p_migrate.set_defaults(func=cmd_audit_migrate)

    p_digest = audit_sub.add_parser("digest", help="summarise every chain (optionally signed), "
                                    "or --verify a digest file")
    with_config(p_digest)
    p_digest.add_argument("--date", help="UTC day YYYY-MM-DD to cover (default: everything)")
    p_digest.add_argument("--sign", metavar="KEYFILE",
                          help="Ed25519 private key (PEM) to sign the digest with")
    p_digest.add_argument("--out", metavar="FILE", help="write the digest here (default: stdout)")
    p_digest.add_argument("--previous", metavar="FILE",
                          help="the last digest: check the store still holds what it covered "
                          "and name every chain it does not know")
    p_digest.add_argument("--verify", metavar="FILE", help="check a digest file instead")
    p_digest.add_argument("--key", metavar="KEYFILE",
                          help="with --verify: the signer's public (or private) key (PEM)")
    p_digest.set_defaults(func=cmd_audit_digest)
    return parser


def main(argv: list[str] | None = None) -> int:
    env = Environment.from_process()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_ERROR if exc.code not in (0, None) else EXIT_OK
    _setup_logging(env)
    try:
        code: int = args.func(args, env)
    except ConfigError as exc:
        _fail(args, f"config error: {exc}")
        return EXIT_ERROR
    except Exception as exc:
        _fail(args, f"error: {exc}")
        return EXIT_ERROR
    return code


def _fail(args: argparse.Namespace, message: str) -> None:
    """``run`` reports through the (JSON) log; the other commands print for a human."""
    if args.command == "run":
        logging.getLogger("casf").error("casf-proxy: %s", message)
    else:
        print(f"casf-proxy: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
