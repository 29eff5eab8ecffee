"""The ``harness`` command: run, compare, stacks, doctor, image, vm, probes, validate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from harness.paths import RESULTS_DIR
from harness.progress import Reporter
from harness.results import RunResult
from harness.spec import (
    SpecError,
    Suite,
    TraceSpec,
    WorkloadSpec,
    default_suite_path,
    did_you_mean,
    load_suite,
)

SUITE_ARG = click.argument("suite", type=click.Path(path_type=Path), required=False)


SET_OPTION = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="WORKLOAD.PARAM=VALUE",
    help="Override a workload parameter for this run (repeatable); checked against its bounds. "
    "vm.[NAME.]FIELD=VALUE sets a Linux VM's kernel, initrd, cmdline or kernel_package "
    "(docs/GUEST-KERNELS.md).",
)


class BadInput(click.ClickException):
    """A suite, workload or result file the harness cannot use: exit status 2, like compare's."""

    exit_code = 2


def _load(suite: Path | None, overrides: tuple[str, ...] = ()) -> Suite:
    try:
        loaded = load_suite(suite or default_suite_path(), overrides)
    except SpecError as exc:
        raise BadInput(str(exc)) from exc
    _check_kernel_packages(loaded)
    return loaded


def _check_kernel_packages(loaded: Suite) -> None:
    """Every VM's kernel_package is one apt knows (a local lookup in its package lists),
    so a misspelt package is bad input before anything is built or booted (exit 2)."""
    from harness.image.kernel import candidate_version
    from harness.image.linux import ImageBuildError

    for i, vm in enumerate(loaded.spec.vms):
        if vm.kernel_package is None:
            continue
        try:
            candidate_version(vm.kernel_package)
        except ImageBuildError as exc:
            raise BadInput(f"{loaded.path}: vms[{i}].kernel_package: {exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvm-mmu-harness")
def main() -> None:
    """Boot guests through libvirt, run memory workloads, trace host KVM per phase."""


@main.command()
@SUITE_ARG
@click.option(
    "--results-dir",
    type=click.Path(path_type=Path),
    default=RESULTS_DIR,
    show_default=True,
    help="Where <run-id>.json is written.",
)
@click.option("--no-trace", is_flag=True, help="Do not start the host tracer.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the result JSON on stdout instead of the table; no progress. With "
    "--allow-host-changes: a JSON array, one result per host configuration.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress; print only the result path.")
@click.option(
    "--stacks",
    metavar="PROBE,...",
    help="Count kernel stacks of these probes per phase ('stacks': the MMU default set); "
    "PROBE/N samples, a stack on every Nth event per CPU; PROBE@Rhz about R stacks a second "
    "per CPU, whatever the event rate (paths become estimates with a 95% interval; counts "
    "stay exact); overrides the suite's [trace] stacks.",
)
@click.option(
    "--tracer",
    "backend",
    type=click.Choice(["auto", "bpftrace", "libbpf"]),
    default=None,
    help="Tracer backend (overrides the suite's [trace] backend; default auto: libbpf where "
    "it builds and loads, bpftrace otherwise).",
)
@click.option(
    "--allow-host-changes",
    is_flag=True,
    help="Apply the suite's [[host_configs]] one after another (see `harness host plan`); "
    "the host is restored after each.",
)
@click.option(
    "--shard",
    metavar="K/N",
    help="Run only shard K of N of the suite's runs (deterministic; shards 1..N cover every "
    "run once; docs/REPORTS.md).",
)
@SET_OPTION
def run(
    suite: Path | None,
    results_dir: Path,
    no_trace: bool,
    as_json: bool,
    quiet: bool,
    stacks: str | None,
    backend: str | None,
    allow_host_changes: bool,
    shard: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Run SUITE (default: workloads/suites/default.toml) and write its result JSON."""
    from harness.progress import QuietReporter, RichReporter
    from harness.run import RunInterrupted, run_suite

    loaded = _load(suite, overrides)
    if shard is not None:
        from harness.shard import ShardError, parse_shard, select

        try:
            loaded = select(loaded, parse_shard(shard))
        except ShardError as exc:
            raise BadInput(f"--shard: {exc}") from None
    stack_probes = None
    if stacks is not None:
        stack_probes = [p.strip() for p in stacks.split(",") if p.strip()]
        try:  # the same checks as a suite's [trace] stacks
            TraceSpec(**{**loaded.spec.trace.model_dump(), "stacks": stack_probes})
        except ValueError as exc:
            raise click.BadParameter(_first_problem(exc), param_hint="--stacks") from None
    reporter = QuietReporter() if (as_json or quiet) else RichReporter()
    if loaded.spec.host_configs:
        if not allow_host_changes:
            names = ", ".join(c.name for c in loaded.spec.host_configs)
            raise BadInput(  # refused before anything starts, like any other bad input
                f"{loaded.path} lists host configurations ({names}) that change this host; "
                f"review them with `harness host plan {loaded.path}`, then pass "
                "--allow-host-changes"
            )
        _run_host_configs(loaded, results_dir, reporter, no_trace, stack_probes, backend,
                          as_json=as_json, quiet=quiet)
        return
    try:
        state = run_suite(
            loaded,
            results_dir=results_dir,
            reporter=reporter,
            trace=False if no_trace else None,
            command_line=sys.argv,
            stacks=stack_probes,
            backend=backend,
        )
    except RunInterrupted as exc:
        click.echo(
            f"interrupted by {exc}: VMs, overlays and the tracer were cleaned up; "
            "the partial result was kept",
            err=True,
        )
        sys.exit(128 + exc.signum)  # what a shell reports for a process killed by it
    except Exception as exc:  # the result file already says what happened
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    result = state.result
    _warn_host_left_changed(result)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    elif not quiet:
        _print_table(result)
    click.echo(f"result: {state.path}", err=as_json)
    if result.status != "complete":
        sys.exit(1)


def _print_table(result: RunResult) -> None:
    """The closing per-phase table on stdout."""
    from harness.progress import summary_table

    # Logs (CI, pipes) have no terminal width; keep the table readable there.
    Console(width=None if sys.stdout.isatty() else 180).print(summary_table(result))
    warm = sum(1 for r in result.runs if r.warmup)
    if warm:
        click.echo(f"{warm} warm-up repetition(s) recorded, never compared")
    for note in result.steady_state:
        click.echo(f"not steady: {note}")
    load = result.host_load
    if load is not None and load.busy:
        click.echo(
            f"busy host: processes outside this run used {(load.other_cpu_share or 0) * 100:.0f}%"
            " of its CPU time while it measured; its times carry that load, its counts do not"
        )


def _warn_host_left_changed(result: RunResult) -> None:
    """Say on stderr (whatever the output mode) that another run left the host changed."""
    from harness.host.mmuconfig import describe_left_changed

    for left in result.host_left_changed:
        click.secho(f"warning: {describe_left_changed(left)}", err=True, fg="yellow")


def _run_host_configs(
    loaded: Suite,
    results_dir: Path,
    reporter: Reporter,
    no_trace: bool,
    stacks: list[str] | None,
    backend: str | None = None,
    *,
    as_json: bool = False,
    quiet: bool = False,
) -> None:
    """The suite once per host configuration: apply, run, restore; one result file each.

    Prints what a plain run prints, per configuration: the table, or with
    ``as_json`` one JSON array of the results (also those finished before a failure).
    """
    import os

    from harness.host.mmuconfig import HostConfigBusy, HostConfigError, host_change_session
    from harness.paths import cache_dir
    from harness.run import RunInterrupted

    done: list[RunResult] = []
    failed = False
    try:
        # One host-changing run at a time: the lock is held until the last restore.
        with host_change_session(cache_dir()) as records:
            _reap_host_leftovers(records)
            restore_file = records / f"{os.getpid()}.json"
            failed = _apply_each(loaded, results_dir, reporter, no_trace, stacks, backend,
                                 restore_file, done, as_json=as_json, quiet=quiet)
    except RunInterrupted as exc:
        click.echo(f"interrupted by {exc}: the host configuration was restored", err=True)
        sys.exit(128 + exc.signum)
    except HostConfigBusy as exc:
        raise BadInput(f"host configuration: {exc}") from exc
    except HostConfigError as exc:
        raise click.ClickException(f"host configuration: {exc}") from exc
    finally:
        if as_json:
            click.echo("[\n" + ",\n".join(r.model_dump_json(indent=2) for r in done) + "\n]")
    if failed:
        sys.exit(1)


def _reap_host_leftovers(records: Path) -> None:
    """Restore what killed runs left applied (owner dead); refuse while an owner lives."""
    from harness.host.mmuconfig import HostConfigBusy, HostConfigError, reap_leftovers

    for left in reap_leftovers(records):
        if left.live_owner is not None:
            raise HostConfigBusy(left.description)
        click.echo(f"restored what a killed run left: {left.description}", err=True)
        if left.errors:
            raise HostConfigError(
                f"{left.path}: {'; '.join(left.errors)}; the host is not as it was before "
                "that run: fix the cause, then run `harness host restore`"
            )


def _apply_each(
    loaded: Suite,
    results_dir: Path,
    reporter: Reporter,
    no_trace: bool,
    stacks: list[str] | None,
    backend: str | None,
    restore_file: Path,
    done: list[RunResult],
    *,
    as_json: bool,
    quiet: bool,
) -> bool:
    """Each host configuration in turn: apply, run, restore. True when a run failed."""
    from harness.host.mmuconfig import HostConfigError, HostConfigurator, plan
    from harness.results import write_atomic
    from harness.run import run_suite

    failed = False
    for cfg in loaded.spec.host_configs:
        planned = plan(cfg)
        click.echo(planned.describe(), err=True)
        conf = HostConfigurator(restore_file=restore_file)
        with conf.applied(planned) as record:
            state = run_suite(loaded, results_dir=results_dir, reporter=reporter,
                              trace=False if no_trace else None, command_line=sys.argv,
                              stacks=stacks, host_config=record, backend=backend)
        state.result.host_config = record  # now with restored / restore_errors
        write_atomic(state.result, state.path)
        done.append(state.result)
        if not (as_json or quiet):
            _print_table(state.result)
        _warn_host_left_changed(state.result)
        click.echo(f"result ({cfg.name}): {state.path}", err=as_json)
        if record.restore_errors:
            raise HostConfigError(
                "restore failed: " + "; ".join(record.restore_errors) + f"; the restore "
                f"record {restore_file} is kept: fix the cause, then run `harness host restore`"
            )
        failed |= state.result.status != "complete"
    return failed


@main.command()
@click.option("--fix", is_flag=True, help="Install packages and start services that are missing.")
def doctor(fix: bool) -> None:
    """Check this host's prerequisites, one line each; exit 1 if a required one is missing."""
    from harness.host import doctor as doc

    checks = doc.run_checks()
    if fix and any(not c.ok for c in checks):
        doc.apply_fixes(checks, lambda line: click.echo(f"fix: {line}", err=True))
        checks = doc.run_checks()
    for line in doc.render(checks):
        click.echo(line)
    if any(c.required and not c.ok for c in checks):
        sys.exit(1)


@main.group()
def image() -> None:
    """Build guest images."""


@image.command("build")
@click.argument("name", type=click.Choice(["linux", "windows", "cloud-standin"]))
@click.option("--force", is_flag=True, help="Rebuild even if the recipe has not changed.")
@click.option("--iso", type=click.Path(path_type=Path), help="windows: the Windows ISO.")
@click.option("--virtio-iso", type=click.Path(path_type=Path),
              help="windows: the virtio-win drivers ISO.")
@click.option("--edition", default="Windows 11 Pro", show_default=True,
              help="windows: the image name inside the ISO's install.wim.")
@click.option("--iso-sha256", help="windows: the Windows ISO's expected sha256.")
@click.option("--kernel-package", metavar="NAME",
              help="linux: the default image with another Debian kernel package (e.g. "
              "linux-image-amd64): its vmlinuz and an initramfs of its own virtio modules, "
              "on the same root file system; a VM uses it with kernel_package = NAME.")
def image_build(
    name: str, force: bool, iso: Path | None, virtio_iso: Path | None, edition: str,
    iso_sha256: str | None, kernel_package: str | None = None,
) -> None:
    """Build the NAME image (cached, keyed by a digest of its recipe).

    windows: the administrator password comes from $HARNESS_WINDOWS_PASSWORD or
    the file named by $HARNESS_WINDOWS_PASSWORD_FILE, never an option
    (docs/WINDOWS.md).
    """
    from harness.image.linux import build_linux_image
    from harness.run import RunInterrupted, signals_raise

    if kernel_package is not None and name != "linux":
        raise click.BadParameter(f"applies to the linux image only, not {name}",
                                 param_hint="--kernel-package")
    if name == "windows":
        _build_windows(iso, virtio_iso, edition, iso_sha256, force)
        return
    if name == "cloud-standin":
        _build_cloud_standin(force)
        return
    if kernel_package is not None:
        _build_kernel_variant(kernel_package, force)
        return

    try:
        # SIGTERM too unwinds the build: its staging directory and commands go with it.
        with signals_raise():
            img = build_linux_image(force=force, progress=lambda s: click.echo(s, err=True))
    except RunInterrupted as exc:
        click.echo(f"interrupted by {exc}: the partial build was removed", err=True)
        sys.exit(128 + exc.signum)
    click.echo(f"{img.name} {img.digest[:12]} {img.directory}")


def _build_cloud_standin(force: bool) -> None:
    """`harness image build cloud-standin`: the stand-in for a vendor cloud image."""
    from harness.image.cloud_standin import build_cloud_standin
    from harness.run import RunInterrupted, signals_raise

    try:
        with signals_raise():
            img = build_cloud_standin(force=force, progress=lambda s: click.echo(s, err=True))
    except RunInterrupted as exc:
        click.echo(f"interrupted by {exc}: the partial build was removed", err=True)
        sys.exit(128 + exc.signum)
    click.echo(f"{img.name} {img.digest[:12]} {img.disk}")


def _build_kernel_variant(package: str, force: bool) -> None:
    """`harness image build linux --kernel-package NAME`: the image, then its kernel variant."""
    from harness.image.kernel import build_kernel_variant, check_package_name
    from harness.image.linux import ImageBuildError, build_linux_image
    from harness.run import RunInterrupted, signals_raise

    if (problem := check_package_name(package)) is not None:
        raise click.BadParameter(f"{problem}; e.g. linux-image-amd64",
                                 param_hint="--kernel-package")
    say = lambda s: click.echo(s, err=True)  # noqa: E731
    try:
        with signals_raise():
            img = build_linux_image(progress=say)
            variant = build_kernel_variant(package, force=force, progress=say)
    except RunInterrupted as exc:
        click.echo(f"interrupted by {exc}: the partial build was removed", err=True)
        sys.exit(128 + exc.signum)
    except ImageBuildError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2 if str(exc).startswith("no package") else 1)
    click.echo(f"{img.name} {img.digest[:12]} {img.directory}")
    click.echo(f"kernel {variant.release} ({variant.package} {variant.package_version}) "
               f"{variant.directory}")


def _build_windows(
    iso: Path | None, virtio_iso: Path | None, edition: str, iso_sha256: str | None, force: bool
) -> None:
    """`harness image build windows`: bad input exits 2 before anything boots."""
    from harness.image.windows import WindowsImageError
    from harness.image.windows_build import build_windows_image, check_inputs, run_installer

    try:
        inputs = check_inputs(iso, virtio_iso, edition, iso_sha256=iso_sha256)
    except WindowsImageError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    img = build_windows_image(
        inputs, run_installer, progress=lambda s: click.echo(s, err=True), force=force
    )
    click.echo(f"windows {img.digest[:12]} {img.directory}")


@main.group()
def cache() -> None:
    """Look after the cache (HARNESS_CACHE, default /var/cache/kvm-harness)."""


@cache.command("prune")
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
def cache_prune(dry_run: bool) -> None:
    """Remove images of other recipes, loaders of other kernels, and dead builds' leftovers.

    What a live process still uses (the base disk of a running VM, a running
    loader) is kept. The current image and loader, downloaded packages and
    run directories (reaped by the next run) are never touched.
    """
    from harness.image import cache as image_cache
    from harness.image import cloud_standin
    from harness.image.linux import IMAGE_NAME, recipe_digest
    from harness.paths import cache_root
    from harness.trace import libbpf

    root = cache_root()
    current = {IMAGE_NAME: recipe_digest(),
               cloud_standin.IMAGE_NAME: cloud_standin.recipe_digest()}
    # Looking creates nothing: cache_dir() and images_root() would make what is missing.
    found = (
        image_cache.prunable(current, root)
        if (root / "images").is_dir() else []
    ) + (libbpf.prunable_builds(root) if root.is_dir() else [])
    freed = kept = 0
    for entry in found:
        size = f"{entry.size / 1e6:.1f} MB"
        if entry.in_use_by is not None:
            kept += 1
            click.echo(f"kept         {entry.path} ({size}): {entry.why}; "
                       f"in use by pid {entry.in_use_by}")
            continue
        if not dry_run:
            image_cache.remove(entry)
        freed += entry.size
        click.echo(f"{'would remove' if dry_run else 'removed':12} {entry.path} ({size}): "
                   f"{entry.why}")
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {freed / 1e6:.1f} MB" + (f"; {kept} kept, in use" if kept else ""))


@main.group()
def vm() -> None:
    """Inspect the VMs a suite defines."""


@vm.command("xml")
@SUITE_ARG
@click.option("--vm", "vm_name", help="Only this VM of the suite.")
def vm_xml(suite: Path | None, vm_name: str | None) -> None:
    """Print the domain XML the harness would start for each VM (like virt-install --print-xml).

    One VM: its <domain> document, ready for `virsh define`. Several: one
    <domains> document with a comment naming each VM before its <domain>
    (`--vm NAME` prints that one alone).
    """
    from harness.host.facts import choose_accelerator, collect_host_facts
    from harness.preview import preview_document, preview_domains

    loaded = _load(suite)
    names = [v.name for v in loaded.spec.vms]
    if vm_name is not None and vm_name not in names:
        raise BadInput(
            f"{loaded.path}: no VM named {vm_name!r}{did_you_mean(vm_name, names)} "
            f"(fix: --vm one of {', '.join(names)})"
        )
    facts = collect_host_facts()
    domains = preview_domains(loaded, lambda req: choose_accelerator(req, facts)[0])
    click.echo(preview_document(loaded, domains, only=vm_name), nl=False)


@main.group()
def host() -> None:
    """Host MMU configurations a suite lists (``[[host_configs]]``): plan and restore."""


@host.command("plan")
@SUITE_ARG
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), hidden=True,
              help="Read /sys under this directory (tests lay out a sysfs tree there).")
def host_plan(suite: Path | None, root: Path) -> None:
    """Print what each host configuration of SUITE would change and how; change nothing."""
    from harness.host.mmuconfig import HostConfigError, plan

    loaded = _load(suite)
    if not loaded.spec.host_configs:
        click.echo(f"{loaded.path}: no [[host_configs]]; the suite runs on the host as it is")
        return
    impossible: list[str] = []
    for i, cfg in enumerate(loaded.spec.host_configs):
        try:
            planned = plan(cfg, root)
        except HostConfigError as exc:
            raise BadInput(f"{loaded.path}: host_configs[{i}]: {exc}") from exc
        click.echo(planned.describe())
        if planned.impossible:
            impossible.append(cfg.name)
    if impossible:
        raise BadInput(  # the suite asks what this host cannot do: bad input, exit 2
            f"not applicable on this host: {', '.join(impossible)} (see the reasons above)"
        )
    click.echo(f"apply with: harness run {loaded.path} --allow-host-changes "
               "(each configuration in turn, the host restored after)")


@host.command("restore")
@click.option("--root", type=click.Path(path_type=Path), default=None, hidden=True,
              help="Find /sys under this directory (tests lay out a sysfs tree there).")
def host_restore(root: Path | None) -> None:
    """Put back host configurations that killed runs left applied.

    Only records whose owner process is gone are restored; a live run's
    settings are its own (exit 2, naming its pid), as is a host-changing run
    holding the lock now.
    """
    from harness.host.mmuconfig import (
        HostConfigBusy,
        HostConfigError,
        host_change_session,
        reap_leftovers,
    )
    from harness.paths import cache_dir

    try:
        with host_change_session(cache_dir()) as records:
            found = reap_leftovers(records, root=root)
    except HostConfigBusy as exc:
        raise BadInput(str(exc)) from exc
    except HostConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if not found:
        click.echo(f"nothing to restore (no records in {records})")
        return
    for left in found:
        click.echo(f"{left.path}: {left.description}")
        for err in left.errors:
            click.echo(f"  error: {err}", err=True)
    if live := [left for left in found if left.live_owner is not None]:
        raise BadInput("not restored, their runs are alive: " + ", ".join(
            f"pid {left.live_owner}" for left in live) + " (fix: wait for them to end)")
    if any(left.errors for left in found):
        raise click.ClickException("restore incomplete (see the errors above); the records "
                                   "are kept for another `harness host restore`")
    click.echo("host configuration restored")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def probes(as_json: bool) -> None:
    """List the probe catalogue and whether each probe can attach here, per tracer backend.

    The first column is each probe's name as suites ([trace] probes, stacks) and
    `run --stacks` take it; the target is what the tracer attaches to.
    """
    from harness.trace.backend import BpftraceBackend, LibbpfBackend
    from harness.trace.libbpf import LibbpfUnavailable, build
    from harness.trace.probes import CATALOGUE, GROUPS, STACK_GROUP, HostView, ProbeStatus

    view = HostView.probe()
    status = BpftraceBackend().availability(list(CATALOGUE), view)
    try:
        lb: list[ProbeStatus] | str = LibbpfBackend(build()).availability(list(CATALOGUE), view)
    except LibbpfUnavailable as exc:
        lb = f"libbpf backend unavailable: {exc}"

    def one(s: ProbeStatus) -> dict[str, object]:
        return {"available": s.available, "attach": s.attach, "reason": s.reason}

    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": s.probe.name,
                        "kind": s.probe.kind,
                        "target": s.probe.target,
                        "category": s.probe.category,
                        "question": s.probe.question,
                        # bpftrace's, as before; every backend's under "backends"
                        "available": s.available,
                        "reason": s.reason,
                        "backends": {
                            "bpftrace": one(s),
                            "libbpf": one(lb[i]) if not isinstance(lb, str)
                            else {"available": False, "attach": None, "reason": lb},
                        },
                    }
                    for i, s in enumerate(status)
                ],
                indent=2,
            )
        )
        return
    if isinstance(lb, str):
        click.echo(lb)
    # The name column is what suites' [trace] probes/stacks and `run --stacks` take.
    width = max(len(s.probe.name) for s in status)
    click.echo(f"{'name':<{width}} {'bpftrace':<9} {'libbpf':<7} {'kind':<10} {'target':<36} "
               "why (bpftrace | libbpf)")
    for i, s in enumerate(status):
        other = None if isinstance(lb, str) else lb[i]
        mark = "ok" if s.available else "no"
        lmark = "-" if other is None else ("ok" if other.available else "no")
        why = s.reason if other is None else f"{s.reason} | {other.reason}"
        click.echo(f"{s.probe.name:<{width}} {mark:<9} {lmark:<7} {s.probe.kind:<10} "
                   f"{s.probe.target:<36} {why}")
    click.echo(f"groups (also accepted by name): {', '.join(GROUPS)}; "
               f"for stacks also {STACK_GROUP!r} (the MMU default set)")


def _first_problem(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return str(errors()[0].get("msg", exc)).removeprefix("Value error, ")
    return str(exc)


def _field_problem(exc: ValueError) -> str:
    """``field.path: message`` of a pydantic error's first problem."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(x) for x in first.get('loc', ()))}: {first.get('msg', '')}"
    return str(exc)


def _threshold(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    """``5%`` or the fraction ``0.05`` (as compare's JSON stores it) -> 0.05."""
    text = value.strip()
    percent = text.endswith("%")
    try:
        number = float(text.removesuffix("%"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a percentage, e.g. 5%") from None
    if not percent and number >= 1:
        # 5 could mean 5% or 500%: refuse rather than guess.
        raise click.BadParameter(
            f"{value!r}: a bare number is a fraction (0.05 = 5%); write {value.strip()}% "
            f"for {value.strip()} percent"
        )
    fraction = number / 100 if percent else number
    if not 0 <= fraction < 10:
        raise click.BadParameter(f"{value!r}: must be between 0% and 1000%")
    return fraction


def _output_problem(output: Path) -> str | None:
    """Why ``output`` cannot take a report (with the fix), or None."""
    if output.is_dir():
        return f"is a directory (fix: name a file in it, e.g. --output {output / 'ab.md'})"
    parent = output.parent
    if not parent.is_dir():
        return f"folder {parent} does not exist (fix: create it first: mkdir -p {parent})"
    return None


def _side_paths(spec: str) -> list[Path]:
    """A side: comma-separated files, directories or glob patterns."""
    import glob

    paths: list[Path] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        hits = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not hits:
            raise click.BadParameter(f"{part!r} matches no file", param_hint="BASE/CANDIDATE")
        paths.extend(Path(h) for h in hits)
    return paths


@main.command()
@click.argument("base")
@click.argument("candidate")
@click.option(
    "--threshold", default="5%", show_default=True, callback=_threshold,
    help="Smallest change (of the ratio of geometric means) that can be a regression or "
    "improvement: a percentage (5%) or a fraction below 1 (0.05, as the JSON report stores it).",
)
@click.option(
    "--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
    show_default=True, help="Level for the corrected p-value (q).",
)
@click.option(
    "--test", "test_name", type=click.Choice(["welch", "mann-whitney"]), default="welch",
    show_default=True,
    help="welch: Welch's t on per-boot mean log values (2+ boots a side); mann-whitney: "
    "rank test on the same boot summaries (8+ boots).",
)
@click.option(
    "--correction", type=click.Choice(["bh", "holm"]), default="bh", show_default=True,
    help="For the findings listed: bh (Benjamini-Hochberg false discovery rate) or holm "
    "(family-wise). The exit status always uses Holm.",
)
@click.option(
    "--unit", type=click.Choice(["boot", "repetition"]), default="boot", show_default=True,
    help="The independent sample: boot (repetitions of one boot are averaged first) or "
    "repetition (older results, or to see what pooling would claim; it understates noise).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "md", "json"]), default="table",
    show_default=True,
)
@click.option("--output", type=click.Path(path_type=Path), help="Write the report here.")
@click.option(
    "--allow-mismatch", is_flag=True,
    help="Compare even if guest image, accelerator, VM size or probes differ.",
)
def compare(
    base: str,
    candidate: str,
    threshold: float,
    alpha: float,
    test_name: str,
    correction: str,
    fmt: str,
    output: Path | None,
    allow_mismatch: bool,
    unit: str,
) -> None:
    """Compare result sets BASE and CANDIDATE (kernel A vs B); exit 1 on a regression.

    Each side is a result file, a directory of them, a glob pattern, or a
    comma-separated list of those; the boots of all its runs pool together
    (warm-up repetitions are shown, never compared).

    \b
    Exit status:
      0  no regression
      1  a regression: a figure whose Holm-corrected (family-wise) q < alpha AND
         whose change passes --threshold, or a phase that failed on the
         candidate only. With nothing changed, P(exit 1) <= alpha for the
         whole comparison, however many figures it tests.
      2  bad input, an unfair comparison, or no verdict possible (nothing
         could be tested: e.g. one boot a side); never 0 for "not tested"
    The findings listed use --correction (default BH: more findings, a bounded
    share of them false); a listed regression that fails Holm says so.
    """
    from harness.analysis import compare as cmp
    from harness.analysis import render
    from harness.analysis.resultset import InputError, load_side
    from harness.textsafe import json_printable, printable

    if output is not None and (problem := _output_problem(output)):
        # Before the work, and never exit 1: that status means "regression".
        click.echo(f"harness compare: --output {output}: {problem}", err=True)
        sys.exit(cmp.EXIT_BAD_INPUT)
    try:
        report = cmp.compare(
            load_side("base", _side_paths(base)),
            load_side("candidate", _side_paths(candidate)),
            alpha=alpha,
            threshold=threshold,
            test="mann-whitney" if test_name == "mann-whitney" else "welch",
            correction="holm" if correction == "holm" else "bh",
            allow_mismatch=allow_mismatch,
            unit="repetition" if unit == "repetition" else "boot",
        )
    except (InputError, click.BadParameter) as exc:
        click.echo(f"harness compare: {printable(str(exc), multiline=True)}", err=True)
        sys.exit(cmp.EXIT_BAD_INPUT)
    # Names, frames and errors in the report come from result files of other hosts.
    text = render.FORMATS[fmt](report)
    text = json_printable(text) if fmt == "json" else printable(text, multiline=True)
    if output is not None:
        try:
            output.write_text(text)
        except OSError as exc:  # e.g. a full disk, or the folder went away meanwhile
            click.echo(f"harness compare: --output {output}: cannot write: {exc.strerror} "
                       "(fix: give a writable file path)", err=True)
            sys.exit(cmp.EXIT_BAD_INPUT)
        click.echo(f"{printable(render.headline(report))}; report: {output}", err=True)
    else:
        click.echo(text, nl=False)
    sys.exit(report.exit_status)


@main.command("plan")
@click.argument("pilot", nargs=-1, required=True)
@click.option("--effect", default="5%", show_default=True, callback=_threshold,
              help="The change to be found: a percentage (5%) or a fraction below 1.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.05, show_default=True)
@click.option("--per-figure", is_flag=True,
              help="Plan each figure at alpha alone (the exit status corrects across all).")
@click.option("--figure", "pattern", default="*", show_default=True,
              help="Only figures matching this glob, e.g. 'metric.*'.")
def plan_cmd(pilot: tuple[str, ...], effect: float, alpha: float, per_figure: bool,
             pattern: str) -> None:
    """How many boots and repetitions a comparison needs, from PILOT result files.

    For each figure: its noise between boots and within a boot, and the boots
    a side that find a change of --effect with 80% power, for 1, 2, 3 and 5
    measured repetitions per boot. Exit 2 on bad input.
    """
    from harness.analysis import plan as planning
    from harness.analysis.resultset import InputError, load_side

    try:
        side = load_side("pilot", [p for part in pilot for p in _side_paths(part)])
    except (InputError, click.BadParameter) as exc:
        click.echo(f"harness plan: {exc}", err=True)
        sys.exit(2)
    click.echo(planning.render(planning.plan(side, effect, alpha=alpha, per_figure=per_figure,
                                             pattern=pattern)), nl=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def workloads(as_json: bool) -> None:
    """List the workloads in workloads/: the MMU path each stresses, parameters, metrics."""
    from harness.paths import WORKLOADS_DIR
    from harness.spec import load_workload

    problems: list[str] = []
    found = []
    for path in sorted(WORKLOADS_DIR.glob("*.toml")):
        try:
            found.append(load_workload(path))
        except SpecError as exc:
            problems.append(str(exc))
    if as_json:
        click.echo(json.dumps([_workload_json(w) for w in found], indent=2))
    else:
        for w in found:
            click.echo(f"{w.name} ({w.guest}): {w.description}")
            if w.mmu_path:
                click.echo(f"  mmu path: {w.mmu_path}")
            for name, p in w.params.items():
                unit = f" {p.unit}" if p.unit else ""
                about = f"  {p.description}" if p.description else ""
                click.echo(f"  param {name} = {p.default!r}{unit}: {p.allowed()}{about}")
            click.echo(f"  phases: {', '.join(ph.name for ph in w.phases)}")
            for ph in w.phases:
                for m in ph.metrics:
                    better = "higher" if m.higher_is_better else "lower"
                    click.echo(f"  metric {ph.name}.{m.name} [{m.unit or '-'}] {better} is better")
    for text in problems:
        click.echo(text, err=True)
    if problems:
        sys.exit(BadInput.exit_code)  # the good ones are listed; the broken files are bad input


def _workload_json(w: WorkloadSpec) -> dict[str, object]:
    return {
        "name": w.name,
        "guest": w.guest,
        "description": w.description,
        "mmu_path": w.mmu_path,
        "params": {
            name: {**p.model_dump(), "type": p.kind, "allowed": p.allowed()}
            for name, p in w.params.items()
        },
        "phases": [
            {
                "name": ph.name,
                "timeout_s": ph.timeout_s,
                "metrics": [
                    {"name": m.name, "unit": m.unit, "higher_is_better": m.higher_is_better}
                    for m in ph.metrics
                ],
            }
            for ph in w.phases
        ],
    }


@main.command()
@click.argument("result", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--phase", help="Only this phase (its name in the workload).")
@click.option("--probe", help="Only this probe.")
@click.option("--vm", "vm_name", help="Only this VM.")
@click.option("--folded", is_flag=True, help="Folded stacks (flamegraph.pl, speedscope, inferno).")
@click.option(
    "--min-share", type=click.FloatRange(0, 100), default=0.0, show_default=True,
    help="Tree: hide paths below this percentage of the probe's events.",
)
def stacks(
    result: Path,
    phase: str | None,
    probe: str | None,
    vm_name: str | None,
    folded: bool,
    min_share: float,
) -> None:
    """Print the kernel call paths RESULT recorded per phase (run with --stacks to get them)."""
    from harness.analysis import callpaths
    from harness.results import ResultError
    from harness.results import load as load_result
    from harness.textsafe import printable

    try:
        loaded = load_result(result)
    except ResultError as exc:
        click.echo(f"harness stacks: {printable(str(exc))}", err=True)
        sys.exit(2)
    except ValueError as exc:  # pydantic: valid JSON of a known version, wrong shape
        # Field names and values come from the file: printed as visible escapes.
        click.echo(f"harness stacks: {result}: not a valid result file: "
                   f"{printable(_field_problem(exc))}", err=True)
        sys.exit(2)
    items = callpaths.collect(loaded, phase=phase, probe=probe, vm=vm_name)
    if not items:
        click.echo(
            f"harness stacks: {result}: no stacks match (fix: run with `harness run --stacks "
            "stacks` or [trace] stacks in the suite; check --phase/--probe/--vm)",
            err=True,
        )
        sys.exit(2)
    if folded:
        click.echo(callpaths.render_folded(items), nl=False)
    else:
        click.echo(callpaths.render_tree(items, min_share=min_share / 100), nl=False)


def _count(n: int, noun: str) -> str:
    """``1 VM``, ``2 VMs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@main.command()
@SUITE_ARG
@SET_OPTION
def validate(suite: Path | None, overrides: tuple[str, ...]) -> None:
    """Check SUITE and the workloads it names without booting anything."""
    loaded = _load(suite, overrides)
    groups = "".join(
        f", group {g.name}: {' + '.join(g.vms)} at once" for g in loaded.spec.groups
    )
    click.echo(
        f"{loaded.path}: ok ({_count(len(loaded.spec.vms), 'VM')}, "
        f"{_count(len(loaded.spec.runs), 'run')}, "
        f"workloads: {', '.join(loaded.workloads)}{groups})"
    )


def _register_report_commands() -> None:
    # The report and history commands live in harness/cli_reports.py.
    from harness.cli_reports import history, report

    main.add_command(report)
    main.add_command(history)


_register_report_commands()


if __name__ == "__main__":
    main()
