"""The ``casf-proxy`` command line (contract §7).

Exit codes: 0 ok; 1 a check failed (deny, broken chain, failing test,
overlapping routes, policy that does not compile); 2 usage, config or
connectivity error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from proxy.config import Config, ConfigError, load_config
from proxy.settings import Environment

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def _config(args: argparse.Namespace, env: Environment) -> Config:
    path = args.config or env.config_path
    if not path:
        raise ConfigError("casf-proxy", "", "no config file given",
                          "pass -c/--config FILE or set CASF_CONFIG")
    return load_config(path, env)


def _setup_logging(env: Environment) -> None:
    level = getattr(logging, env.log_level.upper(), None)
    if not isinstance(level, int):
        level = logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


# ------------------------------------------------------------ run


async def _serve_forever(cfg: Config, env: Environment) -> None:
    from proxy.app import Runtime, serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime.open(cfg, env) as rt:
        serving = await serve(rt)
        logging.getLogger("casf").warning(
            "casf-proxy listening: traffic %s:%d → %s, admin %s:%d, mode %s, policy %s",
            cfg.traffic.host, serving.traffic_port, cfg.upstream.url, cfg.admin.host,
            serving.admin_port, rt.mode.current().value, rt.pipeline.policy_hash)
        await stop.wait()
        await serving.close()


def cmd_run(args: argparse.Namespace, env: Environment) -> int:
    cfg = _config(args, env)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve_forever(cfg, env))
    else:
        uvloop.run(_serve_forever(cfg, env))
    return EXIT_OK


# ------------------------------------------------------------ validate


def cmd_validate(args: argparse.Namespace, env: Environment) -> int:
    from proxy.policy_regorus import PolicyLoadError, RegorusEngine

    try:
        cfg = _config(args, env)
    except ConfigError as exc:
        if "overlap" in str(exc):
            print(f"casf-proxy validate: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise
    try:
        RegorusEngine(cfg.policy)
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


# ------------------------------------------------------------ audit verify


def cmd_audit_verify(args: argparse.Namespace, env: Environment) -> int:
    import sqlite3

    from proxy.audit.chain import Break, ChainCheck, verify_records
    from proxy.audit.sqlite import connect, iter_records
    from proxy.ports import AuditUnavailable

    cfg = _config(args, env)
    try:
        conn = connect(cfg.audit.sqlite_path, create=False)
    except AuditUnavailable as exc:
        print(f"casf-proxy audit verify: {exc}", file=sys.stderr)
        return EXIT_ERROR
    broken = 0
    chains = 0
    total = 0
    try:
        for item in verify_records(iter_records(conn, args.chain, args.since, args.until)):
            if isinstance(item, Break):
                broken += 1
                print(f"BROKEN {item}")
            elif isinstance(item, ChainCheck):
                chains += 1
                total += item.count
                print(f"ok chain {item.chain_id!r}: {item.count} records, "
                      f"last hash {item.prev_hash}")
    except sqlite3.Error as exc:
        print(f"casf-proxy audit verify: cannot read {cfg.audit.sqlite_path}: {exc}",
              file=sys.stderr)
        return EXIT_ERROR
    finally:
        conn.close()
    if broken:
        print(f"chain verification FAILED: {broken} broken chain(s)")
        return EXIT_FAILED
    print(f"chain verification ok: {chains} chain(s), {total} records")
    return EXIT_OK


# ------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casf-proxy",
                                     description="Inline policy-enforcing sidecar proxy")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="config file (default: $CASF_CONFIG)")

    p_run = sub.add_parser("run", help="run the proxy")
    with_config(p_run)
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
    p_verify.set_defaults(func=cmd_audit_verify)
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
        print(f"casf-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        print(f"casf-proxy: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
