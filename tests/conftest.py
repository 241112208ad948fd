"""Test-wide setup: several fake CPU devices and fast defaults.

XLA reads the device count once, when JAX initialises its backend, so this runs before any test
module imports jax. Eight fake devices cover the 1/2/4/8-device data-parallel and mesh paths
without a GPU. Fake devices share the machine's cores: they are for correctness, not speed.
"""

import os

NUM_FAKE_DEVICES = 8

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (
        f"{_flags} --xla_force_host_platform_device_count={NUM_FAKE_DEVICES}".strip()
    )

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Compiles dominate; a per-example deadline would flake on a busy 2-core machine.
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def devices():
    """The fake CPU devices (at least NUM_FAKE_DEVICES of them)."""
    devs = jax.local_devices()
    assert len(devs) >= NUM_FAKE_DEVICES, f"expected {NUM_FAKE_DEVICES} fake devices, got {devs}"
    return devs
