"""The history index: tables, migrations, indexing and the queries behind `harness history`.

The result JSON files stay the source of truth: the index holds, per file,
its identity (run id + sha256 of its bytes) and provenance, and every figure
of every finished phase as ``harness.analysis.figures`` defines it. It can be
dropped and rebuilt from the files at any time. Indexing a file twice adds
nothing (unique run id + file sha256, inserted with ON CONFLICT DO NOTHING),
also when several indexers run at once on one database.

SQLite (a file beside the results, nothing to start) or PostgreSQL (a URL,
for a fleet sharing one store); the same schema through SQLAlchemy Core,
created and upgraded by Alembic migrations shipped in this package.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from harness.analysis.figures import phase_figures
from harness.results import ResultError, RunResult, load

#: Environment variable naming the database URL (overridden by --db).
ENV = "HARNESS_HISTORY_DB"
MIGRATIONS = Path(__file__).parent / "migrations"
#: PostgreSQL advisory lock key taken while migrating (any constant, the same in every process).
_LOCK_KEY = 0x4B564D48

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
metadata = sa.MetaData()
runs = sa.Table(
    "runs", metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(80), nullable=False),
    sa.Column("file_sha256", sa.String(64), nullable=False),
    sa.Column("path", sa.Text(), nullable=False),
    sa.Column("suite", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("kernel", sa.String(255), nullable=False),
    sa.Column("host_class", sa.String(400), nullable=False),
    sa.Column("accelerator", sa.String(32), nullable=False),
    sa.Column("shard", sa.String(16), nullable=True),
    sa.Column("schema_version", sa.Integer(), nullable=False),
    sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("run_id", "file_sha256", name="uq_runs_run_file"),
    sa.Index("ix_runs_suite_started", "suite", "started_at"),
)
figures = sa.Table(
    "figures", metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("run_pk", _ID, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("workload", sa.String(200), nullable=False),
    sa.Column("params", sa.Text(), nullable=False),
    sa.Column("vm", sa.String(200), nullable=False),
    sa.Column("phase", sa.String(200), nullable=False),
    sa.Column("repetition", sa.Integer(), nullable=False),
    sa.Column("figure", sa.String(300), nullable=False),
    sa.Column("value", sa.Float(), nullable=False),
    sa.Column("unit", sa.String(40), nullable=False),
    sa.Index("ix_figures_run", "run_pk"),
    sa.Index("ix_figures_figure", "figure"),
)


class HistoryError(Exception):
    """The database cannot be used (unreachable, bad URL, newer schema): says what to do."""


def default_url(results_dir: Path) -> str:
    """HARNESS_HISTORY_DB, else a SQLite file beside the results."""
    return os.environ.get(ENV) or f"sqlite:///{results_dir / 'history.sqlite'}"


def _normalise(url: str) -> str:
    # psycopg 3 is the driver shipped with the harness; plain postgresql:// means it.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def safe_url(url: str) -> str:
    """The URL with any password hidden (for messages)."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(unparsable URL)"


def connect(url: str) -> Engine:
    """An engine on ``url``, migrated to the newest schema; HistoryError when unusable."""
    url = _normalise(url)
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise HistoryError(f"{url!r} is not a database URL (fix: sqlite:///PATH or "
                           "postgresql://USER@HOST:PORT/DB)") from exc
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise HistoryError(f"{safe_url(url)}: only SQLite and PostgreSQL are supported "
                           "(fix: sqlite:///PATH or postgresql://USER@HOST:PORT/DB)")
    args: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        args = {"connect_args": {"timeout": 60}}
    else:
        args = {"connect_args": {"connect_timeout": 10}}
    try:
        engine = sa.create_engine(url, **args)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise HistoryError(f"{safe_url(url)}: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    try:
        migrate(engine)
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise HistoryError(f"cannot use the history database {safe_url(url)}: {reason} "
                           f"(fix: check the URL given by --db or {ENV}, and that the "
                           "server is up and reachable)") from exc
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: readers never block the indexer; NORMAL sync is safe with WAL and much faster.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A transaction to migrate in, one migrator at a time: PostgreSQL's advisory
    lock inside it, or (SQLite) a lock file around it.

    The lock file is taken before the connection and released after the commit:
    released first, a second indexer read the schema version before the first's
    commit and created the tables again ("table runs already exists"); and a new
    file's first connection switches it to WAL, which wants the file to itself.
    """
    db = engine.url.database
    if engine.dialect.name == "sqlite" and db and db != ":memory:":
        with open(f"{db}.migrate.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                with engine.begin() as conn:
                    yield conn
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Held until this transaction ends, commit included.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        yield conn


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema with Alembic; refuse a newer one."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    with _migration_lock(engine) as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        if current is not None and current not in {s.revision for s in script.walk_revisions()}:
            raise HistoryError(
                f"{safe_url(str(engine.url))}: schema revision {current!r} is newer than this "
                f"harness knows (head {head!r}) (fix: use the harness version that wrote it)"
            )
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


# ---------------------------------------------------------------- indexing


def host_class(result: RunResult) -> str:
    """Runs of one class may be pooled or compared: CPU vendor, model and KVM MMU mode."""
    h = result.host
    return f"{h.cpu_vendor} {h.cpu_model} / {h.mmu_mode}"


def shard_of(result: RunResult) -> str | None:
    """The ``--shard K/N`` a run was made with, from its recorded command line."""
    argv = result.command_line
    for i, arg in enumerate(argv):
        if arg == "--shard" and i + 1 < len(argv):
            return argv[i + 1].replace(" ", "")
        if arg.startswith("--shard="):
            return arg.split("=", 1)[1].replace(" ", "")
    return None


def _figure_rows(result: RunResult) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for run in result.runs:
        if getattr(run, "warmup", False):
            continue  # recorded in the file, never compared: not a point of a trend
        w = result.workloads.get(run.workload)
        info = w.metrics if w is not None else {}
        attached_sets = [set(v.trace.probes_attached) for v in result.vms
                         if v.name == run.vm and v.trace is not None
                         and v.trace.tracer_status != "disabled"]
        attached = frozenset(set.union(*attached_sets)) if attached_sets else None
        params = json.dumps(run.params, sort_keys=True)
        for phase in run.phases:
            if phase.status != "ok":
                continue
            figs = phase_figures(phase, info, attached)
            for name, value in figs.values.items():
                rows.append({"workload": run.workload, "params": params, "vm": run.vm,
                             "phase": phase.name, "repetition": run.repetition,
                             "figure": name, "value": value, "unit": figs.units.get(name, "")})
    return rows


@dataclass
class IndexOutcome:
    """What one indexing pass did."""

    added: list[str]
    already: int
    problems: list[str]


def _files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.glob("*.json") if f.name != "schema.json")
        elif p.is_file():
            files.append(p)
        else:
            raise HistoryError(f"{p}: no such file or directory (fix: give result files or "
                               "directories of them)")
    return files


def _insert_run(conn: Connection, row: dict[str, Any]) -> int | None:
    """Insert a run row unless (run_id, file_sha256) is there; its id, or None if it was."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = (dialect.insert(runs).values(**row)
            .on_conflict_do_nothing(index_elements=["run_id", "file_sha256"])
            .returning(runs.c.id))
    got = conn.execute(stmt).scalar_one_or_none()
    return None if got is None else int(got)


def index(engine: Engine, paths: Sequence[Path], batch: int = 50) -> IndexOutcome:
    """Index result files (and directories' ``*.json``); files already indexed add nothing.

    A file that is not a readable result is reported in ``problems`` and skipped;
    the others are indexed. Each batch of files is one transaction.
    """
    files = _files(paths)
    with engine.connect() as conn:
        known = {r[0] for r in conn.execute(sa.select(runs.c.file_sha256))}
    outcome = IndexOutcome([], 0, [])
    pending: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []

    def flush() -> None:
        with engine.begin() as conn:
            for row, figs in pending:
                pk = _insert_run(conn, row)
                if pk is None:  # another indexer got there first
                    outcome.already += 1
                    continue
                if figs:
                    conn.execute(figures.insert(), [{**f, "run_pk": pk} for f in figs])
                outcome.added.append(row["run_id"])
        pending.clear()

    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            outcome.problems.append(f"{path}: cannot read: {exc.strerror}")
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha in known:
            outcome.already += 1
            continue
        try:
            result = load(path)
        except (ResultError, ValueError) as exc:
            outcome.problems.append(str(exc).splitlines()[0])
            continue
        known.add(sha)
        accels = sorted({v.accelerator for v in result.vms})
        row = {
            "run_id": result.run_id, "file_sha256": sha, "path": str(path.resolve()),
            "suite": result.suite.name, "status": result.status,
            "started_at": _utc(result.started_at),
            "finished_at": _utc(result.finished_at) if result.finished_at else None,
            "hostname": result.host.hostname, "kernel": result.host.kernel_release,
            "host_class": host_class(result), "accelerator": ",".join(accels) or "-",
            "shard": shard_of(result), "schema_version": result.schema_version,
            "indexed_at": datetime.now(UTC),
        }
        pending.append((row, _figure_rows(result)))
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    return outcome


def _utc(t: datetime) -> datetime:
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)


# ---------------------------------------------------------------- queries


@dataclass(frozen=True)
class RunRow:
    """One indexed run (the newest file of its run id)."""

    run_id: str
    path: str
    suite: str
    status: str
    started_at: datetime
    hostname: str
    kernel: str
    host_class: str
    shard: str | None


def _latest_per_run(rows: Sequence[Any]) -> list[Any]:
    # A run's file is rewritten as it goes (running -> complete): its newest row counts.
    newest: dict[str, Any] = {}
    for r in rows:
        if r.run_id not in newest or r.id > newest[r.run_id].id:
            newest[r.run_id] = r
    return sorted(newest.values(), key=lambda r: (_utc(r.started_at), r.run_id))


def list_runs(engine: Engine, suite: str, *, since: datetime | None = None,
              host: str | None = None, host_cls: str | None = None) -> list[RunRow]:
    """Indexed runs of ``suite`` (newest file per run id), oldest first."""
    q = sa.select(runs).where(runs.c.suite == suite)
    if since is not None:
        q = q.where(runs.c.started_at >= _utc(since))
    if host is not None:
        q = q.where(runs.c.hostname == host)
    if host_cls is not None:
        q = q.where(runs.c.host_class == host_cls)
    with engine.connect() as conn:
        rows = _latest_per_run(list(conn.execute(q)))
    return [RunRow(r.run_id, r.path, r.suite, r.status, _utc(r.started_at), r.hostname,
                   r.kernel, r.host_class, r.shard) for r in rows]


def baseline(engine: Engine, suite: str, *, host_cls: str | None = None,
             shard: str | None = None, exclude: Sequence[str] = ()) -> RunRow | None:
    """The last complete run of ``suite`` (of that host class and shard), or None."""
    done = [r for r in list_runs(engine, suite, host_cls=host_cls)
            if r.status == "complete" and r.run_id not in exclude
            and (shard is None or r.shard == shard)]
    return done[-1] if done else None


@dataclass(frozen=True)
class TrendPoint:
    """One run's value of one figure of one phase: the median over its repetitions."""

    run_id: str
    started_at: datetime
    hostname: str
    kernel: str
    series: str  # workload[params] vm/phase figure
    median: float
    n: int
    unit: str


def trend(engine: Engine, suite: str, *, metric: str | None = None,
          since: datetime | None = None, host: str | None = None) -> list[TrendPoint]:
    """A figure across complete runs: per run and phase, the median over repetitions.

    ``metric``: a figure name (``metric.first_touch_MiB_s``, ``exits.EPT_VIOLATION``) or a
    workload metric's bare name; None: every workload metric (``metric.*``).
    """
    chosen = {r.run_id: r for r in list_runs(engine, suite, since=since, host=host)
              if r.status == "complete"}
    if not chosen:
        return []
    q = (sa.select(runs.c.run_id, runs.c.id, figures.c.workload, figures.c.params,
                   figures.c.vm, figures.c.phase, figures.c.figure, figures.c.value,
                   figures.c.unit)
         .join(figures, figures.c.run_pk == runs.c.id)
         .where(runs.c.suite == suite, runs.c.status == "complete"))
    if metric is None:
        q = q.where(figures.c.figure.like("metric.%"))
    else:
        q = q.where(figures.c.figure.in_([metric, f"metric.{metric}"]))
    with engine.connect() as conn:
        rows = list(conn.execute(q))
    newest_pk: dict[str, int] = {}
    for r in rows:
        newest_pk[r.run_id] = max(newest_pk.get(r.run_id, r.id), r.id)
    groups: dict[tuple[str, str], tuple[list[float], str]] = {}
    for r in rows:
        if r.run_id not in chosen or r.id != newest_pk[r.run_id]:
            continue
        params = ",".join(f"{k}={v}" for k, v in sorted(json.loads(r.params).items()))
        series = f"{r.workload}{f'[{params}]' if params else ''} {r.vm}/{r.phase} {r.figure}"
        groups.setdefault((r.run_id, series), ([], r.unit))[0].append(float(r.value))
    out = []
    for (run_id, series), (values, unit) in groups.items():
        run = chosen[run_id]
        out.append(TrendPoint(run_id, run.started_at, run.hostname, run.kernel, series,
                              statistics.median(values), len(values), unit))
    return sorted(out, key=lambda p: (p.series, p.started_at, p.run_id))
