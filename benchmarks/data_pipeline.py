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

* ``prepare --pairs`` on generated aligned text pairs (two pseudo-languages, lognormal
  sentence lengths of about 20 words, the target 0.8-1.3x the source) at 100k pairs and at
  the size of WMT 2014 English-German, 4.5M pairs (quick: 500k), with the paper's shared
  vocabulary of 37,000 BPE tokens (§5.1): pairs/s and peak RSS;
* training's data path for pairs on each: batches of 25,000 tokens a side (§5.1) from
  :mod:`transformer_jax.data.token_batches`, pairs/s and tokens/s read, the real-token share,
  and peak RSS.

Targets (issue 15): encoding >= 2x the single-threaded loop; peak RSS at the big size within
10% (or 50 MB) of the small size's, for prepare and the data path; >= 1M tokens/s and <= 5% of
the step time for the data path. Issue 27: prepare --pairs at WMT size; >= 85% real tokens.
Writes results.json and results.md into benchmarks/results/data_pipeline/; ``--only pairs``
runs the pairs rows alone and writes them to benchmarks/results/data_pipeline/pairs/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.common and transformer_jax

import numpy as np

B, T, K = 12, 64, 10  # the previous default run's batch, sequence length and steps per call
CALLS = 200  # data-path calls timed per dataset (the same pages touched at either size)
FILE_MB = 64
BASELINE_MB = 5  # text the single-threaded loop encodes
PAIRS_SMALL, PAIRS_BIG, PAIRS_QUICK = 100_000, 4_500_000, 500_000  # WMT14 En-De: 4.5M pairs
PAIR_VOCAB = 37_000  # the paper's shared source-target BPE vocabulary (§5.1)
BATCH_TOKENS = 25_000  # "approximately 25000 source tokens and 25000 target tokens" (§5.1)
PAIR_CALLS = 40  # pair batches read per dataset


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


def generate_pairs(folder: Path, n_pairs: int, seed: int = 0) -> int:
    """Write ``n_pairs`` aligned pseudo-sentence pairs as ``folder/train.src`` and
    ``train.tgt`` (two vocabularies of Zipf-distributed words); returns the bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
    vocabs = [np.asarray([bytes(rng.choice(letters, rng.integers(1, 10))) for _ in range(30_000)],
                         dtype=object) for _ in range(2)]
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(folder / "train.src", "wb") as fs, open(folder / "train.tgt", "wb") as ft:
        for start in range(0, n_pairs, 100_000):
            n = min(100_000, n_pairs - start)
            src = np.clip(rng.lognormal(2.9, 0.55, n), 1, 100).astype(np.int64)
            tgt = np.clip(src * rng.uniform(0.8, 1.3, n), 1, 130).astype(np.int64)
            for f, lengths, vocab in ((fs, src, vocabs[0]), (ft, tgt, vocabs[1])):
                words = vocab[np.minimum(rng.zipf(1.2, lengths.sum()), 30_000) - 1].tolist()
                ends = np.cumsum(lengths).tolist()
                lines = b"\n".join(b" ".join(words[e - k:e]) for e, k in
                                   zip(ends, lengths.tolist())) + b"\n"
                f.write(lines)
                written += len(lines)
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
    import functools
    import statistics

    import jax

    from transformer_jax import data, models, train
    from transformer_jax.config import PRESETS, RECIPES

    tc = RECIPES["cpu-lm"].train.replace(batch_size=B, seq_len=T)
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


def child_prepare_pairs(src: str, out: str) -> dict:
    from transformer_jax.data.pair_files import pair_files
    from transformer_jax.data.prepare_pairs import PairSettings, prepare_pairs

    marks = {}
    files = pair_files([Path(src) / "train.src", Path(src) / "train.tgt"])
    t0 = time.perf_counter()
    meta = prepare_pairs(files, out, PairSettings(vocab_size=PAIR_VOCAB),
                         log=lambda m: marks.setdefault(m.split()[0], time.perf_counter()))
    wall = time.perf_counter() - t0
    text = sum(p.stat().st_size for p in files.paths)
    phases = {"scan_s": marks["training"] - t0, "bpe_s": marks["encoding"] - marks["training"],
              "encode_s": time.perf_counter() - marks["encoding"]}
    return {"pairs": meta["filters"]["read"], "text_mb": text / 1e6, "wall_s": wall,
            "pairs_per_s": meta["filters"]["read"] / wall, **phases,
            "kept": {k: v["pairs"] for k, v in meta["splits"].items()},
            "removed": meta["filters"]["removed"], "peak_rss_mb": _peak_mb()}


def child_pair_path(dataset: str) -> dict:
    from transformer_jax.data import token_batches as tb
    from transformer_jax.data.pair_dataset import open_pairs

    t0 = time.perf_counter()
    ds = open_pairs(dataset)
    plan = tb.plan_batches(ds.train.lengths, BATCH_TOKENS)
    setup = time.perf_counter() - t0
    special = {"pad_id": ds.pad_id, "bos_id": ds.bos_id, "eos_id": ds.eos_id}
    tb.train_batch(ds.train, plan, seed=0, step=0, **special)  # the first epoch's order
    base = _peak_mb()
    pairs = real = slots = 0
    t0 = time.perf_counter()
    for step in range(1, PAIR_CALLS + 1):
        batch = tb.train_batch(ds.train, plan, seed=0, step=step, **special)
        pairs, real = pairs + len(batch), real + int((batch != ds.pad_id).sum())
        slots += batch.size
    wall = time.perf_counter() - t0
    return {"train_pairs": len(ds.train), "setup_s": setup, "buckets": len(plan.boundaries),
            "batches_per_epoch": plan.batches_per_epoch, "s_per_batch": wall / PAIR_CALLS,
            "pairs_per_s": pairs / wall, "real_tokens_per_s": real / wall,
            "real_share": real / slots, "plan_real_share": plan.real_share,
            "peak_rss_mb": _peak_mb(), "rss_before_mb": base}


CHILDREN = {"prepare": child_prepare, "encode1": child_encode_one_by_one,
            "datapath": child_data_path, "step": child_step_time,
            "prepare_pairs": child_prepare_pairs, "pairpath": child_pair_path}


def run_pairs(tmp: str, quick: bool) -> dict:
    """The pairs rows: prepare --pairs and the pair batches at a small and the big size."""
    out = {"prepare": {}, "data_path": {}}
    for n in (PAIRS_SMALL, PAIRS_QUICK if quick else PAIRS_BIG):
        name = f"{n / 1e6:g}M pairs"
        src, ds = Path(tmp) / f"pairs-{n}", Path(tmp) / f"pairs-ds-{n}"
        t0 = time.perf_counter()
        size = generate_pairs(src, n, seed=n)
        print(name, f"generated {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s",
              flush=True)
        out["prepare"][name] = _child(["prepare_pairs", str(src), str(ds)])
        print(name, "prepare --pairs", out["prepare"][name], flush=True)
        out["data_path"][name] = _child(["pairpath", str(ds)])
        print(name, "pair batches", out["data_path"][name], flush=True)
        shutil.rmtree(src)
        shutil.rmtree(ds)
    return out


def _pair_rows(r: dict) -> list[dict]:
    return [{"pairs": n, "prepare pairs/s": p["pairs_per_s"], "prepare wall s": p["wall_s"],
             "scan / BPE / encode s": f"{p['scan_s']:.0f} / {p['bpe_s']:.0f} / "
                                      f"{p['encode_s']:.0f}",
             "prepare peak RSS MB": p["peak_rss_mb"],
             "batches pairs/s": r["data_path"][n]["pairs_per_s"],
             "real-token share": r["data_path"][n]["real_share"],
             "batches peak RSS MB": r["data_path"][n]["peak_rss_mb"]}
            for n, p in r["prepare"].items()]


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


def run_lm(tmp: str, quick: bool) -> tuple[dict, str]:
    """The language-model rows: prepare, the data path, the serial encode, the step time."""
    big_mb = 100 if quick else 2000
    big = f"{big_mb}MB" if big_mb < 1000 else f"{big_mb // 1000}GB"
    r = {"prepare": {}, "data_path": {}}
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
        shutil.rmtree(src)
        shutil.rmtree(ds)
    r["step"] = _child(["step"])
    print("default step", r["step"], flush=True)
    return r, big


def _pair_goals(p: dict) -> list[dict]:
    small, big = list(p["prepare"])
    return [
        {"target": f"prepare --pairs at {big}: completes, pairs/s",
         "value": p["prepare"][big]["pairs_per_s"], "limit": "runs", "met": True},
        {"target": f"prepare --pairs peak RSS {big} vs {small} (MB)",
         "value": f"{p['prepare'][big]['peak_rss_mb']:.0f} vs "
                  f"{p['prepare'][small]['peak_rss_mb']:.0f}",
         "limit": "reported (8 bytes a pair grow with the corpus)", "met": True},
        {"target": f"real-token share of 25k-token batches ({big})",
         "value": p["data_path"][big]["real_share"], "limit": ">= 0.85",
         "met": p["data_path"][big]["real_share"] >= 0.85},
    ]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(CHILDREN[argv[1]](*argv[2:])))
        return 0
    from benchmarks import common

    parser = common.arg_parser(__doc__, "a 100 MB big corpus instead of 2 GB, 500k pairs "
                                        "instead of 4.5M")
    parser.add_argument("--tmp", default=None, help="where the corpora go (default: $TMPDIR)")
    parser.add_argument("--only", choices=("lm", "pairs"), default=None,
                        help="run only the language-model or only the pairs rows")
    args = parser.parse_args(argv)
    r, goals, parts = {}, [], ["# Data pipeline"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="data_pipeline-") as tmp:
        if args.only != "pairs":
            r, big = run_lm(tmp, args.quick)
            goals += _goals(r, big)
        if args.only != "lm":
            r["pairs"] = run_pairs(tmp, args.quick)
            goals += _pair_goals(r["pairs"])
    common.print_targets(goals, lambda v: v if isinstance(v, str) else f"{v:.3g}")
    machine = common.describe_machine()
    command = " ".join(["python benchmarks/data_pipeline.py", *argv])
    parts.append(f"Machine: {machine['device']}; {machine['date']}. Command: `{command}`.")
    if args.only != "pairs":
        rows = [{"corpus": n, "prepare MB/s": p["mb_per_s"],
                 "encode MB/s": p["encode_mb_per_s"], "prepare peak RSS MB": p["peak_rss_mb"],
                 "data path tokens/s": r["data_path"][n]["tokens_per_s"],
                 "data path peak RSS MB": r["data_path"][n]["peak_rss_mb"]}
                for n, p in r["prepare"].items()]
        parts += [common.markdown_table(rows, [(k, k) for k in rows[0]]),
                  (f"Single-threaded encode loop: {r['encode1']['mb_per_s']:.2f} MB/s. Small "
                   f"train call (cpu-gpt, B {B}, T {T}, {K} steps): "
                   f"{r['step']['s_per_call']:.3f} s.")]
    if args.only != "lm":
        rows = _pair_rows(r["pairs"])
        parts += [(f"Text pairs (prepare --pairs, BPE {PAIR_VOCAB:,}; batches of "
                   f"{BATCH_TOKENS:,} tokens a side):"),
                  common.markdown_table(rows, [(k, k) for k in rows[0]])]
    parts.append(common.targets_table(goals))
    name = "data_pipeline/pairs" if args.only == "pairs" else "data_pipeline"
    out = common.write_results(name, {"machine": machine, "quick": args.quick,
                                                 "command": command, "results": r,
                                                 "targets": goals,
                                                 "wall_s": time.perf_counter() - t0},
                               "\n\n".join(parts), args.out)
    print(f"wrote {out}/results.json, results.md ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
