"""Failures that must cost nothing: SIGKILL at random moments, SIGTERM, non-finite steps,
Ctrl-C, two runs on one directory, a full disk.

* Kills: ``train.py`` runs in a subprocess that is killed (SIGKILL) at seeded random moments —
  while preparing a random step, inside a checkpoint save (all arrays written, not committed),
  and at a random wall-clock instant — and stopped once by SIGTERM (exit 0, checkpoint at the
  next step boundary); re-running the same command each time must end bit-identical to an
  uninterrupted run, metrics log included.
* Non-finite steps: a NaN loss, an Inf gradient, then several bad steps in a row are injected
  through the data; each is skipped (the parameters do not move), counted in metrics.jsonl, and
  the run stops with exit status 1 leaving the last good checkpoint intact.
* Ctrl-C (SIGINT from ``subprocess.Popen.send_signal``, as a terminal sends it; a shell's
  background job would ignore it): the first saves at the step boundary (exit 130); a second
  stops at once without saving, leaving the checkpoints as they were. A second ``train.py``
  into a directory in use exits 2 naming the first, which goes on untouched. A full disk (a
  tmpfs where the test may mount one, else ``OSError(ENOSPC)`` injected into orbax's save
  thread) ends the run with exit status 74 and one line; the last good checkpoint restores.
"""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.cli import train
from transformer_jax.data import batches as batches_module
from transformer_jax.runs import metrics
from transformer_jax.runs.checkpoint import Checkpointer
from transformer_jax.train import lm, loop
from transformer_jax.train import step as step_module

# One worker runs the whole module (pyproject.toml: loadgroup): its launches share one compile
# cache, and two of these subprocess runs never compete for the two cores at once.
pytestmark = pytest.mark.xdist_group("reliability")

ROOT = Path(__file__).resolve().parents[2]

# Runs train.py's __main__ with one fault planted (FAULT=kind:step); test-only.
HARNESS = '''
import faulthandler, os, signal, sys, runpy
faulthandler.register(signal.SIGUSR1, all_threads=True)  # _Train.finish's stacks on a hang
sys.path.insert(0, os.environ["ROOT"])
from transformer_jax.data import batches as data_batches
from transformer_jax.runs import metrics
metrics.cpu_matmul_probe = lambda *a, **k: 1e11  # MFU is beside the point here; saves seconds
kind, _, at = os.environ.get("FAULT", "").partition(":")
if kind in ("kill_at_step", "term_at_step"):
    real_batches = data_batches.train_batches
    def batches(tokens, *, step, num_steps, **kw):
        if step <= int(at) < step + num_steps:
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill_at_step" else signal.SIGTERM)
        return real_batches(tokens, step=step, num_steps=num_steps, **kw)
    data_batches.train_batches = batches
elif kind == "kill_in_save":
    # Die when orbax commits the save of step >= at: arrays and metadata are written into
    # <step>.orbax-checkpoint-tmp, the rename that publishes them has not happened.
    from orbax.checkpoint._src.path import atomicity
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *a, **kw):
        name = self._final_path.name  # the step folder (items inside it finalize too)
        if name.isdigit() and int(name) >= int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        return await real_finalize(self, *a, **kw)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
elif kind == "slow_save":  # a save of a large model: once MARK exists, saves take minutes
    import time
    from transformer_jax.runs.checkpoint import Checkpointer
    real_save = Checkpointer.save
    def save(self, *a, **kw):
        if os.path.exists(os.environ["MARK"]):
            # Short sleeps: a signal the kernel delivers to another thread does not wake a
            # long sleep of the main thread, where Python runs the handler.
            for _ in range(3000):
                time.sleep(0.1)
        return real_save(self, *a, **kw)
    Checkpointer.save = save
elif kind == "disk_full_at":  # fill the disk (FILL, a tmpfs) before the save of step >= at
    from transformer_jax.runs.checkpoint import Checkpointer
    real_save = Checkpointer.save
    def save(self, step, *a, **kw):
        if step >= int(at) and not os.path.exists(os.environ["FILL"]):
            self.wait()
            st = os.statvfs(os.path.dirname(os.environ["FILL"]))
            with open(os.environ["FILL"], "wb") as f:
                f.write(bytes(st.f_bavail * st.f_frsize - 40_000))
        return real_save(self, step, *a, **kw)
    Checkpointer.save = save
elif kind == "enospc_at":  # where no tmpfs can be mounted: the publishing rename fails
    import errno
    from orbax.checkpoint._src.path import atomicity
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *a, **kw):
        name = self._final_path.name
        if name.isdigit() and int(name) >= int(at):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real_finalize(self, *a, **kw)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["ROOT"], "train.py"), run_name="__main__")
'''

STEPS = 24
ARGS = ["--preset", "tiny", "--layers", "1", "--steps", str(STEPS), "--steps-per-call", "2",
        "--log-every", "2", "--ckpt-every", "4", "--eval-every", str(STEPS), "--seq-len", "16",
        "--batch-size", "4", "--dropout", "0.1", "--seed", "3", "--parallel", "none",
        "--sample-tokens", "0", "--no-progress"]
COMPARED = ("step", "loss", "lr", "nonfinite_steps", "val_loss")  # not the timings


def _corpus(path):
    words = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "be"]
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(words, 1200)))
    return path


def _records(out):
    return [{k: r.get(k) for k in COMPARED} for r in metrics.read_jsonl(out / "metrics.jsonl")]


@pytest.mark.slow
def test_killed_and_preempted_runs_resume_bit_identical(tmp_path):
    corpus = _corpus(tmp_path / "corpus.txt")
    args = [*ARGS, "--data", str(corpus)]
    (tmp_path / "harness.py").write_text(HARNESS)
    env = dict(os.environ, ROOT=str(ROOT), PYTHONPATH=str(ROOT),
               # Later runs load the compiled step instead of compiling it again.
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    out, ref = tmp_path / "run", tmp_path / "ref"
    ckpts = out / "checkpoints"

    def start(fault="", run_dir=out):
        return subprocess.Popen(
            [sys.executable, str(tmp_path / "harness.py"), *args, "--out", str(run_dir)],
            cwd=ROOT, env=dict(env, FAULT=fault), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)

    def run(fault="", run_dir=out):
        proc = start(fault, run_dir)
        log, _ = proc.communicate(timeout=300)
        return proc.returncode, log

    def saved():
        return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())

    # The uninterrupted reference (it also fills the compilation cache for the others).
    rc, log = run(run_dir=ref)
    assert rc == 0, log

    rng = np.random.default_rng(2026)
    kill_step = int(rng.integers(1, 8))  # before or after the first checkpoint (step 4)
    save_step = int(rng.choice([8, 12]))
    term_step = int(rng.integers(save_step + 1, STEPS - 2))

    # 1. SIGKILL while step `kill_step` is being prepared (async saves may be in flight).
    rc, log = run(f"kill_at_step:{kill_step}")
    assert rc == -signal.SIGKILL, log
    assert all(s <= kill_step for s in saved())

    # 2. SIGKILL inside the save of step `save_step`: its files exist but are not committed.
    rc, log = run(f"kill_in_save:{save_step}")
    assert rc == -signal.SIGKILL, log
    assert any(p.name.startswith(f"{save_step}.orbax-checkpoint-tmp") for p in ckpts.iterdir())
    assert saved()[-1] == save_step - 4

    # 3. SIGTERM (preemption) during step `term_step`: checkpoint at the next boundary, exit 0.
    rc, log = run(f"term_at_step:{term_step}")
    boundary = term_step - term_step % 2 + 2  # the end of the compiled call (2 steps)
    assert rc == 0, log
    assert f"stopped at step {boundary}; checkpoint saved" in log
    assert saved()[-1] == boundary
    assert not any("orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir())  # cleaned up

    # 4. SIGKILL at a random instant once training has moved past the checkpoint.
    proc = start()
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and any(
                r["step"] > boundary for r in metrics.read_jsonl(out / "metrics.jsonl")):
            break
        time.sleep(0.01)
    time.sleep(float(rng.uniform(0.0, 0.3)))
    proc.kill()  # SIGKILL; a run that already finished is fine too
    proc.communicate(timeout=60)

    # 5. The same command again finishes the run.
    rc, log = run()
    assert rc == 0, log

    def final_state(run_dir):  # as saved: nested dicts of NumPy arrays
        with Checkpointer(run_dir / "checkpoints") as ckpt:
            restored = ckpt.restore(None, step=STEPS)
        return restored.state

    expected = final_state(ref)
    jax.tree.map(np.testing.assert_array_equal, final_state(out), expected)  # bit for bit
    assert int(expected["step"]) == STEPS
    assert _records(ref)[-1]["loss"] < _records(ref)[0]["loss"] - 0.5  # it trained
    # The metrics log reads like one uninterrupted run (losses and validation bit for bit).
    assert _records(out) == _records(ref)


# ---- non-finite losses and gradients -------------------------------------------------------

_LOSS, _GRADS, _BOTH = 1, 2, 3  # what a marked batch poisons
_MARK = 0  # a NUL byte never occurs in text data (data.check_text refuses it)


@jax.custom_vjp
def _poison_grad(x, flag):
    return x


_poison_grad.defvjp(lambda x, flag: (x, flag),
                    lambda flag, g: (g * jnp.where(flag, jnp.inf, 1.0), None))


def _poisoned_cross_entropy(real):
    """cross_entropy whose value or gradient is non-finite on batches marked by the data."""
    def cross_entropy(logits, targets, **kw):
        total, count = real(logits, targets, **kw)
        marked = targets[0, 0] == _MARK
        mode = targets[0, 1]
        total = _poison_grad(total, marked & ((mode == _GRADS) | (mode == _BOTH)))
        total = jnp.where(marked & ((mode == _LOSS) | (mode == _BOTH)), jnp.nan, total)
        return total, count

    return cross_entropy


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch, capsys):
    plan = {2: _LOSS, 5: _GRADS, 9: _BOTH, 10: _BOTH, 11: _BOTH}  # step -> fault
    real_batches = batches_module.train_batches

    def batches(tokens, *, step, num_steps, **kw):
        out = real_batches(tokens, step=step, num_steps=num_steps, **kw)
        for s in range(step, step + num_steps):
            if s in plan:  # row 0's first two targets: the mark and the fault
                out[s - step, 0, 1:3] = (_MARK, plan[s])
        return out

    # The CLI path below has no seam for another loss: patch the module the step reads it from.
    monkeypatch.setattr(batches_module, "train_batches", batches)
    monkeypatch.setattr(step_module, "cross_entropy",
                        _poisoned_cross_entropy(step_module.cross_entropy))
    monkeypatch.setattr(metrics, "cpu_matmul_probe", lambda *a, **k: 1e11)
    lm._functions.cache_clear()  # trace the step with the poisoned loss ...
    try:
        out = tmp_path / "run"
        argv = ["--preset", "tiny", "--layers", "1", "--steps", "16", "--steps-per-call", "1",
                "--log-every", "1", "--ckpt-every", "4", "--seq-len", "16", "--batch-size", "4",
                "--parallel", "none", "--sample-tokens", "0", "--no-progress",
                "--max-nonfinite", "3", "--data", str(_corpus(tmp_path / "corpus.txt")),
                "--out", str(out)]
        model_cfg, tc = train.configure(argv)
        quiet = {"progress": False, "log": lambda s: None}
        before = loop.run(model_cfg, tc, stop_at=2, **quiet).state
        after = loop.run(model_cfg, tc, stop_at=3, **quiet).state  # step 2: NaN loss
        assert int(after.step) == 3
        jax.tree.map(np.testing.assert_array_equal, after.params, before.params)  # skipped
        jax.tree.map(np.testing.assert_array_equal, after.opt_state.inner_state,
                     before.opt_state.inner_state)  # Adam's moments untouched too

        assert train.main(argv) == 1  # resumes at 3, stops at the 3rd bad step in a row
    finally:
        lm._functions.cache_clear()  # ... and never hand it to another test
    err = capsys.readouterr().err
    assert "3 consecutive steps had non-finite losses or gradients" in err
    assert "--lr" in err and str(out / "checkpoints") in err and "Traceback" not in err

    records = {r["step"]: r for r in metrics.read_jsonl(out / "metrics.jsonl")}
    assert [s for s, r in records.items() if r["nonfinite_steps"]] == [3, 6, 10, 11]
    assert list(records) == list(range(1, 12))  # nothing logged past the stop
    # A NaN loss is not averaged into the log; an Inf gradient with a finite loss is counted.
    assert [s for s, r in records.items() if r["loss"] is None] == [3, 10, 11]
    assert all(np.isfinite(r["loss"]) for r in records.values() if r["loss"] is not None)
    with Checkpointer(out / "checkpoints") as ckpt:  # the last good checkpoint is intact
        assert ckpt.latest_step() == 8
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), after)
        last = ckpt.restore(abstract)
    assert last.step == 8 and all(np.isfinite(x).all() for x in jax.tree.leaves(last.state.params))
    assert dataclasses.asdict(model_cfg) == last.meta["model"]


# ---- Ctrl-C, two runs on one directory, a full disk -----------------------------------------

# Never finishes by itself; a checkpoint every 20 steps, no evaluation (later flags win).
LONG = [*ARGS, "--steps", "1000000", "--ckpt-every", "20", "--eval-every", "1000000"]


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """Starts ``train.py`` (through HARNESS) in a subprocess; the runs share one compile cache."""
    root = tmp_path_factory.mktemp("launch")
    (root / "harness.py").write_text(HARNESS)
    corpus = _corpus(root / "corpus.txt")
    env = dict(os.environ, ROOT=str(ROOT), PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    started = []

    def launch(out, args=LONG, fault="", **extra_env):
        proc = _Train([sys.executable, str(root / "harness.py"), *args, "--data", str(corpus),
                       "--out", str(out)], dict(env, FAULT=fault, **extra_env))
        started.append(proc)
        return proc

    yield launch
    for proc in started:
        proc.popen.kill()
        proc.popen.wait()


class _Train:
    """A ``train.py`` subprocess whose output (stdout and stderr) is collected as it comes."""

    def __init__(self, argv, env):
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.popen.stdout),
                                        daemon=True)
        self._reader.start()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_until(self, condition, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.popen.poll() is None, f"exited {self.popen.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.05)

    def finish(self, timeout=120) -> tuple[int, str]:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:  # fail with every thread's stack, not a bare timeout
            self.popen.send_signal(signal.SIGUSR1)
            time.sleep(5)
            self.popen.kill()
            self._reader.join(timeout)
            pytest.fail(f"train.py still running {timeout} s later:\n{self.text()}")
        self._reader.join(timeout)
        return rc, self.text()


def _logged_steps(out):
    path = out / "metrics.jsonl"
    return [r["step"] for r in metrics.read_jsonl(path)] if path.exists() else []


def _saved_steps(out):
    """Everything in the checkpoint folder: step folders (numerically) first, then the rest."""
    path = out / "checkpoints"
    names = [p.name for p in path.iterdir()] if path.exists() else []
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def _no_traceback(log):
    for noise in ("Traceback", "KeyboardInterrupt", "ERROR:absl", "warning: ignored"):
        assert noise not in log, log


def test_ctrl_c_saves_then_a_second_ctrl_c_stops_at_once(tmp_path, launcher):
    out = tmp_path / "run"
    # 1. One Ctrl-C: the compiled call in progress ends, a checkpoint is saved, exit 130.
    run = launcher(out)
    run.wait_until(lambda: any(s > 20 for s in _logged_steps(out)))  # past one checkpoint
    run.popen.send_signal(signal.SIGINT)
    rc, log = run.finish()
    assert rc == 130, log
    _no_traceback(log)
    assert "Ctrl-C: saving a checkpoint" in log
    stopped = int(re.search(r"stopped at step (\d+); checkpoint saved", log)[1])
    assert stopped > 20 and _saved_steps(out)[-1] == str(stopped)
    assert not (out / ".lock").exists()

    # 2. Two Ctrl-C while the save is slow (a large model's): stop at once, nothing saved.
    out, mark = tmp_path / "run2", tmp_path / "slow"
    run = launcher(out, fault="slow_save", MARK=str(mark))
    run.wait_until(lambda: any(name.isdigit() for name in _saved_steps(out)))  # one complete
    mark.touch()  # from now on a save sleeps for minutes before it starts
    before = [name for name in _saved_steps(out) if name.isdigit()]
    run.popen.send_signal(signal.SIGINT)
    run.wait_until(lambda: "Ctrl-C: saving a checkpoint" in run.text())
    sent = time.monotonic()
    run.popen.send_signal(signal.SIGINT)
    rc, log = run.finish()
    assert rc == 130, log
    assert time.monotonic() - sent < 30  # the save sleeps for minutes: it was not waited for
    _no_traceback(log)
    assert "train.py: stopped at once by Ctrl-C, without saving" in log
    assert "stopped at step" not in log
    after = _saved_steps(out)
    assert set(before) <= set(after)  # nothing removed (a save in flight may have completed)
    assert not (out / ".lock").exists()  # released before exiting
    with Checkpointer(out / "checkpoints") as ckpt:  # the last good checkpoint restores
        assert ckpt.restore(None).step == int([n for n in after if n.isdigit()][-1])


def test_a_second_run_into_a_directory_in_use_exits_2_and_touches_nothing(tmp_path, launcher):
    out = tmp_path / "run"
    first = launcher(out)
    first.wait_until(lambda: len(_logged_steps(out)) >= 2)
    config = (out / "config.json").stat().st_mtime_ns
    second = launcher(out)
    rc, log = second.finish()
    assert rc == 2, log
    _no_traceback(log)
    assert log.count("\n") == 1 and log.startswith("train.py: error: ")
    for words in (f"--out {out} is in use by another run", f"pid {first.popen.pid}",
                  f"host {socket.gethostname()}", "started ", "another --out"):
        assert words in log, words
    first.popen.send_signal(signal.SIGTERM)  # the first run goes on, then stops as usual
    rc, log = first.finish()
    assert rc == 0 and "stopped at step" in log, log
    steps = _logged_steps(out)
    assert steps == sorted(set(steps))  # one writer: no line twice
    assert (out / "config.json").stat().st_mtime_ns == config
    assert not (out / ".lock").exists()


def test_a_full_disk_ends_the_run_with_one_line_and_the_last_checkpoint_intact(tmp_path,
                                                                            launcher):
    disk = tmp_path / "disk"
    disk.mkdir()
    tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                           capture_output=True, check=False).returncode == 0
    try:
        fault = "disk_full_at:8" if tmpfs else "enospc_at:8"
        run = launcher(disk / "run", [*LONG, "--ckpt-every", "4"], fault=fault,
                       FILL=str(disk / "filler"))
        rc, log = run.finish()
        assert rc == 74, log
        _no_traceback(log)
        error = [line for line in log.splitlines() if "error" in line]
        expected = (f"train.py: error: cannot write checkpoint step 8 in "
                    f"{disk / 'run' / 'checkpoints'} (no space left on the device); the last "
                    "good checkpoint, step 4, is intact. Free space there, then run the same "
                    "command to resume")
        assert error == [expected], log
        (disk / "filler").unlink(missing_ok=True)
        with Checkpointer(disk / "run" / "checkpoints") as ckpt:
            assert ckpt.restore(None).step == 4
        assert not (disk / "run" / ".lock").exists()
    finally:
        if tmpfs:
            subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("command, argv, target", [
    ("sample", ["--run", "R"], "load_run"),
    ("translate", ["--run", "R", "a b"], "load_run"),
    ("visualize", ["positions", "--d-model", "8", "--max-len", "4", "--out", "{tmp}/p.png"],
     "plot_positions"),
])
def test_read_only_commands_stop_on_ctrl_c_with_one_line(command, argv, target, tmp_path,
                                                         monkeypatch, capsys):
    import importlib

    module = importlib.import_module(f"transformer_jax.cli.{command}")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, target, interrupted)
    assert module.main([a.format(tmp=tmp_path) for a in argv]) == 130
    captured = capsys.readouterr()
    assert captured.err == f"python -m transformer_jax.{command}: interrupted (Ctrl-C)\n"
    assert captured.out == ""
