"""Transformer vs. recurrence: throughput at matched parameter budgets across sequence lengths.

The paper's Table 1 argument: a self-attention layer does O(n²·d) work in O(1) sequential
steps, a recurrent layer O(n·d²) work in O(n) sequential steps. This script measures what that
means for our code on the machine at hand. Per model (TransformerLM, LSTMLM, GRULM), parameter
budget (~1M, ~3M, ~10M, the RNN width matched to the Transformer's count) and length T:

  * ``train``    — tokens/s of train.py's optimizer step (``train.train_step``), batch 16
  * ``forward``  — tokens/s of a forward pass, batch 16 and batch 1 (its latency in ms)
  * ``generate`` — tokens/s of autoregressive sampling, batch 1 (KV cache vs recurrent state)

with FLOPs per token, achieved GFLOP/s and the sequential steps on the critical path. Models of
one (budget, T, mode) are timed interleaved, so machine load hits them alike.

    python benchmarks/transformer_vs_rnn.py --quick   # the target points (3M, T 256/512)
    python benchmarks/transformer_vs_rnn.py           # the sweep T = 64 … 2048, 3 budgets
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.common and transformer_jax

from benchmarks import common  # noqa: E402
from transformer_jax import decoding, train  # noqa: E402
from transformer_jax.config import RECIPES, ModelConfig  # noqa: E402
from transformer_jax.models import RNNLM, TransformerLM, accounting, match_rnn_width  # noqa: E402

DEFAULT_RUN = RECIPES["cpu-lm"].train  # the default run's training settings

VOCAB = 256
# Transformer shapes per budget (pre-LN, sinusoidal positions so the count does not depend on
# T, d_ff = 4·d_model, tied output embedding). The targets are set at 3M (4 × 256).
BUDGETS = {"1M": (4, 144, 4), "3M": (4, 256, 4), "10M": (6, 384, 6)}  # (layers, D, heads)
RNN_LAYERS = 2
PROMPT = 16
# On a CPU, skip points whose step would take tens of seconds (recorded as skipped).
CPU_MAX_STEP_FLOPS = 4e11


def transformer_config(budget: str, max_len: int) -> ModelConfig:
    layers, d, heads = BUDGETS[budget]
    return ModelConfig(vocab_size=VOCAB, d_model=d, num_heads=heads, num_encoder_layers=0,
                       num_decoder_layers=layers, d_ff=4 * d, dropout_rate=0.0,
                       max_len=max_len, norm="pre", positions="sinusoidal",
                       share_embeddings=True)


def build_models(budget: str, max_len: int, cells) -> dict:
    """name -> (flax module, config, params count), RNN widths matched to the Transformer."""
    cfg = transformer_config(budget, max_len)
    models = {"transformer": (TransformerLM(cfg), cfg)}
    n = common.lm_num_params(models["transformer"][0])
    for cell in cells:
        rcfg = match_rnn_width(n, cell_type=cell, num_layers=RNN_LAYERS, vocab_size=VOCAB)
        models[cell] = (RNNLM(rcfg, cell), rcfg)
    return {k: (m, c, common.lm_num_params(m)) for k, (m, c) in models.items()}


def flops_per_token(name: str, model, cfg: ModelConfig, T: int, mode: str) -> float:
    """Model FLOPs per token as train.py counts them (6N + 12·L·T·D, or the RNN's gate
    matmuls); a forward pass is a third of a training step."""
    per_step = accounting.lm_flops_per_token(common.lm_param_shapes(model), cfg, T, name)
    return per_step if mode == "train" else per_step / 3


def sequential_steps(name: str, cfg: ModelConfig, T: int, mode: str, new_tokens: int) -> int:
    """Dependent steps on the critical path as our code runs them."""
    layers = cfg.num_decoder_layers
    if mode == "generate":
        return new_tokens * layers  # one token after the other, for both families
    return layers if name == "transformer" else layers * T  # the RNN scans each layer over T


def make_call(name, model, cfg, params, mode, B, T, new_tokens):
    """A zero-argument callable running one measured unit of work."""
    tokens = jax.random.randint(jax.random.PRNGKey(T), (B, T), 0, VOCAB)
    if mode == "forward":
        fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
        return functools.partial(fwd, params, tokens)
    if mode == "generate":
        prompt = tokens[:, :PROMPT]
        return functools.partial(decoding.generate, model, params, prompt, new_tokens,
                                 rng=jax.random.PRNGKey(0), temperature=1.0)
    # The step train.py runs: AdamW + clipping inside apply_if_finite, state donated.
    tc = DEFAULT_RUN.replace(model=name, steps=1000, batch_size=B, seq_len=T, lr=1e-3)
    tx = train.make_optimizer(tc, cfg.d_model)
    step = jax.jit(functools.partial(train.train_step, apply_fn=model.apply, tx=tx),
                   donate_argnums=0)
    state = {"s": train.init_state(model, tx, seed=0, seq_len=T)}
    batch = jax.random.randint(jax.random.PRNGKey(T), (B, T + 1), 0, VOCAB)

    def run():
        state["s"], metrics = step(state["s"], batch)
        return metrics["loss"]

    return run


def plan(quick: bool):
    """(budget, T, mode, batch, models) points; quick measures exactly the targets."""
    if quick:
        return [("3M", 512, "train", 16, ("transformer", "lstm")),
                ("3M", 256, "forward", 1, ("transformer", "lstm")),
                ("3M", 256, "forward", 16, ("transformer", "lstm")),
                ("3M", PROMPT + 64, "generate", 1, ("transformer", "lstm"))]
    pts = []
    for budget in BUDGETS:
        for T in (64, 128, 256, 512, 1024, 2048):
            for mode, B in (("train", 16), ("forward", 16), ("forward", 1)):
                pts.append((budget, T, mode, B, ("transformer", "lstm", "gru")))
        pts.append((budget, PROMPT + 256, "generate", 1, ("transformer", "lstm", "gru")))
    return pts


def measure(points, repeats: int, on_cpu: bool):
    records, cache = [], {}
    for budget, T, mode, B, names in points:
        key = (budget, T)
        if key not in cache:
            cache[key] = build_models(budget, max(T, 64), ("lstm", "gru"))
        models = cache[key]
        new_tokens = T - PROMPT if mode == "generate" else 0
        fns, meta = {}, {}
        for name in names:
            model, cfg, n = models[name]
            flops = flops_per_token(name, model, cfg,
                                    PROMPT + new_tokens // 2 if mode == "generate" else T, mode)
            if on_cpu and flops * B * T > CPU_MAX_STEP_FLOPS:
                print(f"skip {name} {budget} T={T} {mode} B={B} (too slow for a CPU)")
                continue
            params = None if mode == "train" else model.init(  # train builds its own state
                jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
            fns[name] = make_call(name, model, cfg, params, mode, B, T, new_tokens)
            meta[name] = (cfg, n, flops)
        if not fns:
            continue
        reps = repeats if T <= 512 else max(3, repeats // 2)
        times = common.time_round_robin(fns, reps)
        for name, seconds in times.items():
            cfg, n, flops = meta[name]
            tokens = B * (new_tokens if mode == "generate" else T)
            tps = tokens / seconds
            records.append(dict(
                model=name, budget=budget, params=n, width=cfg.d_model,
                layers=cfg.num_decoder_layers, seq_len=T, batch=B, mode=mode,
                tokens_per_s=tps, latency_ms=seconds * 1e3, flops_per_token=flops,
                achieved_gflops=flops * tps / 1e9,
                sequential_steps=sequential_steps(name, cfg, T, mode, new_tokens)))
        line = ", ".join(f"{r['model']} {r['tokens_per_s']:,.0f} tok/s"
                         for r in records[-len(times):])
        print(f"{budget} T={T} {mode} B={B}: {line}", flush=True)
    return records


def ratios(records):
    """Transformer / LSTM tokens/s per point (latency: LSTM / Transformer, i.e. speed-up)."""
    out = []
    for r in records:
        if r["model"] != "transformer":
            continue
        for other in ("lstm", "gru"):
            o = next((x for x in records if x["model"] == other and all(
                x[k] == r[k] for k in ("budget", "seq_len", "batch", "mode"))), None)
            if o:
                out.append(dict(budget=r["budget"], seq_len=r["seq_len"], batch=r["batch"],
                                mode=r["mode"], versus=other,
                                speedup=r["tokens_per_s"] / o["tokens_per_s"]))
    return out


def targets(speedups, on_gpu: bool):
    def find(**kw):
        return next((s["speedup"] for s in speedups if all(s[k] == v for k, v in kw.items())),
                    None)

    goals = [
        ("train tokens/s, Transformer / LSTM (3M, T 512, B 16)",
         find(budget="3M", seq_len=512, batch=16, mode="train", versus="lstm"), 1.5),
        ("batch-1 forward latency, LSTM / Transformer (3M, T 256)",
         find(budget="3M", seq_len=256, batch=1, mode="forward", versus="lstm"), 3.0),
    ]
    if on_gpu:
        goals.append(("GPU train tokens/s, Transformer / LSTM (3M, T 1024, B 16)",
                      find(budget="3M", seq_len=1024, batch=16, mode="train", versus="lstm"),
                      10.0))
    return [dict(target=t, value=v, limit=f"≥ {lim}", met=None if v is None else v >= lim)
            for t, v, lim in goals]


def plot(records, speedups, out_dir: Path):
    fig, axes = common.figure(3, figsize=(16, 4.4), dpi=110)
    styles = {"1M": ":", "3M": "-", "10M": "--"}
    for name, color in (("transformer", "C0"), ("lstm", "C1"), ("gru", "C2")):
        for budget, ls in styles.items():
            pts = sorted((r["seq_len"], r["tokens_per_s"], r["achieved_gflops"]) for r in records
                         if r["model"] == name and r["budget"] == budget
                         and r["mode"] == "train")
            if not pts:
                continue
            T, tps, gf = zip(*pts)
            axes[0].plot(T, tps, ls, color=color, marker="o", label=f"{name} {budget}")
            axes[1].plot(T, gf, ls, color=color, marker="o", label=f"{name} {budget}")
    for budget, ls in styles.items():
        for mode, B, color in (("train", 16, "C3"), ("forward", 1, "C4")):
            pts = sorted((s["seq_len"], s["speedup"]) for s in speedups
                         if s["budget"] == budget and s["mode"] == mode and s["batch"] == B
                         and s["versus"] == "lstm")
            if pts:
                axes[2].plot(*zip(*pts), ls, color=color, marker="o",
                             label=f"{mode} B{B} {budget}")
    axes[2].axhline(1.0, color="gray", lw=0.8)
    titles = ("training tokens/s (B 16)", "achieved GFLOP/s (training)",
              "Transformer / LSTM speed")
    for ax, title in zip(axes, titles):
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    common.save_figure(fig, out_dir / "transformer_vs_rnn.png")


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__, "only the target points")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per point")
    args = parser.parse_args(argv)
    machine = common.describe_machine()
    on_cpu = machine["platform"] == "cpu"
    print(f"device: {machine['device']}", flush=True)
    repeats = args.repeats or (5 if args.quick else 7)
    records = measure(plan(args.quick), repeats, on_cpu)
    speedups = ratios(records)
    goals = targets(speedups, not on_cpu)
    cols = [("model", "model"), ("budget", "budget"), ("params", "params"),
            ("width", "width"), ("seq_len", "T"), ("batch", "B"), ("mode", "mode"),
            ("tokens_per_s", "tokens/s"), ("latency_ms", "ms/call"),
            ("flops_per_token", "FLOPs/token"), ("achieved_gflops", "GFLOP/s"),
            ("sequential_steps", "sequential steps")]
    md = [f"# Transformer vs RNN\n\nDevice: {machine['device']}; jax {machine['jax_version']}; "
          f"{machine['date']}. Median of {repeats} interleaved runs.\n",
          "## Targets\n", common.targets_table(goals),
          "\n## Speed-ups (Transformer tokens/s ÷ RNN tokens/s)\n",
          common.markdown_table(speedups, [("budget", "budget"), ("seq_len", "T"),
                                           ("batch", "B"), ("mode", "mode"), ("versus", "vs"),
                                           ("speedup", "speed-up")]),
          "\n## All measurements\n", common.markdown_table(records, cols)]
    out = common.write_results(
        "transformer_vs_rnn", dict(machine, records=records, speedups=speedups, targets=goals,
                                   quick=args.quick),
        "\n".join(md), args.out)
    plot(records, speedups, out)
    common.print_targets(goals, lambda v: f"{v:.2f}×")
    print(f"wrote {out}/results.json, results.md, transformer_vs_rnn.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
