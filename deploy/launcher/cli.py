"""The `flowtrail` command: up, down, status and demo for the local stack."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable

from deploy.launcher import export_cmd, tenants_cmd, trigger_cmd
from deploy.launcher.brokers import stop_cluster_nodes
from deploy.launcher.errors import LauncherError
from deploy.launcher.kafka import stop_kafka
from deploy.launcher.layout import ClusterSettings
from deploy.launcher.postgres import stop_postgres
from deploy.launcher.procs import cmdline, pid_alive, remove_file, terminate
from deploy.launcher.stack import StackPaths, read_api_key, read_stack_json, running_supervisor
from services.common.settings import CommonSettings

log = logging.getLogger("flowtrail.launcher")


def _between(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowtrail",
        description="Run Flowtrail locally: Kafka, PostgreSQL and the four Flowtrail services.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the stack (foreground unless --detach)")
    up.add_argument("--detach", action="store_true", help="run in the background; stop with `flowtrail down`")
    up.add_argument(
        "--partitions",
        type=_between(1, 256, "partitions"),
        help="partitions per topic (default: FLOWTRAIL_PARTITIONS or 4)",
    )
    up.add_argument("--no-demo", action="store_true", help="do not run the demo once the stack is healthy")
    up.add_argument(
        "--brokers",
        type=_between(1, 9, "brokers"),
        help="Kafka nodes of a local KRaft cluster, "
        "replication factor up to 3 (default: FLOWTRAIL_BROKERS or 1; docs/cluster.md)",
    )
    up.add_argument(
        "--executors", type=_between(1, 16, "executors"), help="executor processes (default: FLOWTRAIL_EXECUTORS or 1)"
    )
    up.add_argument("--projectors", type=_between(1, 16, "projectors"),
                    help="projector processes (default: FLOWTRAIL_PROJECTORS or 1)")  # fmt: skip
    up.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)

    down = sub.add_parser("down", help="stop the stack, Kafka and PostgreSQL")
    down.add_argument("--keep-infra", action="store_true", help="stop the services only; leave Kafka and PostgreSQL")

    status = sub.add_parser("status", help="show which components run and the consumer lag")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("demo", help="fire demo triggers at the running stack and show their progress")

    projector = sub.add_parser("projector", help="rebuild or verify the read models by replaying the ledger")
    jobs = projector.add_subparsers(dest="job", required=True, metavar="JOB")
    jobs.add_parser(
        "rebuild", help="replay the ledger from offset 0 into a shadow schema, compare, and swap it in atomically"
    )
    verify = jobs.add_parser("verify", help="replay into a shadow schema and compare with the live one; no swap")
    verify.add_argument("--keep-shadow", action="store_true", help="leave the shadow schema for inspection")
    verify.add_argument("--show", type=int, default=20, metavar="N",
                        help="differing keys listed per table, with the columns that differ (default 20)")  # fmt: skip
    jobs.add_parser("purge", help="apply each tenant's retention now (the projector also does this hourly)")

    secrets_cmd = sub.add_parser("secrets", help="the key that encrypts secrets at rest (docs/secrets.md)")
    secret_jobs = secrets_cmd.add_subparsers(dest="job", required=True, metavar="JOB")
    rotate = secret_jobs.add_parser(
        "rotate-key",
        help="add a new key to the key file (it encrypts from now on; the old ones still decrypt) and re-encrypt "
        "the secrets store and connector configs in PostgreSQL with it",
    )
    rotate.add_argument(
        "--reencrypt-only", action="store_true",
        help="add no key: re-encrypt with the current first key (after putting a new one first in "
        "FLOWTRAIL_SECRETS_KEY or the key file yourself)",
    )  # fmt: skip
    trigger_cmd.add_parser(sub)
    tenants_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    return parser


def _settings(args: argparse.Namespace) -> CommonSettings:
    settings = CommonSettings()
    if getattr(args, "partitions", None) is not None:
        settings = settings.model_copy(update={"partitions": args.partitions})
    return settings


def _cluster(args: argparse.Namespace) -> ClusterSettings:
    """FLOWTRAIL_BROKERS / _EXECUTORS / _PROJECTORS, each overridden by its flag."""
    flags = {name: getattr(args, name) for name in ("brokers", "executors", "projectors")}
    return ClusterSettings(**{name: value for name, value in flags.items() if value is not None})


def cmd_up(args: argparse.Namespace) -> int:
    from deploy.launcher.up import run_up, run_up_detached

    settings, cluster = _settings(args), _cluster(args)
    if args.detach and not args.daemon:
        return run_up_detached(settings, demo=not args.no_demo, partitions=args.partitions, cluster=cluster)
    return run_up(settings, demo=not (args.no_demo or args.daemon), cluster=cluster)


def cmd_down(args: argparse.Namespace) -> int:
    settings = _settings(args)
    paths = StackPaths.of(settings)
    stopped_something = False
    supervisor = running_supervisor(paths)
    if supervisor is not None:
        print(f"stopping Flowtrail (supervisor pid {supervisor}) ...", flush=True)
        if not terminate(supervisor, timeout=120.0):
            print("the supervisor did not stop within 120 s and was killed", file=sys.stderr)
        stopped_something = True
    # Services left behind by a supervisor that was killed outright.
    stack = read_stack_json(paths) or {}
    for name, info in (stack.get("services") or {}).items():
        pid = info.get("pid") if isinstance(info, dict) else None
        # A replica's name is its service's, numbered when there are several (executor-2).
        if isinstance(pid, int) and pid_alive(pid) and f"services.{name.partition('-')[0]}" in cmdline(pid):
            print(f"stopping leftover {name} (pid {pid}) ...", flush=True)
            terminate(pid, timeout=15.0)
            stopped_something = True
    remove_file(paths.stack_json)
    if running_supervisor(paths) is None:
        remove_file(paths.supervisor_pid)
    if not args.keep_infra:
        if stop_kafka(paths.state_dir):
            print("stopped Kafka")
            stopped_something = True
        nodes = stop_cluster_nodes(paths.state_dir)
        if nodes:
            print(f"stopped Kafka nodes {', '.join(map(str, nodes))}")
            stopped_something = True
        if stop_postgres(paths.state_dir):
            print("stopped PostgreSQL")
            stopped_something = True
    print("Flowtrail is stopped." if stopped_something else "Flowtrail is not running; nothing to stop.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from deploy.launcher.status import collect_status, render_status

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    status = asyncio.run(collect_status(_settings(args)))
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render_status(status))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from deploy.launcher.up import load_hook

    settings = _settings(args)
    api_key = read_api_key(StackPaths.of(settings))
    run_demo = load_hook("deploy.launcher.demo", "run_demo")
    asyncio.run(run_demo(settings, api_key))
    return 0


async def _purge(settings: CommonSettings) -> int:
    from datetime import UTC, datetime

    from services.common.db import connect
    from services.projector import retention

    conn = await connect(settings.database_url, settings.database_schema)
    try:
        result = await retention.purge(conn, datetime.now(UTC))
    finally:
        await conn.close()
    print(f"deleted {result.runs_deleted:,} runs past retention; blanked the payloads of {result.payloads_blanked:,}")
    return 0


def cmd_projector(args: argparse.Namespace) -> int:
    from services.projector import rebuild
    from services.projector.settings import ProjectorSettings

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    settings = ProjectorSettings()

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    if args.job == "purge":
        return asyncio.run(_purge(settings))
    swap = args.job == "rebuild"
    try:
        outcome = asyncio.run(
            rebuild.run(
                settings, swap=swap, progress=progress, keep_shadow=getattr(args, "keep_shadow", False),
                show=getattr(args, "show", 20),
            )
        )  # fmt: skip
    except rebuild.LogBehindReadModels as exc:
        raise LauncherError(str(exc)) from exc
    rate = outcome.events / outcome.seconds if outcome.seconds else 0.0
    print(f"replayed {outcome.events:,} events in {outcome.seconds:.1f}s ({rate:,.0f} events/s)")
    print(f"{'table':<20} {'live rows':>10} {'rebuilt rows':>12}  match")
    for table, ((live_rows, live_sum), (new_rows, new_sum)) in outcome.comparison.tables.items():
        print(f"{table:<20} {live_rows:>10,} {new_rows:>12,}  {'yes' if live_sum == new_sum else 'NO'}")
    if swap:
        print(f"swapped in the rebuilt schema; the previous one is kept as {outcome.swapped_to!r} "
              f"(drop it with: DROP SCHEMA \"{outcome.swapped_to}\" CASCADE)")  # fmt: skip
        return 0
    if not outcome.comparison.equal:
        # Each differing table: the first differing keys (run_id first where the table has one), the columns
        # that differ with both values, rows only one side has; then the runs those keys belong to.
        print(rebuild.describe(outcome.comparison))
    print("read models match the ledger" if outcome.comparison.equal else "read models DIFFER from the ledger")
    return 0 if outcome.comparison.equal else 1


async def _rotate_key(settings: CommonSettings, *, reencrypt_only: bool = False) -> int:
    from services.common.crypto import Keyring, add_key_to_file, key_id
    from services.common.db import connect
    from services.common.migrate import migrate
    from services.common.secretstore import reencrypt_stored

    if reencrypt_only:
        keyring = Keyring.from_settings(settings)
        print(f"re-encrypting with the current first key {keyring.primary} (of {', '.join(keyring.key_ids)})")
    elif settings.secrets_key_value:
        raise LauncherError(
            "FLOWTRAIL_SECRETS_KEY is set, so the key file is not used: put a new key (32 random bytes, base64url) "
            "first in that variable, keep the old ones after it, restart the services, then run "
            "`flowtrail secrets rotate-key --reencrypt-only`"
        )
    else:
        path = settings.secrets_key_path
        new, old = add_key_to_file(path)
        print(f"added key {key_id(new)} to {path}; it encrypts from now on")
        print(f"kept {len(old)} previous key(s) for decrypting: {', '.join(key_id(k) for k in old)}")
        keyring = Keyring([new, *old], path)
    conn = await connect(settings.database_url, settings.database_schema)
    try:
        await migrate(conn, settings.database_schema)
        done = await reencrypt_stored(conn, keyring)
    finally:
        await conn.close()
    print(f"re-encrypted {done.secrets} of {done.secrets_total} stored secret(s) and {done.connectors} of "
          f"{done.connectors_total} connector config(s) in schema {settings.database_schema!r}")  # fmt: skip
    print("not rewritten: flow definitions in the flows topic (immutable) and their projection in flow_versions; "
          "the previous keys stay in the file so they keep working")  # fmt: skip
    return 0


def cmd_secrets(args: argparse.Namespace) -> int:
    return asyncio.run(_rotate_key(_settings(args), reencrypt_only=args.reencrypt_only))


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "demo": cmd_demo, "projector": cmd_projector,
            "secrets": cmd_secrets, "trigger": trigger_cmd.run, "tenants": tenants_cmd.run,
            "export": export_cmd.run}  # fmt: skip


def _configure_logging(verbose: bool, daemon: bool) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if daemon else "flowtrail: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    if not verbose:
        for noisy in ("aiokafka", "httpx", "httpcore", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `flowtrail` console script."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, getattr(args, "daemon", False))
    try:
        code = COMMANDS[args.command](args)
    except LauncherError as exc:
        print(f"flowtrail: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":
    main()
