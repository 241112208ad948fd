"""The kernel as a typed library: py.typed ships, mypy is clean, and the docstring examples run.

mypy runs through its API on ``transformer_jax/attention/`` with a cache kept in the system's
temporary folder, so that after the first run it reads jax's stubs from the cache (seconds).
"""

import doctest
import tempfile
from pathlib import Path

import pytest

import transformer_jax
from transformer_jax import attention
from transformer_jax.attention import api, flax_adapter, ring

PACKAGE = Path(transformer_jax.__file__).parent


def test_py_typed_marker_ships_with_the_package():
    assert (PACKAGE / "py.typed").is_file()
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject  # package data, so a wheel carries it


def test_mypy_is_clean_on_the_kernel():
    mypy_api = pytest.importorskip("mypy.api")
    cache = Path(tempfile.gettempdir()) / "transformer_jax-mypy-cache"
    stdout, stderr, status = mypy_api.run([str(PACKAGE / "attention"), "--cache-dir", str(cache),
                                           "--no-error-summary", "--hide-error-context"])
    assert status == 0, stdout + stderr


@pytest.mark.parametrize("module", [api, ring, flax_adapter], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    public = [getattr(module, name) for name in attention.__all__ if hasattr(module, name)]
    tests = [t for fn in public for t in finder.find(fn) if t.examples]
    assert tests, f"no examples in {module.__name__}"
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_every_public_function_has_an_example_and_args():
    for name in attention.__all__:
        obj = getattr(attention, name)
        if callable(obj) and getattr(obj, "__doc__", None) and name != "Implementation":
            assert ">>> " in obj.__doc__ and "Args:" in obj.__doc__, name
