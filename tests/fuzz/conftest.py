"""The fuzz suite's Hypothesis profile: reproducible in CI, bounded, nothing written to disk.

derandomize: the same examples on every run (a CI failure reproduces on a laptop);
deadline None: a slow example on a loaded 2-core runner is not a failure (hangs are
caught by pytest-timeout instead); database None: no .hypothesis/ in the checkout.
Failing examples found are kept in the tests as explicit ``@example`` cases.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "harness-fuzz",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("harness-fuzz")
