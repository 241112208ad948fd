"""Test-wide setup: several fake CPU devices and fast defaults.

XLA reads the device count once, when JAX initialises its backend, so this runs before any test
module imports jax. Eight fake devices cover the 1/2/4/8-device data-parallel and mesh paths
without a GPU. Fake devices share the machine's cores: they are for correctness, not speed.

Compiling is most of the suite's time, so two settings (environment variables, inherited by the
xdist workers and by the ``train.py`` subprocesses some tests start) make it cheaper:

* ``JAX_DISABLE_MOST_OPTIMIZATIONS``: XLA still fuses, but LLVM runs its cheap passes only. The
  tiny test models run as correctly, and compile about a quarter faster.
* One persistent compilation cache for the whole session (a fresh temporary folder, removed at
  the end): a function compiled by one test, worker or subprocess is loaded, not compiled again,
  by the next one with the same HLO (a fresh ``jax.jit`` of an equal function included).
"""

import atexit
import os
import shutil
import tempfile

NUM_FAKE_DEVICES = 8

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (
        f"{_flags} --xla_force_host_platform_device_count={NUM_FAKE_DEVICES}".strip()
    )

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the xdist controller: workers inherit it
    _cache = tempfile.mkdtemp(prefix="transformer_jax-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

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
