"""Sharded training: mesh flag, the sharding table, jit/shard_map steps vs one device, FSDP
memory, checkpoints across meshes, and a real two-process run on localhost (gloo)."""

import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from multihost_worker import DEVICES_PER_PROCESS, MODEL, NUM_PROCESSES, train_config

from transformer_jax import data, models, parallel
from transformer_jax import train as training
from transformer_jax.config import RECIPES
from transformer_jax.data import prepare, prepared
from transformer_jax.parallel.mesh import mesh_axes
from transformer_jax.parallel import sharding
from transformer_jax.runs.checkpoint import Checkpointer

DEFAULT_RUN = RECIPES["cpu-lm"].train  # the default run's training settings

ROOT = Path(__file__).resolve().parents[2]
T, B = 16, 8


def _allclose(a, b, rtol=2e-5, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                         atol=atol), a, b)


@functools.lru_cache(maxsize=1)
def _setup():
    # Adam's update is m / (√v + ε): the key bias has a zero true gradient (softmax is
    # shift-invariant), so its "gradient" is float32 noise that depends on the summation order,
    # and with a tiny ε Adam turns that noise into updates of ~lr. ε = 1e-4 keeps them below
    # the tolerance; the real gradients (≥ 1e-3) hardly notice it.
    tc = DEFAULT_RUN.replace(steps=100, warmup=2, lr=3e-3, eps=1e-4, batch_size=B, seq_len=T)
    model = models.build_model("transformer", MODEL)
    tx = training.make_optimizer(tc, MODEL.d_model)
    state = jax.device_get(training.init_state(model, tx, seed=0, seq_len=T))
    batches = data.train_batches(data.load_corpus().train, seed=0, step=0, num_steps=2,
                                 batch_size=B, seq_len=T)
    step = functools.partial(training.train_steps, apply_fn=model.apply, tx=tx)
    reference = jax.device_get(jax.jit(step)(jax.device_put(state, jax.devices()[0]), batches))
    return state, batches, step, reference


@functools.cache
def _sharded(kind, mesh_spec, n):
    """Two steps under ``--parallel kind --mesh mesh_spec`` on the first n fake devices."""
    state, batches, step, _ = _setup()
    placement = parallel.resolve(kind, jax.devices()[:n], mesh_spec)
    fn = placement.compile(step, state)
    placed = jax.device_put(state, placement.shardings(state))
    new, m = fn(placed, placement.batches(lambda rows: batches[:, rows], batches.shape))
    return placement, new, m


# ---- the mesh flag ----------------------------------------------------------------------------


def test_mesh_flag_parsing_and_errors(devices):
    assert sharding.parse_mesh("data=2,fsdp=2,tensor=1", 4) == {"data": 2, "fsdp": 2,
                                                                "tensor": 1}
    assert sharding.parse_mesh("tensor=2,fsdp=-1", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sharding.parse_mesh("", 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match=r"--mesh 'data=3,fsdp=2'.* = 6 devices, but there are 4"):
        sharding.parse_mesh("data=3,fsdp=2", 4)
    for bad in ("pipeline=2", "data=two", "data=0", "data=2,data=2", "data=-1,fsdp=-1"):
        with pytest.raises(ValueError, match="--mesh"):
            sharding.parse_mesh(bad, 4)
    with pytest.raises(ValueError, match="--mesh"):
        mesh_axes("data:2")  # the syntax alone, as train.py checks it before any device
    with pytest.raises(ValueError, match="--mesh needs --parallel sharded or shard_map"):
        parallel.resolve("pmap", devices[:4], "data=4")
    p = parallel.resolve("auto", devices[:8], "data=2,fsdp=2,tensor=2")  # auto + mesh: sharded
    assert p.kind == "sharded" and p.batch_shards == 4
    assert dict(p.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.resolve("shard_map", devices[:4]).batch_shards == 4


def test_bad_mesh_on_the_command_line_exits_2(tmp_path, capsys):
    from transformer_jax.cli import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--preset", "tiny", "--parallel", "sharded", "--mesh", "data=3",
                    "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--mesh 'data=3'" in err and "there are 8" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before doing anything


def test_table_specs():
    shape = {"data": 2, "fsdp": 2, "tensor": 2}
    spec = lambda name, dims: sharding.spec_for(name, dims, shape)
    assert spec("params/layer_0/self_attention/qkv/kernel", (32, 3, 4, 8)) == P(
        "fsdp", None, "tensor", None)  # heads over tensor
    assert spec("params/layer_0/self_attention/out/kernel", (4, 8, 32)) == P("tensor", None,
                                                                             "fsdp")
    assert spec("opt_state/inner_state/1/0/nu/layer_0/mlp/wo/kernel", (64, 32)) == P("tensor",
                                                                                      "fsdp")
    assert spec("params/layer_0/mlp/wi/bias", (64,)) == P("tensor")
    assert spec("params/layer_0/ln_mlp/scale", (32,)) == P(None)
    assert spec("params/embed/embedding", (50257, 32)) == P(None, "fsdp")  # V rarely divides
    assert spec("params/layer_0/mlp/wi/kernel", (33, 64)) == P(None, "tensor")  # 2 ∤ 33: whole
    assert spec("step", ()) == P()


# ---- every path computes the one-device numbers -----------------------------------------------


@pytest.mark.parametrize("kind,mesh_spec,n", [
    ("sharded", "data=4", 4),                # pure data parallelism
    ("sharded", "data=2,fsdp=4", 8),         # FSDP (and DP across fsdp groups)
    ("sharded", "data=2,tensor=2", 4),       # DP × tensor parallelism
    ("shard_map", "data=4", 4),              # per-device step + lax.pmean
])
def test_step_equals_single_device(kind, mesh_spec, n):
    state, _, _, (ref_state, ref_m) = _setup()
    _, new, m = _sharded(kind, mesh_spec, n)
    new, m = jax.device_get((new, m))
    assert m["loss"].shape == (2,)
    _allclose(m["loss"], ref_m["loss"])
    _allclose(new.params, ref_state.params)
    _allclose(new.opt_state, ref_state.opt_state)
    assert int(new.step) == 2
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # not vacuous: the parameters moved


def test_state_keeps_the_table_shardings():
    state = _setup()[0]
    placement, new, _ = _sharded("sharded", "data=2,tensor=2", 4)
    assert all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in
               zip(jax.tree.leaves(new), jax.tree.leaves(placement.shardings(state))))
    qkv = new.params["layer_0"]["self_attention"]["qkv"]["kernel"]  # [D, 3, N, H], N = 2
    assert qkv.addressable_shards[0].data.shape == (32, 3, 1, 16)  # one head per device
    wi = new.params["layer_0"]["mlp"]["wi"]["kernel"]  # [D, F], F = 64
    assert wi.addressable_shards[0].data.shape == (32, 32)


def test_fsdp_shards_params_and_optimizer_state_over_fsdp():
    placement, new, _ = _sharded("sharded", "data=2,fsdp=4", 8)
    split = whole = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path((new.params, new.opt_state))[0]:
        name, local = sharding.path_name(path), leaf.addressable_shards[0].data.shape
        if name.endswith(("kernel", "embedding")):  # every weight matrix and its moments
            assert "fsdp" in leaf.sharding.spec, name
            assert np.prod(local) * 4 == np.prod(leaf.shape), name  # 1/fsdp per device
            split += leaf.nbytes
        else:
            assert local == leaf.shape, name  # biases, LayerNorm, counters: replicated
            whole += leaf.nbytes
    per_device = sum(s.data.nbytes for leaf in jax.tree.leaves((new.params, new.opt_state))
                     for s in leaf.addressable_shards if s.device == placement.devices[0])
    assert per_device == split // 4 + whole and whole < split / 10


# ---- data and checkpoints ---------------------------------------------------------------------


def test_each_device_loads_only_its_rows(devices):
    tokens = data.load_corpus().train
    full = data.train_batches(tokens, seed=3, step=5, num_steps=2, batch_size=8, seq_len=T)
    asked = []

    def load(rows):
        asked.append((rows.start, rows.stop))
        return data.train_batches(tokens, seed=3, step=5, num_steps=2, batch_size=8, seq_len=T,
                                  rows=rows)

    placement = parallel.resolve("sharded", devices[:8], "data=2,fsdp=2,tensor=2")
    batch = placement.batches(load, full.shape)
    np.testing.assert_array_equal(np.asarray(batch), full)
    # Four row blocks (tensor-parallel pairs share one load), each loaded once.
    assert sorted(asked) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_checkpoint_restores_onto_another_mesh(tmp_path, devices):
    state = _setup()[0]
    _, fsdp_state, _ = _sharded("sharded", "data=2,fsdp=4", 8)
    expected = jax.device_get(fsdp_state)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, fsdp_state, {"step": 2})
    for kind, mesh_spec, n in [("sharded", "fsdp=2,tensor=2", 4), ("none", "", 1)]:
        placement = parallel.resolve(kind, devices[:n], mesh_spec)
        with Checkpointer(tmp_path / "ckpt") as ckpt:
            restored = ckpt.restore(placement.target(state))
        assert restored.step == 2
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), expected)
        for a, s in zip(jax.tree.leaves(restored.state),
                        jax.tree.leaves(placement.shardings(state))):
            assert a.sharding.is_equivalent_to(s, a.ndim)


# ---- two processes on localhost ---------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Both kinds of data trained by one two-process launch: kind -> (folder, data, outputs)."""
    tmp = tmp_path_factory.mktemp("two_processes")
    text = tmp / "corpus.txt"
    text.write_bytes(bytes(data.load_corpus().train[:20_000].astype(np.uint8)))
    settings = prepare.PrepareSettings(vocab_size=512, val_tokens=2000, shard_bytes=4096)
    prepare.prepare_dataset([text], tmp / "ds", settings, log=lambda m: None)
    runs = {"text": (tmp / "text", text), "prepared": (tmp / "prepared", tmp / "ds")}
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    address = f"127.0.0.1:{_free_port()}"
    pairs = [str(x) for folder, data_file in runs.values() for x in (folder / "mp", data_file)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_worker.py"),
                               address, str(i), *pairs],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(NUM_PROCESSES)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        # The loop's log lines go to stdout too: the results are the JSON lines.
        outs.append([json.loads(line) for line in out.splitlines() if line.startswith('{')])
    return {kind: (folder, data_file, [o[i] for o in outs])
            for i, (kind, (folder, data_file)) in enumerate(runs.items())}


@pytest.mark.slow  # two fresh Python processes: ~20 s of CPU
@pytest.mark.xdist_group("two_processes")  # one launch for both (pyproject.toml: loadgroup)
@pytest.mark.parametrize("kind", ["text", "prepared"])  # raw bytes, or BPE shards on disk
def test_two_processes_match_one_process(two_process_runs, devices, kind):
    tmp_path, data_file, outs = two_process_runs[kind]
    for i, o in enumerate(outs):
        assert o == {**outs[0], "process": i}
    assert outs[0]["devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert (outs[0]["first_step"], outs[0]["resumed_from"], outs[0]["step"]) == (2, 2, 4)

    # The same four global batches on one device, without a restart: the pure step (no loop).
    tc = train_config(tmp_path / "one", data_file)
    model_cfg = dataclasses.replace(MODEL, vocab_size=prepared.data_vocab_size(tc.data.data))
    model = models.build_model("transformer", model_cfg)
    tx = training.make_optimizer(tc, MODEL.d_model)
    corpus = prepared.load_lm_data(tc.data.data, tc.data.val_fraction)
    batches = data.train_batches(corpus.train, seed=tc.seed, step=0, num_steps=4,
                                 batch_size=tc.data.batch_size, seq_len=tc.data.seq_len)
    state = training.init_state(model, tx, seed=tc.seed, seq_len=tc.data.seq_len)
    ref, _ = jax.device_get(jax.jit(functools.partial(training.train_steps, apply_fn=model.apply,
                                                      tx=tx))(state, batches))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(devices[0])), ref)
    with Checkpointer(tmp_path / "mp" / "checkpoints") as ckpt:
        restored = ckpt.restore(target, step=4)
    assert int(restored.state.step) == 4
    _allclose(jax.device_get(restored.state.params), ref.params)
    _allclose(jax.device_get(restored.state.opt_state), ref.opt_state)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref.params,
                         jax.device_get(state.params))
    assert max(jax.tree.leaves(moved)) > 1e-3
    # Only process 0 wrote the log: every step once.
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
