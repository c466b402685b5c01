"""The `headscreen` command. Training commands are loaded only when asked for,
so the service runs without the `train` extra (no torch)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from headscreen.daemon.config import Settings, example_toml, load_settings
from headscreen.daemon.storage_probe import EXIT_STORAGE_MISMATCH, StorageMismatch
from headscreen.db.states import StudyState
from headscreen.errors import HeadscreenError, TransientError
from headscreen.privacy import failure_reason, redact_secrets, withhold_values_in_logs

if TYPE_CHECKING:
    from headscreen.daemon.shadow import Comparison

log = logging.getLogger("headscreen")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = """\
exit codes:
  0    success
  1    runtime failure: the database, a peer, the disk or a port refused (e.g. the
       DICOM port is in use), or an unexpected error
  2    usage or configuration error: an unknown option or value, an invalid
       configuration file (the message names the key), a bad bundle, or
       no usable bundle (serve refuses to start without one)
  3    storage mismatch (serve, worker): storage_dir is not the storage the database's
       instances are in (no .headscreen-storage-id marker: a local folder where the
       shared mount should be; or another storage's marker); no job is taken.
       train: refused, the validation AUROC is below --min-val-auroc; no bundle
  130  interrupted (Ctrl-C)"""


class CommandFailed(HeadscreenError):
    """A runtime failure, worded for the operator (exit 1, not a usage error)."""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("headscreen")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    # Command-line options win over the file and the environment.
    overrides = {key: value for key in ("log_format", "log_level") if (value := getattr(args, key, None))}
    return settings.model_copy(update=overrides) if overrides else settings


def cmd_serve(args: argparse.Namespace) -> int:
    from headscreen.daemon.logs import configure_logging
    from headscreen.daemon.serve import serve

    settings = _settings(args)
    configure_logging(settings)
    withhold_values_in_logs()
    try:
        return serve(settings)
    except OSError as exc:
        if exc.filename is None and exc.errno in _LISTEN_ERRORS:
            raise CommandFailed(_listen_failure(settings, exc)) from None
        raise


_LISTEN_ERRORS = {
    errno.EADDRINUSE: "address already in use: another process listens there (stop it, or set another port)",
    errno.EADDRNOTAVAIL: "the address is not one of this host's (check bind_address)",
    errno.EACCES: "permission denied (ports below 1024 need privileges; 11112 and 2762 do not)",
}


def _listen_failure(settings: Settings, exc: OSError) -> str:
    ports = [settings.port]
    tls = getattr(getattr(settings, "receiver", None), "tls", None)
    if tls is not None and getattr(tls, "enabled", False):
        ports.append(tls.port)
    where = " or ".join(f"{settings.bind_address}:{port}" for port in ports)
    return f"cannot listen for DICOM on {where}: {_LISTEN_ERRORS[exc.errno or 0]}"


def cmd_worker(args: argparse.Namespace) -> int:
    """A worker on its own (e.g. on another machine sharing a PostgreSQL queue)."""
    from headscreen.daemon.worker import worker_process_main

    worker_process_main(_settings(args), args.index)  # sets up logging from the settings
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from headscreen.db.migrate import current_revision, upgrade

    settings = _settings(args)
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    print(f"database at revision {current_revision(settings.database_url)}")
    return 0


def cmd_config_example(args: argparse.Namespace) -> int:
    sys.stdout.write(example_toml())
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    # Printed settings end up in tickets and chat: passwords and tokens show as *** only.
    print(json.dumps(settings.redacted(), indent=2))
    return 0


def _sessions(settings: Settings):
    from headscreen.db.engine import make_engine, session_factory
    from headscreen.db.migrate import upgrade

    upgrade(settings.database_url)
    return session_factory(make_engine(settings.database_url))


def _score(value: float | None) -> str:
    """Significant digits: an MR bundle's scores are ~1e-5, where fixed decimals read 0."""
    return "-" if value is None else f"{value:.4g}"


def _fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def cmd_studies_list(args: argparse.Namespace) -> int:
    from headscreen.db import api

    settings = _settings(args)
    filters = api.StudyFilters(
        state=args.state, modality=args.modality, outliers_only=args.outliers, qc_failed_only=args.qc_failed,
        flagged=True if args.flagged else None, limit=args.limit, offset=args.offset,
    )
    with _sessions(settings)() as session:
        rows = api.list_studies(session, filters)
    if args.json:
        print(json.dumps([_row_dict(r) for r in rows], indent=2, default=str))
        return 0
    header = (f"{'study uid':<44} {'mod':<3} {'state':<9} {'inst':>5} {'score':>10} {'pct':>6} {'screen':>7} "
              f"{'pred':>5} {'age':>5} {'gap':>6} {'flag':<4} qc")
    print(header)
    for r in rows:
        screen = "-" if r.screen_positive is None else ("POS" if r.screen_positive else "neg")
        print(
            f"{r.study_instance_uid:<44.44} {_fmt(r.modality):<3} {r.state:<9} {r.instance_count:>5} "
            f"{_score(r.anomaly_score):>10} {_fmt(r.percentile):>6} {screen:>7} {_fmt(r.predicted_age):>5} "
            f"{_fmt(r.chronological_age):>5} {_fmt(r.age_gap):>6} {'yes' if r.flagged else '':<4} "
            f"{'; '.join(r.qc_reasons or [])}"
        )
    return 0


def _row_dict(row) -> dict:
    return {k: getattr(row, k) for k in row.__dataclass_fields__}


def cmd_studies_flag(args: argparse.Namespace) -> int:
    from headscreen.db import api

    settings = _settings(args)
    with _sessions(settings)() as session:
        api.set_flag(session, args.study_uid, flagged=not args.clear, comment=args.comment, actor=args.actor,
                     now=datetime.now(UTC))
    print(("cleared flag on " if args.clear else "flagged ") + args.study_uid)
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from headscreen.daemon.delivery import deliver_due
    from headscreen.db import api

    settings = _settings(args)
    sessions = _sessions(settings)
    with sessions() as session:
        count = api.resend_dead(session, args.actor, study_instance_uid=args.study_uid, now=datetime.now(UTC))
    print(f"{count} dead-lettered deliveries queued again")
    if count and not args.no_send:
        stats = deliver_due(sessions, settings)
        print(f"delivered {stats.delivered}, failed {stats.failed}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from headscreen.db import api

    settings = _settings(args)
    with _sessions(settings)() as session:
        print(json.dumps(api.counts(session), indent=2, default=str))
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    """The admin console on its own (the receiver and workers may run elsewhere)."""
    from headscreen.daemon.logs import configure_logging
    from headscreen.daemon.scheduler import bundle_refs
    from headscreen.daemon.web import run_web

    settings = _settings(args)
    configure_logging(settings)
    withhold_values_in_logs()
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run_web(settings, _sessions(settings), bundle_refs(settings))
    except SystemExit as exc:  # uvicorn exits 3 when it cannot start; its log line says why
        if exc.code in (0, None):
            raise
        raise CommandFailed(f"the web console did not start on {settings.web.bind_address}:{settings.web.port} "
                            "(the line above says why; a port in use is the usual cause)") from None


def _read_password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise HeadscreenError("the passwords differ")
    return first


def cmd_users_add(args: argparse.Namespace) -> int:
    from headscreen.db import api

    settings = _settings(args)
    password = _read_password(args)
    with _sessions(settings)() as session:
        user = api.create_user(session, args.name, password, args.role, actor=args.actor, now=datetime.now(UTC))
    print(f"user {user.username} added ({user.role})")
    return 0


def cmd_users_passwd(args: argparse.Namespace) -> int:
    from headscreen.db import api

    settings = _settings(args)
    password = _read_password(args)
    with _sessions(settings)() as session:
        api.set_password(session, args.name, password, actor=args.actor, now=datetime.now(UTC))
    print(f"password of {args.name} changed; their sessions are closed")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    from headscreen.db import api

    with _sessions(_settings(args))() as session:
        for user in api.list_users(session):
            print(f"{user.username:<32} {user.role:<7} {'disabled' if user.disabled else ''}")
    return 0


def cmd_bundles(args: argparse.Namespace) -> int:
    """Verify bundles (default), or list and change their roles (active, shadow, retired)."""
    if args.shadow or args.promote or args.retire:
        return _bundles_change(args)
    if args.list:
        return _bundles_list(args)
    return cmd_bundles_verify(args)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f} %"


def _bundles_list(args: argparse.Namespace) -> int:
    from headscreen.daemon.scheduler import bundle_refs
    from headscreen.daemon.shadow import comparisons, current_plan

    settings = _settings(args)
    with _sessions(settings)() as session:
        plan = current_plan(session, bundle_refs(settings))
        compared = comparisons(session, plan)
    if args.json:
        states = [{"key": s.bundle.key, "modality": s.bundle.modality, "role": s.role, "default": s.default,
                   "stale": s.stale, "manifest_sha256": s.bundle.manifest_sha256,
                   "recorded": None if s.recorded is None else _row_dict(s.recorded)} for s in plan.states]
        print(json.dumps({"bundles": states, "comparisons": [asdict(c) | {"disagree": c.disagree}
                                                             for c in compared]}, indent=2, default=str))
        return 0
    configured = {s.bundle.key for s in plan.states}
    for modality in plan.modalities:
        print(modality)
        for s in (s for s in plan.states if s.bundle.modality == modality):
            how = " (no role recorded: active as configured)" if s.default else ""
            if s.stale:
                how += " (a role was recorded for another manifest; not used)"
            elif s.recorded is not None:
                how += (f"  set {s.recorded.changed_at:%Y-%m-%d %H:%M} UTC by {s.recorded.changed_by}: "
                        f"{s.recorded.reason or ''}")
            sha = (s.bundle.manifest_sha256 or "-")[:16]
            print(f"  {s.role:<10} {s.bundle.key:<36} manifest {sha}{how}")
        for r in (r for r in plan.recorded if r.modality == modality and r.key not in configured):
            print(f"  {r.role:<10} {r.key:<36} (not configured here; set {r.changed_at:%Y-%m-%d} by {r.changed_by})")
        for c in (c for c in compared if c.modality == modality):
            print("  " + comparison_line(c))
    if not plan.modalities:
        print("no bundles configured")
    return 0


def comparison_line(c: Comparison) -> str:
    """An active and a shadow bundle compared (daemon.shadow.Comparison), in one line."""
    rho = "-" if c.spearman is None else f"{c.spearman:.3f}"
    line = (f"compare {c.active} (active) vs {c.shadow} (shadow): {c.studies_both} studies judged by both "
            f"({c.scored_both} scored); screen results: {c.both_positive} both positive, {c.both_negative} "
            f"both negative, {c.disagree} disagree; Spearman {rho}; positives {_percent(c.active_positive_share)}"
            f" vs {_percent(c.shadow_positive_share)}")
    if c.shadow_failed:
        line += f"; {c.shadow_failed} shadow runs failed"
    if c.age_studies:
        line += (f"; brain-age MAE on {c.age_studies} confirmed-normal studies {c.active_age_mae:.1f} y (active) vs "
                 f"{c.shadow_age_mae:.1f} y (shadow)")
    return line


def _bundles_change(args: argparse.Namespace) -> int:
    from headscreen.daemon import shadow
    from headscreen.daemon.scheduler import bundle_refs
    from headscreen.db import api

    if sum(bool(k) for k in (args.shadow, args.promote, args.retire)) != 1:
        raise HeadscreenError("give one of --shadow, --promote, --retire")
    key = args.shadow or args.promote or args.retire
    reason = (args.reason or "").strip()
    if not reason:
        if not args.shadow:
            raise HeadscreenError("--promote and --retire need --reason (it is kept in the audit trail)")
        reason = "run in shadow for comparison"
    settings = _settings(args)
    configured = bundle_refs(settings)
    now = datetime.now(UTC)
    try:
        with _sessions(settings)() as session:
            if args.promote:
                changed = shadow.promote(session, configured, key, args.actor, reason, args.old_active, now)
            elif args.shadow:
                changed = shadow.put_in_shadow(session, configured, key, args.actor, reason, now)
            else:
                changed = shadow.retire(session, configured, key, args.actor, reason, now)
    except (shadow.BundleNotConfigured, api.RoleConflict) as exc:
        raise HeadscreenError(str(exc)) from None
    if not changed:
        print(f"{key}: nothing to change")
    for row in changed:
        print(f"{row.key}: {row.role}")
    if args.promote:
        print("jobs claimed from now on use it (no restart needed)")
    return 0


def cmd_bundles_verify(args: argparse.Namespace) -> int:
    from headscreen.bundle import load_bundle
    from headscreen.inference import BundleRunner

    paths = args.paths or _settings(args).bundles
    for path in paths:
        runner = BundleRunner(load_bundle(Path(path)))
        m = runner.bundle.manifest
        print(f"ok  {m.key}  {m.modality}  {m.method}  sha256={runner.bundle.sha256[:16]}  "
              f"providers={runner.providers}")
    return 0


def _calibration_bundles(settings: Settings, wanted: str | None) -> list:
    from headscreen.bundle import load_bundle

    bundles = [load_bundle(Path(path)) for path in settings.bundles]
    if wanted is not None:
        bundles = [b for b in bundles if wanted in (b.manifest.key, b.manifest.name)]
        if not bundles:
            raise HeadscreenError(f"--bundle: no configured bundle is called {wanted!r}")
    return bundles


def _reference_line(ref) -> str:
    excluded = ", ".join(f"{n} {why}" for why, n in sorted(ref.provenance.get("excluded", {}).items())) or "none"
    state = "active" if ref.active else f"retired {ref.retired_at:%Y-%m-%d} by {ref.retired_by}: {ref.retire_reason}"
    return (f"#{ref.reference_id:<4} {ref.bundle_key}  {ref.grouping} {ref.station}  n={ref.n}  "
            f"threshold={ref.threshold:.4g} at specificity {ref.specificity:g}  rule={ref.rule} "
            f"(excluded: {excluded})  created {ref.created_at:%Y-%m-%d %H:%M} UTC by {ref.created_by}  [{state}]")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Site references: estimate (default), --list, --retire."""
    from headscreen.daemon.reference import calibrate
    from headscreen.db import api

    settings = _settings(args)
    sessions = _sessions(settings)
    if args.list:
        with sessions() as session:
            refs = api.list_site_references(session, include_retired=args.all)
        if args.json:
            print(json.dumps([_row_dict(r) for r in refs], indent=2, default=str))
        for ref in [] if args.json else refs:
            print(_reference_line(ref))
        if not refs and not args.json:
            print("no site references" + ("" if args.all else " in use (--all shows retired ones)"))
        return 0
    if args.retire is not None:
        if not args.reason:
            raise HeadscreenError("--retire needs --reason (it is kept in the audit trail)")
        with sessions() as session:
            try:
                ref = api.retire_site_reference(session, args.retire, args.actor, args.reason, datetime.now(UTC))
            except api.ReferenceNotFound as exc:
                raise HeadscreenError(str(exc)) from None
        print(f"retired site reference #{ref.reference_id} ({ref.bundle_key}, {ref.station})")
        return 0

    if args.first is not None and args.first < 1:
        raise HeadscreenError("--first: at least 1 study")
    grouping = args.grouping or settings.calibration.grouping
    minimum = settings.calibration.min_references
    created = 0
    for bundle in _calibration_bundles(settings, args.bundle):
        with sessions() as session:
            runs = calibrate(session, bundle, actor=args.actor, grouping=grouping, first_n=args.first,
                             station=args.station, outlier_mads=settings.calibration.outlier_mads,
                             dry_run=args.dry_run, now=datetime.now(UTC),
                             age_min_studies=settings.calibration.age_min_studies)
        if not runs:
            source = f"the first {args.first} scored studies" if args.first else "studies confirmed normal"
            print(f"{bundle.manifest.key}: no usable scores from {source}"
                  + (f" of station {args.station}" if args.station else ""))
        bundle_threshold = bundle.manifest.calibration.threshold
        for run in runs:
            found = run.estimate
            excluded = ", ".join(f"{n} {why}" for why, n in sorted(found.excluded.items())) or "none excluded"
            what = (f"{run.bundle_key} {grouping} {found.station}: n={found.n} of {found.considered} "
                    f"({found.rule}; {excluded}), threshold {found.threshold:.4g} (bundle {bundle_threshold:.4g}) "
                    f"at specificity {found.specificity:g}")
            if run.unchanged_from is not None:
                print(f"unchanged: {what}; site reference #{run.unchanged_from} already holds these studies")
                continue
            if run.created is None:
                print(f"would create: {what}")
            else:
                created += 1
                print(f"created site reference #{run.created.reference_id}: {what}")
            if found.n < minimum:
                print(f"  below min_references ({minimum}): in site mode this scanner stays calibrating")
            if found.brain_age is not None:
                print("  " + _brain_age_line(found.brain_age))
    if settings.calibration.mode != "site" and created:
        print('note: [calibration] mode is "bundle"; site references are used once it is "site"')
    return 0


def _brain_age_line(record: dict) -> str:
    """A site reference's brain-age bias (daemon.reference.estimate_age_bias), in words."""
    if record["applied"]:
        low, high = record["ci95"]
        return (f"brain age: corrected by {-record['offset_years']:+.2f} y (median gap of {record['n']} "
                f"confirmed-normal studies, 95 % interval {low:+.2f} to {high:+.2f})")
    return f"brain age: not corrected ({record['reason']})"


RESCREEN_ALIVE_S = 30.0  # a running rescreen run touched this recently has a live process
DEFAULT_MAX_IN_FLIGHT = 4


def cmd_rescreen(args: argparse.Namespace) -> int:
    """Re-screen a PACS archive's studies of a date range (daemon.rescreen); --list, --resume."""
    import threading

    from headscreen.daemon import rescreen
    from headscreen.daemon.logs import setup_logging
    from headscreen.daemon.scheduler import active_bundles, bundle_refs
    from headscreen.db import rescreen as runs

    settings = _settings(args)
    # Warnings only (a line per study would break the bar); pynetdicom's own errors repeat ours.
    setup_logging(args.log_format or settings.log_format, args.log_level or "WARNING")
    withhold_values_in_logs()
    if args.log_level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    if args.list:
        with _sessions(settings)() as session:
            listed = runs.list_runs(session)
        for run in listed:
            print(_rescreen_line(run))
        if not listed:
            print("no rescreen runs")
        return 0
    if args.per_hour is not None and args.per_hour <= 0:
        raise HeadscreenError("--per-hour: a number of studies above 0")
    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise HeadscreenError("--max-in-flight: at least 1")
    if args.resume is None:
        if not args.source or not args.since:
            raise HeadscreenError("rescreen needs --from NODE and --since DATE (or --resume ID, --list)")
        node = rescreen.node_named(settings, args.source)
        since, until = rescreen.checked_range(args.since, args.until)
        query = runs.RescreenQuery(node.name, "dicomweb" if node.kind == "stow" else "dimse", since, until,
                                   args.modality, args.record_only)
    sessions = _sessions(settings)
    with sessions() as session:
        if args.resume is not None:
            found_run = runs.get_run(session, args.resume)
            if found_run is None:
                raise HeadscreenError(f"--resume {args.resume}: no such rescreen run (see --list)")
            if found_run.state == "finished":
                print(_rescreen_line(found_run))
                return 0
            node = rescreen.node_named(settings, found_run.source)
            run_id: int | None = found_run.run_id
        else:
            run_id = runs.unfinished_run(session, query)
            found_run = None if run_id is None else runs.get_run(session, run_id)
    if found_run is not None and found_run.state == "running":
        # A process that works on a run touches it every second or so; two would race.
        silent_s = (datetime.now(UTC) - found_run.updated_at).total_seconds()
        if silent_s < RESCREEN_ALIVE_S:
            raise HeadscreenError(f"rescreen run #{found_run.run_id} is being worked on by another process "
                                  f"(last seen {silent_s:.0f} s ago); stop it first")
    # Options not given keep what a resumed run had; a new run starts unlimited, 4 in flight.
    per_hour = args.per_hour if args.per_hour is not None else found_run.per_hour if found_run else None
    max_in_flight = args.max_in_flight or (found_run.max_in_flight if found_run else DEFAULT_MAX_IN_FLIGHT)
    source = rescreen.source_for(settings, node)
    refs = bundle_refs(settings)
    if run_id is None:
        found = source.find(query.since, query.until, query.modality)  # an unreachable PACS stops here
        with sessions() as session:
            run_id = runs.create_run(session, query, per_hour, max_in_flight, args.actor)
            runs.add_found(session, run_id, rescreen.by_date(found))
        what = f"{query.since}..{query.until}" + (f", {query.modality}" if query.modality else "")
        print(f"rescreen run #{run_id}: {len(found)} studies found on {node.name} ({what})"
              + ("; results recorded only" if query.record_only else ""), flush=True)
    else:
        with sessions() as session:
            again = runs.resume_run(session, run_id, per_hour, max_in_flight, args.actor)
        print(f"resuming rescreen run #{run_id}" + (f" ({again} cut-short retrieves done again)" if again else ""),
              flush=True)
    stop = threading.Event()
    progress = rescreen.Progress(0, enabled=not args.no_progress)
    worker = rescreen.Rescreen(settings, sessions, run_id, source, lambda: active_bundles(sessions, refs), stop,
                               per_hour, max_in_flight, args.actor, on_progress=progress.show)
    with rescreen.SignalStop(stop):
        try:
            counts = worker.run()
        finally:
            progress.close()
    with sessions() as session:
        summary = runs.get_run(session, run_id)
        failed = runs.failed_items(session, run_id, limit=20)
    if summary is not None:
        print(_rescreen_line(summary))
    for study_uid, why in failed:
        print(f"  failed {study_uid}: {why or '-'}")
    if stop.is_set():
        print(f"stopped; resume with: headscreen rescreen --resume {run_id}")
        return EXIT_INTERRUPTED
    return EXIT_OK if not counts.get("failed") else EXIT_FAILURE


def _rescreen_line(run) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(run.counts.items())) or "nothing found"
    what = f"{run.since}..{run.until}" + (f" {run.modality}" if run.modality else "")
    return (f"#{run.run_id:<4} {run.state:<8} from {run.source} ({run.source_kind}) {what}"
            f"{' record-only' if run.record_only else ''}: {run.finished_items}/{run.found} finished ({counts}); "
            f"started {run.created_at:%Y-%m-%d %H:%M} UTC by {run.created_by}")


def cmd_demo(args: argparse.Namespace) -> int:
    from headscreen.daemon.demo import run_demo

    return run_demo(Path(args.work), timeout_s=args.timeout)


def cmd_training(args: argparse.Namespace, rest: list[str]) -> int:
    from headscreen.daemon.logs import setup_logging

    if not logging.getLogger().handlers:  # as logging.basicConfig: a host's handlers stay
        setup_logging(args.log_format or "text", args.log_level or "INFO")
    try:
        from headscreen.model_training import cli as training_cli
    except ImportError as exc:
        raise HeadscreenError(f"training needs the 'train' extra (pip install 'headscreen[train]'): {exc}") from None
    entry = {"train": training_cli.main, "evaluate": training_cli.evaluate_main}[args.command]
    return entry(rest)


def _logging_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--log-format", choices=("text", "json"), default=default,
                        help="log lines as text or one JSON object each (default: log_format of the configuration)")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=default,
                        help="default: log_level of the configuration")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headscreen", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"headscreen {_version()}")
    parser.add_argument("-c", "--config", type=Path, help="TOML configuration file (default: $HEADSCREEN_CONFIG)")
    _logging_options(parser, None)
    # The daemons also take the logging options after their name; SUPPRESS keeps a value
    # given before the name.
    daemon_logging = argparse.ArgumentParser(add_help=False)
    _logging_options(daemon_logging, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("serve", help="run the receiver, scheduler and workers",
                        parents=[daemon_logging]).set_defaults(fn=cmd_serve)
    worker = commands.add_parser("worker", help="run one worker process (for extra machines)", parents=[daemon_logging])
    worker.add_argument("--index", type=int, default=0)
    worker.set_defaults(fn=cmd_worker)

    db_cmd = commands.add_parser("db", help="database maintenance").add_subparsers(dest="db_command", required=True)
    db_cmd.add_parser("upgrade", help="apply migrations").set_defaults(fn=cmd_db_upgrade)

    config = commands.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    config.add_parser("example", help="print a complete commented example").set_defaults(fn=cmd_config_example)
    config.add_parser("check", help="validate and print the effective settings").set_defaults(fn=cmd_config_check)

    studies = commands.add_parser("studies", help="list and flag studies")
    studies_cmd = studies.add_subparsers(dest="studies_command")
    listing = studies_cmd.add_parser("list", help="list studies (default)")
    for p in (studies, listing):
        p.add_argument("--state", choices=[str(state) for state in StudyState])
        p.add_argument("--modality")
        p.add_argument("--outliers", action="store_true", help="screen-positive studies only")
        p.add_argument("--qc-failed", action="store_true", help="studies with QC reasons only")
        p.add_argument("--flagged", action="store_true")
        p.add_argument("--limit", type=int, default=100)
        p.add_argument("--offset", type=int, default=0)
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=cmd_studies_list)
    for name, clear in (("flag", False), ("unflag", True)):
        flag = studies_cmd.add_parser(name, help=f"{name} a study (audited)")
        flag.add_argument("study_uid")
        flag.add_argument("--comment", default="")
        flag.add_argument("--actor", default="cli")
        flag.set_defaults(fn=cmd_studies_flag, clear=clear)

    resend = commands.add_parser("resend", help="re-send dead-lettered deliveries")
    resend.add_argument("--study-uid")
    resend.add_argument("--actor", default="cli")
    resend.add_argument("--no-send", action="store_true", help="only queue them; the daemon sends")
    resend.set_defaults(fn=cmd_resend)

    commands.add_parser("web", help="run the admin web console alone",
                        parents=[daemon_logging]).set_defaults(fn=cmd_web)
    users = commands.add_parser("users", help="admin console users").add_subparsers(dest="users_command", required=True)
    for name, fn, helptext in (("add", cmd_users_add, "add a user (audited)"),
                               ("passwd", cmd_users_passwd, "change a user's password")):
        sub = users.add_parser(name, help=helptext)
        sub.add_argument("name")
        if name == "add":
            sub.add_argument("--role", choices=("admin", "viewer"), required=True)
        sub.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
        sub.add_argument("--actor", default="cli")
        sub.set_defaults(fn=fn)
    users.add_parser("list", help="list users").set_defaults(fn=cmd_users_list)

    commands.add_parser("status", help="counts of studies, jobs and deliveries").set_defaults(fn=cmd_status)
    bundles = commands.add_parser(
        "bundles", help="verify model bundles; list and change their roles (active, shadow; audited)",
        description="Without options: verify the bundles (default: the configured ones). Per modality one "
                    "bundle is active (its results are sent); shadow bundles score the same studies and are "
                    "recorded only. --list shows roles and how each shadow compares with the active bundle.")
    bundles.add_argument("paths", nargs="*", type=Path)
    bundles.add_argument("--list", action="store_true", help="roles per modality, with the comparisons")
    bundles.add_argument("--json", action="store_true", help="with --list: as JSON")
    bundles.add_argument("--shadow", metavar="KEY", help="run NAME-VERSION in shadow of its modality's active bundle")
    bundles.add_argument("--promote", metavar="KEY", help="make the shadow bundle NAME-VERSION active")
    bundles.add_argument("--retire", metavar="KEY", help="stop running a shadow bundle")
    bundles.add_argument("--old-active", choices=("shadow", "retired"), default="shadow",
                         help="with --promote: what the bundle active until now becomes (default shadow)")
    bundles.add_argument("--reason", help="why (kept in the audit trail; needed by --promote and --retire)")
    bundles.add_argument("--actor", default="cli")
    bundles.set_defaults(fn=cmd_bundles)

    calib = commands.add_parser(
        "calibrate", help="estimate per-scanner healthy references from this site's studies (audited)",
        description="Estimate a bundle's healthy reference distribution and threshold (at the bundle's "
                    "specificity) from this site's own studies, per scanner: from studies confirmed normal "
                    "in the console (default), or robustly from the first N scored studies (--first N). "
                    "Also lists and retires site references.")
    calib.add_argument("--bundle", help="NAME-VERSION or NAME of a configured bundle (default: all)")
    calib.add_argument("--station", help="one scanner group key (as --list and the console show it)")
    calib.add_argument("--first", type=int, metavar="N",
                       help="the first N scored studies of each scanner, outliers dropped (median + k x 1.4826 x MAD)")
    calib.add_argument("--grouping", choices=("station", "model"), help="default: [calibration] grouping")
    calib.add_argument("--dry-run", action="store_true", help="estimate and print, store nothing")
    calib.add_argument("--list", action="store_true", help="list site references in use")
    calib.add_argument("--all", action="store_true", help="with --list: retired ones too")
    calib.add_argument("--json", action="store_true", help="with --list: as JSON")
    calib.add_argument("--retire", type=int, metavar="ID", help="retire a site reference (audited)")
    calib.add_argument("--reason", help="why it is retired")
    calib.add_argument("--actor", default="cli")
    calib.set_defaults(fn=cmd_calibrate)

    rescreen = commands.add_parser(
        "rescreen", help="re-screen archived studies of a date range from a PACS, behind live studies",
        description="Query a PACS node (one of `destinations`: C-FIND, or QIDO-RS for a DICOMweb node) for the "
                    "studies of a date range, retrieve each (C-MOVE to our AE title, or WADO-RS) and screen it "
                    "with the active bundle, behind live studies. Studies already screened by the same bundle are "
                    "skipped. Ctrl-C or SIGTERM stops; the same command (or --resume ID) carries on. "
                    "`headscreen serve` (receiver and workers) must be running.")
    rescreen.add_argument("--from", dest="source", metavar="NODE", help="the PACS: a destination's name")
    rescreen.add_argument("--since", metavar="DATE", help="first study date, YYYY-MM-DD")
    rescreen.add_argument("--until", metavar="DATE", help="last study date, YYYY-MM-DD (default: today)")
    rescreen.add_argument("--modality", choices=("CT", "MR"), help="only studies with this modality")
    rescreen.add_argument("--record-only", action="store_true",
                          help="record the results only: nothing is sent to any destination")
    rescreen.add_argument("--per-hour", type=float, metavar="N",
                          help="start at most N retrieves an hour (default: no limit; a resumed run keeps its own)")
    rescreen.add_argument("--max-in-flight", type=int, metavar="N",
                          help=f"studies retrieved but not yet screened, at most (default {DEFAULT_MAX_IN_FLIGHT}; "
                               "a resumed run keeps its own)")
    rescreen.add_argument("--resume", type=int, metavar="ID", help="carry on a stopped run")
    rescreen.add_argument("--list", action="store_true", help="list rescreen runs and their progress")
    rescreen.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on a terminal only)")
    rescreen.add_argument("--actor", default="cli")
    rescreen.set_defaults(fn=cmd_rescreen)

    demo = commands.add_parser("demo", help="end-to-end demonstration with a local PACS")
    demo.add_argument("--work", default="demo-out")
    demo.add_argument("--timeout", type=float, default=240.0)
    demo.set_defaults(fn=cmd_demo)

    for name in ("train", "evaluate"):
        commands.add_parser(name, help=f"{name} models (needs the train extra)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command and returns its exit code (EXIT_CODES); argparse exits 2 itself
    on a usage error. An error is reported in one line, never as a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # The daemons set up logging; their last word is a log event like the others.
    logged = args.command in ("serve", "web", "worker")
    try:
        if args.command in ("train", "evaluate"):
            return cmd_training(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.fn(args)
    except StorageMismatch as exc:
        return _failed(str(exc), EXIT_STORAGE_MISMATCH, logged)
    except (CommandFailed, TransientError) as exc:
        return _failed(str(exc), EXIT_FAILURE, logged)
    except HeadscreenError as exc:
        return _failed(str(exc), EXIT_USAGE, logged)
    except KeyboardInterrupt:
        return _failed("interrupted", EXIT_INTERRUPTED, logged)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _failed(f"{where}{exc.strerror or type(exc).__name__}", EXIT_FAILURE, logged)
    except Exception as exc:
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError):
            # The driver's first line says what failed (refused, no such file); the lines after
            # it, and SQLAlchemy's own, may quote statements and their values.
            first = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()[:1]
            message = f"database: {redact_secrets(first[0]) if first else type(exc).__name__}"
            return _failed(message, EXIT_FAILURE, logged)
        # A bug: where it was raised, without its message (which may quote patient data).
        return _failed(f"unexpected error: {failure_reason(exc)}", EXIT_FAILURE, logged, exc)


def _failed(message: str, code: int, logged: bool, exc: BaseException | None = None) -> int:
    """Say why the command stops: a log event for a daemon (one JSON line with --log-format
    json; a traceback is kept as frames without messages), else one line on stderr."""
    from headscreen.daemon.logs import is_set_up

    if logged and is_set_up():
        log.error(message, exc_info=exc, extra={"action": "exit", "exit_code": code})
    else:
        print(f"headscreen: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
