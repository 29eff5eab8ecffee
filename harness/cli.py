"""The ``harness`` command: run, doctor, image, vm, probes, validate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from harness.paths import RESULTS_DIR
from harness.spec import SpecError, Suite, default_suite_path, load_suite

SUITE_ARG = click.argument("suite", type=click.Path(path_type=Path), required=False)


def _load(suite: Path | None) -> Suite:
    try:
        return load_suite(suite or default_suite_path())
    except SpecError as exc:
        raise click.ClickException(str(exc)) from exc


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
    help="Print the result JSON on stdout instead of the table; no progress.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress; print only the result path.")
def run(suite: Path | None, results_dir: Path, no_trace: bool, as_json: bool, quiet: bool) -> None:
    """Run SUITE (default: workloads/suites/default.toml) and write its result JSON."""
    from harness.progress import QuietReporter, RichReporter, summary_table
    from harness.run import RunInterrupted, run_suite

    loaded = _load(suite)
    reporter = QuietReporter() if (as_json or quiet) else RichReporter()
    try:
        state = run_suite(
            loaded,
            results_dir=results_dir,
            reporter=reporter,
            trace=False if no_trace else None,
            command_line=sys.argv,
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
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    elif not quiet:
        # Logs (CI, pipes) have no terminal width; keep the table readable there.
        Console(width=None if sys.stdout.isatty() else 180).print(summary_table(result))
    click.echo(f"result: {state.path}", err=as_json)
    if result.status != "complete":
        sys.exit(1)


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
@click.argument("name", type=click.Choice(["linux"]))
@click.option("--force", is_flag=True, help="Rebuild even if the recipe has not changed.")
def image_build(name: str, force: bool) -> None:
    """Build the NAME image (cached, keyed by a digest of its recipe)."""
    from harness.image.linux import build_linux_image

    img = build_linux_image(force=force, progress=lambda s: click.echo(s, err=True))
    click.echo(f"{img.name} {img.digest[:12]} {img.directory}")


@main.group()
def vm() -> None:
    """Inspect the VMs a suite defines."""


@vm.command("xml")
@SUITE_ARG
@click.option("--vm", "vm_name", help="Only this VM of the suite.")
def vm_xml(suite: Path | None, vm_name: str | None) -> None:
    """Print the domain XML the harness would start for each VM (like virt-install --print-xml)."""
    from harness.host.facts import choose_accelerator, collect_host_facts
    from harness.preview import preview_domains

    loaded = _load(suite)
    names = [v.name for v in loaded.spec.vms]
    if vm_name is not None and vm_name not in names:
        raise click.ClickException(
            f"{loaded.path}: no VM named {vm_name!r} (VMs: {', '.join(names)})"
        )
    facts = collect_host_facts()
    for name, xml in preview_domains(loaded, lambda req: choose_accelerator(req, facts)[0]):
        if vm_name in (None, name):
            click.echo(xml, nl=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def probes(as_json: bool) -> None:
    """List the probe catalogue and whether each probe can attach on this host."""
    from harness.trace.probes import CATALOGUE, availability

    status = availability(list(CATALOGUE))
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
                        "available": s.available,
                        "reason": s.reason,
                    }
                    for s in status
                ],
                indent=2,
            )
        )
        return
    for s in status:
        mark = "ok " if s.available else "no "
        click.echo(f"{mark} {s.probe.kind:<10} {s.probe.target:<36} {s.reason}")


@main.command()
@SUITE_ARG
def validate(suite: Path | None) -> None:
    """Check SUITE and the workloads it names without booting anything."""
    loaded = _load(suite)
    click.echo(
        f"{loaded.path}: ok ({len(loaded.spec.vms)} VMs, {len(loaded.spec.runs)} runs, "
        f"workloads: {', '.join(loaded.workloads)})"
    )


if __name__ == "__main__":
    main()
