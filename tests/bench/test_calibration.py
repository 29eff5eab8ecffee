"""A/A calibration of `harness compare`'s exit status, and its power, at this host's noise.

The noise comes from a real result: the default suite that `tox -e bench` has
just run (``HARNESS_BENCH_RESULT`` names another). Per figure (workload
metrics and phase durations: what the default suite's verdict rests on under
TCG), its boot-to-boot and within-boot standard deviations on the log scale
are estimated (stats.variance_components). Synthetic sides with the default
suite's own design (its boots and measured repetitions, one run a side) are
drawn from those components, and the real ``compare()`` judges them:

* A/A, at least 500 trials: how often the exit status says "regression" when
  nothing changed. Goal: at most alpha (0.05), with its Clopper-Pearson 95%
  interval; asserted as "not significantly above 5%".
* Power: one figure (stress-ng's bogo ops/s where the suite has it, else the
  noisiest workload metric) shifted by 10% and by 5%: how often exit 1 names it.

All of it goes to ``extra_info``; it is one round, not a timing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pytest_benchmark.fixture import BenchmarkFixture
from scipy import stats as sps

from harness.analysis import stats
from harness.analysis.benchentries import newest_complete
from harness.analysis.compare import _by_boot, _collect, compare
from harness.analysis.resultset import ResultSet
from harness.paths import RESULTS_DIR
from harness.results import RunResult, WorkloadRun, load

AA_TRIALS = 500
POWER_TRIALS = 200
ALPHA = 0.05


@dataclass(frozen=True)
class Noise:
    """One figure's log-scale centre and components in the pilot."""

    workload: str
    params: dict[str, str | int | float]
    vm: str
    phase: str
    figure: str  # "metric.<name>" or "duration_s"
    centre: float
    between: float
    within: float


def pilot_path() -> Path | None:
    given = os.environ.get("HARNESS_BENCH_RESULT")
    return Path(given) if given else newest_complete(RESULTS_DIR)


def noise_of(result: RunResult) -> list[Noise]:
    side = _collect(ResultSet("pilot", [(Path("pilot"), result)]), "boot")
    out = []
    for ref, reps in side.phases.values():
        names = {n for _, r in reps for n in r.values}
        for name in sorted(n for n in names if n.startswith("metric.") or n == "duration_s"):
            boots = _by_boot(reps, name)
            values = stats.flat(boots)
            if not values or min(values) <= 0:
                continue
            comp = stats.variance_components([boots])
            out.append(Noise(ref.workload, ref.params, ref.vm, ref.phase, name,
                             float(np.mean(np.log(values))), comp.between_sd or 0.0,
                             comp.within_sd or 0.0))
    return out


def synthetic(template: RunResult, noise: list[Noise], boots: int, reps: int,
              rng: np.random.Generator, run_id: str,
              shift: tuple[str, float] | None = None) -> RunResult:
    """A result with the template's provenance and ``boots`` x ``reps`` drawn repetitions."""
    r = template.model_copy(deep=True)
    r.run_id, r.runs = run_id, []
    phases = {(n.workload, n.vm, n.phase) for n in noise}
    for b in range(boots):
        offsets = {id(n): rng.normal(0, n.between) for n in noise}
        for workload, vm, phase in sorted(phases):
            figs = [n for n in noise if (n.workload, n.vm, n.phase) == (workload, vm, phase)]
            for k in range(reps):
                proto = next(x for x in template.runs
                             if x.workload == workload and x.vm == vm and not x.warmup)
                ph = next(p for p in proto.phases if p.name == phase).model_copy(deep=True)
                ph.trace, ph.metrics = None, {}
                for n in figs:
                    value = float(np.exp(n.centre + offsets[id(n)] + rng.normal(0, n.within)))
                    if shift is not None and shift[0] == f"{workload}/{phase}/{n.figure}":
                        value *= 1 + shift[1]
                    if n.figure == "duration_s":
                        ph.duration_s = value
                    else:
                        ph.metrics[n.figure.removeprefix("metric.")] = value
                r.runs.append(WorkloadRun(workload=workload, vm=vm, repetition=k + 1,
                                          params=proto.params, status="ok", phases=[ph],
                                          boot=f"{vm}-b{b + 1}"))
    return r


def exit_status(template: RunResult, noise: list[Noise], boots: int, reps: int, seed: int,
                shift: tuple[str, float] | None = None) -> tuple[int, list[str]]:
    rng = np.random.default_rng(seed)
    a = synthetic(template, noise, boots, reps, rng, f"a{seed}")
    b = synthetic(template, noise, boots, reps, rng, f"b{seed}", shift)
    report = compare(ResultSet("base", [(Path("a"), a)]), ResultSet("cand", [(Path("b"), b)]),
                     alpha=ALPHA)
    return report.exit_status, [f"{f.phase.workload}/{f.phase.phase}/{f.figure}"
                                for f in report.failing()]


def test_exit_status_calibration(benchmark: BenchmarkFixture) -> None:
    path = pilot_path()
    assert path is not None, (
        f"no complete result in {RESULTS_DIR} (fix: run `harness run` first, as tox -e bench "
        "does, or set HARNESS_BENCH_RESULT)"
    )
    template = load(path)
    noise = noise_of(template)
    assert noise, f"{path}: no positive workload metric or duration to calibrate on"
    boots = len({f"{r.vm}/{r.boot}" for r in template.runs if not r.warmup}) // max(
        len({r.vm for r in template.runs}), 1)
    reps = max(r.repetition for r in template.runs if not r.warmup) - max(
        (r.repetition for r in template.runs if r.warmup), default=0)
    boots, reps = max(boots, 2), max(reps, 1)
    # The figure whose power is reported: stress-ng's throughput where the suite has it,
    # else the noisiest workload metric.
    metrics = [n for n in noise if n.figure.startswith("metric.")] or noise
    target = next((n for n in metrics if n.figure == "metric.bogo_ops_per_s"),
                  max(metrics, key=lambda n: n.between**2 + n.within**2 / reps))
    key = f"{target.workload}/{target.phase}/{target.figure}"

    def run() -> dict[str, object]:
        aa = [exit_status(template, noise, boots, reps, seed)[0] for seed in range(AA_TRIALS)]
        alarms = sum(1 for s in aa if s == 1)
        no_verdict = sum(1 for s in aa if s == 2)
        ci = sps.binomtest(alarms, AA_TRIALS).proportion_ci(0.95, method="exact")
        power = {}
        for size in (0.10, 0.05):
            found = sum(
                1 for seed in range(POWER_TRIALS)
                if key in exit_status(template, noise, boots, reps, 10_000 + seed,
                                      (key, -size))[1]
            )
            power[f"{size:.0%}"] = found / POWER_TRIALS
        return {
            "pilot": str(path),
            "design": f"{boots} boots x {reps} repetitions a side, one run a side",
            "figures": len(noise),
            "noise": {f"{n.workload}/{n.phase}/{n.figure}":
                      {"between_boot_sd": round(n.between, 4), "within_boot_sd": round(n.within, 4)}
                      for n in noise},
            "aa_trials": AA_TRIALS,
            "false_alarm_rate": alarms / AA_TRIALS,
            "false_alarm_ci95": [round(ci.low, 4), round(ci.high, 4)],
            "aa_no_verdict": no_verdict,
            "power_figure": key,
            "power_trials": POWER_TRIALS,
            "power": power,
        }

    out = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    print(f"\ncalibration: {out}")
    assert out["aa_no_verdict"] == 0, "the default design must always allow a verdict"
    ci_low = out["false_alarm_ci95"][0]  # type: ignore[index]
    assert ci_low <= ALPHA, f"false alarms above alpha: {out['false_alarm_rate']}"
    power = out["power"]
    assert isinstance(power, dict)
    assert power["10%"] >= power["5%"]

