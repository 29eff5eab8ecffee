"""Result-file models of the host trace: per-phase records and a run summary.

Embedded in the result JSON; :class:`PhaseTrace` and :class:`TraceSummary` are
the public seam to harness.results.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Attribution = Literal["guest-marker", "host-window"]
TracerStatus = Literal["ok", "died", "not-started", "disabled"]


class HistBucketModel(BaseModel):
    """One log2 histogram bucket: ``count`` values in ``[low, high]``; low None = negative."""

    model_config = ConfigDict(extra="forbid")

    low: int | None
    high: int
    count: int = Field(ge=0)


class StackCount(BaseModel):
    """One kernel call path and how many of a probe's events came through it."""

    model_config = ConfigDict(extra="forbid")

    frames: list[str] = Field(description="kernel functions, outermost (syscall entry) first")
    count: int = Field(ge=1)
    weight: int | None = Field(
        default=None, ge=1,
        description="rate-target sampling only: the sum of these samples' weights (each the "
        "period in force when it was taken: the events it stands for)",
    )
    weight_sq: int | None = Field(
        default=None, ge=1, description="rate-target sampling only: the sum of squared weights"
    )


class PathEstimate(BaseModel):
    """A sampled probe's events through one function: share of the samples, scaled, with CI.

    The share p = k/n of the n sampled stacks whose stack passes through the function
    (k of them) is read as a binomial proportion; its 95% Wilson score interval is
    ``[share_low, share_high]``, and the estimate is the share times the probe's exact
    event count (the counts are never sampled), with the interval scaled the same way.
    With a rate target the samples carry weights: p = W_f / W (weights through the
    function over all), and the interval is Wilson's at the effective sample size of
    the ratio estimator (docs/STATISTICS.md); a constant weight gives k/n back exactly.
    """

    model_config = ConfigDict(extra="forbid")

    share: float = Field(ge=0, le=1, description="k/n: sampled stacks through the function")
    share_low: float = Field(ge=0, le=1, description="95% Wilson interval, low end")
    share_high: float = Field(ge=0, le=1, description="95% Wilson interval, high end")
    events: float = Field(ge=0, description="estimated events: share x the exact event count")
    low: float = Field(ge=0, description="share_low x the exact event count")
    high: float = Field(ge=0, description="share_high x the exact event count")
    weight: int | None = Field(
        default=None, ge=0, description="rate target only: W_f, the weights of the samples "
        "through the function"
    )
    weight_sq: int | None = Field(
        default=None, ge=0, description="rate target only: the sum of their squared weights"
    )
    effective_samples: float | None = Field(
        default=None, ge=0, description="rate target only: n_eff = p(1-p)/V of the ratio "
        "estimator (Kish's W^2/sum w^2 at p = 0 or 1); the interval is Wilson(p n_eff, n_eff)"
    )


class ProbeStacks(BaseModel):
    """A probe's kernel stacks in one phase, with what they cover and what derives from them."""

    model_config = ConfigDict(extra="forbid")

    events: int = Field(ge=0, description="the probe's events in this phase (events_by_probe)")
    stacked: int = Field(
        ge=0,
        description="events with a stack; equals events unless lost, or about events/period "
        "when sampled",
    )
    period: int = Field(
        default=1,
        ge=1,
        description="sampling period: a stack on every period-th event per CPU and VM; 1 = "
        "every event (paths exact), more = sampled (paths count samples, see path_estimates). "
        "With a rate target: the mean period, weight / stacked rounded (1 without samples)",
    )
    rate_hz: int | None = Field(
        default=None, ge=1,
        description="rate target: about rate_hz stacks a second per CPU and VM, the period "
        "picked in the kernel from the event rate, each stack weighted by its period; None: "
        "a fixed period",
    )
    weight: int | None = Field(
        default=None, ge=0,
        description="rate target only: the sum of the samples' weights, the events they stand "
        "for (at most events: a CPU's events since its last stack are in no weight)",
    )
    weight_sq: int | None = Field(
        default=None, ge=0, description="rate target only: the sum of squared weights"
    )
    effective_samples: float | None = Field(
        default=None, ge=0,
        description="rate target only: Kish's effective sample size weight^2 / weight_sq",
    )
    truncated: int = Field(
        ge=0, description="events whose stack reached the depth limit (outer frames cut)"
    )
    depth: int = Field(ge=1, description="frames kept per stack")
    stacks: list[StackCount] = Field(default_factory=list, description="most frequent first")
    paths: dict[str, int] = Field(
        default_factory=dict,
        description="derived from stacks: function -> events whose stack passes through it "
        "(e.g. kvm_mmu_load: root lookups it made), an honest count where the function "
        "itself cannot be probed; when sampled (period > 1), sampled stacks through it",
    )
    path_estimates: dict[str, PathEstimate] = Field(
        default_factory=dict,
        description="sampled probes only: function -> estimated events through it, with "
        "its 95% interval (empty when every event has its stack)",
    )


class PhaseTrace(BaseModel):
    """Host KVM events attributed to one workload phase of one VM (phase 0 = outside phases)."""

    model_config = ConfigDict(extra="forbid")

    attribution: Attribution = Field(
        description="guest-marker: exact, by the guest's cpuid markers; host-window: by the "
        "harness's host markers around the guest command"
    )
    markers_seen: int = Field(ge=0, description="guest markers of this phase seen by the host")
    host_marks_seen: int = Field(default=0, ge=0, description="host markers of this phase")
    marker_ns: int | None = Field(
        description="CLOCK_MONOTONIC ns of the first marker of the attribution used"
    )
    duration_ns: int | None = Field(
        default=None,
        description="time spent in this phase (closed intervals between markers), in-kernel",
    )
    exits: dict[str, int] = Field(default_factory=dict, description="exit reason -> count")
    mmu_faults: dict[str, int] = Field(
        default_factory=dict,
        description="MMU fault source (ept_violation, ept_misconfig, npf, shadow_pf, "
        "page_fault when the exit is not traced) -> count",
    )
    page_faults_by_error: dict[str, int] = Field(
        default_factory=dict, description="fault_kind(error code) -> count"
    )
    mmu_events: dict[str, int] = Field(default_factory=dict, description="kvmmmu probe -> count")
    cr3_writes: int = Field(
        default=0, ge=0, description="CR3 writes seen on kvm:kvm_cr; see cr3_writes_note"
    )
    cr3_writes_note: str | None = Field(
        default=None,
        description="why cr3_writes is not the guest's CR3 write count on this host (kvm_cr "
        "not traced, CR3 loads not intercepted under EPT/NPT, or emulated MOV CR3 on PVM); "
        "None when kvm_cr sees every CR3 write that reaches KVM",
    )
    shadow_pages_created: int | None = Field(
        default=None,
        ge=0,
        description="kvmmmu:kvm_mmu_get_page with created=1: MMU pages (e.g. new roots) "
        "allocated; None when the split was not traced",
    )
    shadow_pages_found: int | None = Field(
        default=None,
        ge=0,
        description="kvmmmu:kvm_mmu_get_page with created=0: existing MMU pages found by "
        "(gfn, role), e.g. a root evicted from KVM's cache of current + 3 previous roots "
        "and looked up again; None when the split was not traced",
    )
    cr_writes: dict[str, int] = Field(default_factory=dict, description="CR number -> writes")
    root_loads: int | None = Field(
        default=None, description="page-table root loads; None when no probe can see them"
    )
    emulated_insns: int = Field(default=0, ge=0)
    pio: int = Field(default=0, ge=0)
    mmio: int = Field(default=0, ge=0)
    function_calls: dict[str, int] = Field(default_factory=dict, description="probe -> calls")
    events_by_probe: dict[str, int] = Field(default_factory=dict, description="probe -> events")
    events_total: int = Field(default=0, ge=0)
    per_vcpu: dict[str, int] = Field(default_factory=dict, description="vCPU thread id -> events")
    latency_ns: dict[str, list[HistBucketModel]] = Field(default_factory=dict)
    stacks: dict[str, ProbeStacks] = Field(
        default_factory=dict, description="probe -> kernel stacks (only for stacked probes)"
    )


class ProbeNotAttached(BaseModel):
    """A catalogue probe that was not attached, and why."""

    model_config = ConfigDict(extra="forbid")

    probe: str
    reason: str


class TraceSummary(BaseModel):
    """What the tracer did during a run."""

    model_config = ConfigDict(extra="forbid")

    probes_attached: list[str] = Field(default_factory=list)
    probes_not_attached: list[ProbeNotAttached] = Field(default_factory=list)
    events_total: int = Field(default=0, ge=0)
    lost_events: int = Field(default=0, ge=0)
    tracer_status: TracerStatus
    tracer_error: str | None = None
    program_sha256: str | None = None
    program_template_sha256: str | None = Field(
        default=None,
        description="sha256 of the program generated for the same probes and number of "
        "targets with placeholder pids, tokens and session: equal means the same tracer program",
    )
    backend: str | None = Field(
        default=None, description="the tracer that ran: bpftrace or libbpf (the kvmtrace loader)"
    )
    backend_reason: str | None = Field(
        default=None, description="why that backend ran (auto's choice, or a fallback and why)"
    )
