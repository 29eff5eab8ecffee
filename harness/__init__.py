"""KVM MMU benchmark harness: boot guests, run memory workloads, trace host KVM per phase."""

__version__ = "0.1.0"
