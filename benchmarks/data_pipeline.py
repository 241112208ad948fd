"""Data pipeline: ``prepare`` throughput and memory, and the tokens/s training's data path serves.

    python benchmarks/data_pipeline.py --quick     # 20 MB and 100 MB corpora, ~2 min on 2 cores
    python benchmarks/data_pipeline.py             # 20 MB and 2 GB

On generated corpora (Zipf-distributed pseudo-words, in 64 MB files, written to a temporary
folder and deleted afterwards) it measures, each in a fresh process so that peak RSS
(``VmHWM``) belongs to one job:

* ``prepare`` (BPE, vocabulary 8192) at both sizes: MB of text per second over the whole run
  and over its encoding phase, and peak RSS;
* a single-threaded loop over the same tokenizer (``Tokenizer.encode`` one piece at a time,
  nothing written) on the first 5 MB of the big corpus, right after its ``prepare``: the
  baseline of the encoding throughput, timed next to what it is compared with;
* training's data path on each prepared dataset: ``train_batches`` windows of the default
  shape (B 12, T 64, 10 steps per call) from the shards on disk, then ``jax.device_put``
  (host -> device), for a fixed number of calls: tokens/s and peak RSS;
* a small model's compiled train call (cpu-gpt, B 12, T 64, 10 steps: a shorter step than the
  default run's, so the data path's share is not understated), measured on the same machine.

Targets (issue 15): encoding >= 2x the single-threaded loop; peak RSS at the big size within
10% (or 50 MB) of the small size's, for prepare and the data path; >= 1M tokens/s and <= 5% of
the step time for the data path. Writes results.json and results.md into
benchmarks/results/data_pipeline/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.common and transformer_jax

import numpy as np  # noqa: E402

B, T, K = 12, 64, 10  # the previous default run's batch, sequence length and steps per call
CALLS = 200  # data-path calls timed per dataset (the same pages touched at either size)
FILE_MB = 64
BASELINE_MB = 5  # text the single-threaded loop encodes


def _peak_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: a child starts with its
    parent's ru_maxrss (it survives fork and exec), while VmHWM restarts with the new image."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def generate(folder: Path, megabytes: int, seed: int = 0) -> int:
    """Write ``megabytes`` MB of pseudo-English into ``folder``; returns the bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
    vocab = [bytes(rng.choice(letters, rng.integers(1, 10))) for _ in range(30_000)] + [b"\n"]
    words = np.asarray(vocab, dtype=object)
    folder.mkdir(parents=True, exist_ok=True)
    written, target, index = 0, megabytes * 10**6, 0
    while written < target:
        with open(folder / f"part-{index:04d}.txt", "wb") as f:
            size = 0
            while size < min(FILE_MB * 10**6, target - written):
                ids = np.minimum(rng.zipf(1.2, 500_000), 30_000) - 1
                ids[::13] = 30_000  # a newline every 13 words
                chunk = b" ".join(words[ids].tolist())
                f.write(chunk)
                size += len(chunk)
        written += size
        index += 1
    return written


def _child(argv: list[str]) -> dict:
    """Run one job of this script in a fresh process; returns its JSON line."""
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True,
                         text=True, check=False, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{argv[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_prepare(src: str, out: str) -> dict:
    from transformer_jax.data.prepare import PrepareSettings, prepare_dataset

    marks = {}
    t0 = time.perf_counter()
    meta = prepare_dataset([src], out, PrepareSettings(),
                           log=lambda m: marks.setdefault(m.split()[0], time.perf_counter()))
    wall = time.perf_counter() - t0
    text = sum(s["bytes"] for s in meta["splits"].values())
    encode = time.perf_counter() - marks["encoding"]
    return {"text_mb": text / 1e6, "wall_s": wall, "mb_per_s": text / 1e6 / wall,
            "encode_s": encode, "encode_mb_per_s": text / 1e6 / encode,
            "tokens": sum(s["tokens"] for s in meta["splits"].values()),
            "peak_rss_mb": _peak_mb()}


def child_encode_one_by_one(dataset: str, src: str) -> dict:
    from transformer_jax.data import sources
    from transformer_jax.data.prepared import open_dataset

    tok = open_dataset(dataset).tokenizer._tok  # the library tokenizer, encoded serially
    files = [sources.Source(p) for p in sorted(Path(src).iterdir())]
    t0, size = time.perf_counter(), 0
    for text, _ in sources.iter_pieces(files):
        tok.encode(text, add_special_tokens=False)
        size += len(text.encode("utf-8"))
        if size >= BASELINE_MB * 10**6:  # a rate: a few MB measure it as well as 20
            break
    wall = time.perf_counter() - t0
    return {"text_mb": size / 1e6, "wall_s": wall, "mb_per_s": size / 1e6 / wall}


def child_data_path(dataset: str) -> dict:
    import jax

    from transformer_jax import data
    from transformer_jax.data.prepared import open_dataset

    ds = open_dataset(dataset)
    jax.block_until_ready(jax.device_put(np.zeros((K, B, T + 1), np.int32)))
    base = _peak_mb()
    t0 = time.perf_counter()
    for call in range(CALLS):
        batch = data.train_batches(ds.train, seed=0, step=call * K, num_steps=K, batch_size=B,
                                   seq_len=T)
        jax.block_until_ready(jax.device_put(batch))
    wall = time.perf_counter() - t0
    return {"train_tokens": len(ds.train), "calls": CALLS, "s_per_call": wall / CALLS,
            "tokens_per_s": CALLS * K * B * T / wall, "peak_rss_mb": _peak_mb(),
            "rss_before_mb": base}


def child_step_time() -> dict:
    """Seconds of the default model's compiled train call (K steps of B x T), median of 5."""
    import dataclasses
    import functools
    import statistics

    import jax

    from transformer_jax import data, models, train
    from transformer_jax.config import PRESETS
    from transformer_jax.train import tasks

    tc = dataclasses.replace(tasks.defaults("lm"), batch_size=B, seq_len=T)
    model = models.build_model("transformer", PRESETS["cpu-gpt"])
    tx = train.make_optimizer(tc, PRESETS["cpu-gpt"].d_model)
    state = train.init_state(model, tx, seed=0, seq_len=T)
    batches = data.train_batches(data.load_corpus().train, seed=0, step=0, num_steps=K,
                                 batch_size=B, seq_len=T)
    step = jax.jit(functools.partial(train.train_steps, apply_fn=model.apply, tx=tx))
    jax.block_until_ready(step(state, batches))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(step(state, batches))
        times.append(time.perf_counter() - t0)
    return {"s_per_call": statistics.median(times)}


CHILDREN = {"prepare": child_prepare, "encode1": child_encode_one_by_one,
            "datapath": child_data_path, "step": child_step_time}


def _goals(r: dict, big: str) -> list[dict]:
    def flat(a, b):
        return abs(b - a) <= max(0.1 * a, 50.0)

    p_big = r["prepare"][big]
    d_small, d_big = r["data_path"]["20MB"], r["data_path"][big]
    share = d_big["s_per_call"] / r["step"]["s_per_call"]
    return [
        {"target": f"prepare encoding ({big}) vs a single-threaded loop",
         "value": p_big["encode_mb_per_s"] / r["encode1"]["mb_per_s"], "limit": ">= 2x",
         "met": p_big["encode_mb_per_s"] >= 2 * r["encode1"]["mb_per_s"]},
        {"target": f"prepare peak RSS {big} vs 20 MB (MB)",
         "value": f"{p_big['peak_rss_mb']:.0f} vs {r['prepare']['20MB']['peak_rss_mb']:.0f}",
         "limit": "within 10% or 50 MB",
         "met": flat(r["prepare"]["20MB"]["peak_rss_mb"], p_big["peak_rss_mb"])},
        {"target": f"data path peak RSS {big} vs 20 MB (MB)",
         "value": f"{d_big['peak_rss_mb']:.0f} vs {d_small['peak_rss_mb']:.0f}",
         "limit": "within 10% or 50 MB", "met": flat(d_small["peak_rss_mb"], d_big["peak_rss_mb"])},
        {"target": "data path tokens/s per host", "value": d_big["tokens_per_s"],
         "limit": ">= 1e6", "met": d_big["tokens_per_s"] >= 1e6},
        {"target": "data path share of the default step", "value": share, "limit": "<= 0.05",
         "met": share <= 0.05},
    ]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(CHILDREN[argv[1]](*argv[2:])))
        return 0
    from benchmarks import common

    parser = common.arg_parser(__doc__, "a 100 MB big corpus instead of 2 GB (~2 min)")
    parser.add_argument("--tmp", default=None, help="where the corpora go (default: $TMPDIR)")
    args = parser.parse_args(argv)
    big_mb = 100 if args.quick else 2000
    big = f"{big_mb}MB" if big_mb < 1000 else f"{big_mb // 1000}GB"
    r = {"prepare": {}, "data_path": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="data_pipeline-") as tmp:
        for name, mb in (("20MB", 20), (big, big_mb)):
            src, ds = Path(tmp) / f"src-{name}", Path(tmp) / f"ds-{name}"
            generate(src, mb, seed=mb)
            r["prepare"][name] = _child(["prepare", str(src), str(ds)])
            print(name, "prepare", r["prepare"][name], flush=True)
            r["data_path"][name] = _child(["datapath", str(ds)])
            print(name, "data path", r["data_path"][name], flush=True)
            if name != "20MB":  # right after the big prepare: the machine's speed drifts
                r["encode1"] = _child(["encode1", str(ds), str(src)])
                print(name, "single-threaded encode", r["encode1"], flush=True)
    r["step"] = _child(["step"])
    print("default step", r["step"], flush=True)
    goals = _goals(r, big)
    common.print_targets(goals, lambda v: v if isinstance(v, str) else f"{v:.3g}")
    rows = [{"corpus": n, "prepare MB/s": p["mb_per_s"], "encode MB/s": p["encode_mb_per_s"],
             "prepare peak RSS MB": p["peak_rss_mb"],
             "data path tokens/s": r["data_path"][n]["tokens_per_s"],
             "data path peak RSS MB": r["data_path"][n]["peak_rss_mb"]}
            for n, p in r["prepare"].items()]
    machine = common.describe_machine()
    md = "\n\n".join([
        "# Data pipeline", f"Machine: {machine['device']}; {machine['date']}.",
        common.markdown_table(rows, [(k, k) for k in rows[0]]),
        (f"Single-threaded encode loop: {r['encode1']['mb_per_s']:.2f} MB/s. Small "
         f"train call (cpu-gpt, B {B}, T {T}, {K} steps): {r['step']['s_per_call']:.3f} s."),
        common.targets_table(goals)])
    out = common.write_results("data_pipeline", {"machine": machine, "quick": args.quick,
                                                 "results": r, "targets": goals,
                                                 "wall_s": time.perf_counter() - t0},
                               md, args.out)
    print(f"wrote {out}/results.json, results.md ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
