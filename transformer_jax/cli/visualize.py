"""Look inside: attention heatmaps, training curves and the sinusoidal position encoding.

    python -m transformer_jax.visualize attention --run DIR --text "..." [--layer L]
        [--head H|mean] --out F.png
    python -m transformer_jax.visualize attention --run DIR --src "..." [--tgt "..."]
        [--kind encoder|decoder|cross] [--layer L] [--head H|mean] --out F.png
    python -m transformer_jax.visualize curves RUN_DIR [RUN_DIR ...] --out F.png
    python -m transformer_jax.visualize positions --d-model D --max-len T --out F.png

``attention`` loads the newest checkpoint of a run and plots softmax(QKᵀ/√d_k) for one head
(``--head H``), the mean of a layer's heads (``--head mean``) or all of them as a grid; tokens
label the axes (query rows, key columns). For an encoder–decoder run (``train.py --task ...``),
``--src``/``--tgt`` give the sentence pair (``--tgt`` defaults to the model's own beam-search
translation) and ``--kind`` picks encoder self-, decoder self- or cross-attention (the
default); ``--layer`` counts layers of that kind. The RNN translator (``--model lstm|gru``) has
one attention, its decoder's over the source (Luong et al. 2015, §3.1): ``--kind cross`` draws
it. Errors exit with status 2 and one line; Ctrl-C with 130 and one line.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from transformer_jax import decoding
from transformer_jax.cli import common as cli
from transformer_jax.data.seq2seq_tasks import BOS
from transformer_jax.models import RNNSeq2Seq, sinusoidal_positions
from transformer_jax.runs.checkpoint import CheckpointError
from transformer_jax.runs.load import LoadedRun, load_run
from transformer_jax.runs.metrics import read_jsonl

__all__ = ["attention_maps", "head_panels", "main", "plot_attention", "plot_curves",
           "plot_positions"]

# Readable glyphs for bytes that would otherwise be invisible on an axis.
_GLYPHS = {" ": "␣", "\n": "⏎", "\t": "⇥"}
_MAX_TOKENS = 64  # beyond this the labels of a heatmap are unreadable


class VisualizeError(ValueError):
    """A bad argument: reported as one line, exit status 2."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(tokenizer, ids) -> list[str]:
    out = []
    for i in np.asarray(ids).tolist():
        text = tokenizer.decode(np.asarray([i]))
        out.append(_GLYPHS.get(text, text if text.isprintable() and text else f"\\x{i:02x}"))
    return out


def attention_maps(model, params, *args) -> dict[str, np.ndarray]:
    """Every attention layer's probabilities for one forward pass.

    Args:
      model: a TransformerLM (``args = (tokens[1, T],)``), Transformer or RNNSeq2Seq
        (``args = (src[1, S], tgt[1, T])``).
      params: its parameters.

    Returns:
      ``{"layer_0/self_attention": [N, T, S], ...}`` as float32 NumPy arrays, in layer order;
      an RNNSeq2Seq's one attention (its decoder's over the source) is ``"attention"`` [1, T, S].
    """
    _, state = model.apply({"params": params}, *args, mutable=["intermediates"])
    maps = {}
    flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    for path, value in flat:
        names = [str(p.key) for p in path if hasattr(p, "key")]  # sow stores a tuple: skip [0]
        if "attention_weights" in names:
            name = "/".join(n for n in names if n != "attention_weights") or "attention"
            maps[name] = np.asarray(value, np.float32)[0]
    return dict(sorted(maps.items(), key=lambda kv: _layer_order(kv[0])))


def _layer_order(name: str):
    block, _, kind = name.partition("/")
    prefix, _, index = block.rpartition("_")
    return prefix, int(index) if index.isdigit() else 0, kind


def head_panels(probs: np.ndarray, head: int | str | None = None
                ) -> tuple[np.ndarray, list[str]]:
    """What :func:`plot_attention` draws of probabilities [N, T, S].

    Args:
      probs: one layer's attention probabilities [N, T, S].
      head: a head's index, ``"mean"`` (the heads' probabilities averaged: still a distribution
        over the keys in every row), or None (every head).

    Returns:
      (panels [P, T, S], their titles): P is N for every head, else 1.
    """
    n = probs.shape[0]
    if head == "mean":
        return probs.mean(axis=0, keepdims=True), [f"mean of {n} head{'s' * (n != 1)}"]
    heads = list(range(n)) if head is None else [int(head)]
    return probs[heads], [f"head {h}" for h in heads]


def plot_attention(probs: np.ndarray, rows: Sequence[str], cols: Sequence[str], out: Path, *,
                   title: str, head: int | str | None = None) -> None:
    """Heatmap(s) of probabilities [N, T, S]: one head, the heads' mean, or a grid of all
    heads (see :func:`head_panels`)."""
    plt = _pyplot()
    panels, names = head_panels(probs, head)
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    size = 2.2 + 0.13 * max(len(rows), len(cols))
    # Constrained layout makes room for the title above the heads' titles; with a fixed
    # position, the short figure of a short sentence put it over them.
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fontsize = max(5, min(10, 400 // max(len(rows), len(cols), 1)))
    for i, (ax, panel, name) in enumerate(zip(axes.flat, panels, names)):
        im = ax.imshow(panel, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(cols)), cols, fontsize=fontsize, rotation=90)
        ax.set_xlabel("key (attended to)", fontsize=8)
        # Query labels on the first column only: the grid's rows share them, and labels of
        # the next column would overlap the heatmap to their left.
        ax.set_yticks(range(len(rows)), rows if i % ncols == 0 else [], fontsize=fontsize)
        if i % ncols == 0:
            ax.set_ylabel("query", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention probability")
    fig.suptitle(title)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_curves(run_dirs: Sequence[Path], out: Path) -> None:
    """Loss, validation loss, learning rate and tokens/s vs step and wall time, runs overlaid."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = [("loss", "training loss (nats/token)"), ("val_loss", "validation loss"),
              ("lr", "learning rate")]
    for i, run in enumerate(run_dirs):
        records = read_jsonl(run / "metrics.jsonl")
        label, color = run.name, f"C{i}"
        for col, (key, title) in enumerate(panels):
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                axes[0, col].plot(*zip(*pts), color=color, label=label, marker="." if
                                  key == "val_loss" else None)
            axes[0, col].set(title=title, xlabel="step")
        timed = [(r["time_s"], r[k]) for r in records for k in ("loss",)
                 if r.get("time_s") is not None and r.get(k) is not None]
        if timed:
            axes[1, 0].plot(*zip(*timed), color=color, label=label)
        val_t = [(r["time_s"], r["val_loss"]) for r in records
                 if r.get("time_s") is not None and r.get("val_loss") is not None]
        if val_t:
            axes[1, 1].plot(*zip(*val_t), color=color, marker=".", label=label)
        tps = [(r["step"], r["tokens_per_s"]) for r in records if r.get("tokens_per_s")]
        if tps:
            axes[1, 2].plot(*zip(*tps), color=color, label=label)
    axes[1, 0].set(title="training loss vs wall time", xlabel="seconds")
    axes[1, 1].set(title="validation loss vs wall time", xlabel="seconds")
    axes[1, 2].set(title="throughput (tokens/s)", xlabel="step")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_positions(d_model: int, max_len: int, out: Path) -> None:
    """The §3.5 encoding PE[pos, i] and the similarity PE·PEᵀ between positions."""
    plt = _pyplot()
    pe = sinusoidal_positions(max_len, d_model)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    im = axes[0].imshow(pe, cmap="RdBu", aspect="auto", vmin=-1, vmax=1)
    axes[0].set(title=f"PE(pos, i), d_model = {d_model}", xlabel="dimension i",
                ylabel="position")
    fig.colorbar(im, ax=axes[0])
    sim = pe @ pe.T / (d_model / 2)  # each position's vector has squared norm d_model / 2
    im = axes[1].imshow(sim, cmap="viridis", aspect="auto")
    axes[1].set(title="PE(p)·PE(q) / (d/2): depends on p − q only", xlabel="position q",
                ylabel="position p")
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --kind -> (block name prefix, attention module, title).
_KINDS = {"encoder": ("encoder", "self_attention", "encoder self-attention"),
          "decoder": ("decoder", "self_attention", "decoder self-attention"),
          "cross": ("decoder", "cross_attention", "cross-attention")}


def _seq2seq_attention(args, loaded: LoadedRun) -> None:
    """Encoder self-, decoder self- or cross-attention of an encoder–decoder run."""
    if args.src is None:
        raise VisualizeError("--run holds an encoder-decoder; pass --src (and optionally --tgt)")
    if args.text is not None:
        raise VisualizeError("--text is for language-model runs; use --src/--tgt")
    if not args.src.split():
        raise VisualizeError("--src is empty")
    if isinstance(loaded.model, RNNSeq2Seq) and args.kind not in (None, "cross"):
        raise VisualizeError(f"--kind {args.kind}: the {loaded.model.cell_type.upper()} "
                             "translator has no self-attention; its one attention is the "
                             "decoder's over the source (--kind cross)")
    task = loaded.task
    if task is None:  # trained on a parallel dataset: subwords of its tokenizer
        src_ids, tgt_ids, src_labels, tgt_labels = _corpus_pair(args, loaded)
        _plot_seq2seq(args, loaded, src_ids, tgt_ids, src_labels, tgt_labels)
        return
    try:
        src_ids = task.source_ids([args.src.lower().split()])
        if args.tgt is not None:
            tgt_words = args.tgt.lower().split()
        else:  # the model's own translation (an unfinished one cut to the longest target)
            translation = decoding.translate(loaded.model, loaded.params, task, [args.src])[0]
            tgt_words = translation.split()[:task.max_tgt_len]
        if len(tgt_words) > task.max_tgt_len:
            raise ValueError(f"--tgt has {len(tgt_words)} words; the {task.name} task allows "
                             f"at most {task.max_tgt_len}")
        tgt_ids = np.asarray([[BOS, *task.encode(tgt_words)]], np.int32)
    except ValueError as e:
        raise VisualizeError(str(e)) from None
    src_ids = src_ids[:, :int((src_ids != 0).sum())]  # words and <eos>, no padding
    _plot_seq2seq(args, loaded, src_ids, tgt_ids, [task.vocab[i] for i in src_ids[0]],
                  [task.vocab[i] for i in tgt_ids[0]])


def _corpus_pair(args, loaded: LoadedRun):
    """(src [1, S], tgt [1, T], their labels) of a run on a parallel dataset: --src and --tgt
    (default: the model's own beam-search translation) in the run's subwords."""
    from transformer_jax.train import translation

    cfg, tok = loaded.model_cfg, loaded.tokenizer
    codec = translation.TextCodec(tok, cfg.pad_id, cfg.eos_id)
    tgt = args.tgt if args.tgt is not None else translation.translate_texts(
        loaded.model, loaded.params, codec, [args.src])[0]
    src_ids, tgt_ids = codec.encode(args.src), codec.encode(tgt)
    limit = min(cfg.max_len - 1, _MAX_TOKENS)
    if args.tgt is None:  # the model's own translation: an unfinished one is cut to fit
        tgt_ids = tgt_ids[:limit]
    if not 1 <= len(src_ids) <= limit or len(tgt_ids) > limit:
        raise VisualizeError(f"--src is {len(src_ids)} and the target {len(tgt_ids)} subwords; "
                             f"each must be 1 to {limit}")
    src = np.asarray(src_ids, np.int32)[None]
    tgt = np.asarray([cfg.bos_id, *tgt_ids], np.int32)[None]
    return src, tgt, _labels(tok, src[0]), ["<bos>", *_labels(tok, tgt[0, 1:])]


def _plot_seq2seq(args, loaded: LoadedRun, src_ids, tgt_ids, src_labels, tgt_labels) -> None:
    """Draw the ``--kind`` attention of one encoder–decoder pair."""
    maps = attention_maps(loaded.model, loaded.params, src_ids, tgt_ids)
    kind = args.kind or "cross"
    block, module, title = _KINDS[kind]
    names = [n for n in maps if n.startswith(block + "_") and n.endswith("/" + module)]
    if isinstance(loaded.model, RNNSeq2Seq):  # one attention, one "head" (checked: cross)
        names, title = ["attention"], f"{loaded.model.cell_type.upper()} Luong attention"
    probs = _pick(maps, names, args)
    rows = src_labels if block == "encoder" else tgt_labels
    cols = tgt_labels if kind == "decoder" else src_labels
    plot_attention(probs, rows, cols, Path(args.out), head=args.head,
                   title=f"{loaded.run_dir.name} step {loaded.step}: {title}, layer {args.layer}")


def _pick(maps: dict[str, np.ndarray], names: list[str], args) -> np.ndarray:
    """The probabilities of layer ``args.layer`` among ``names``; checks --layer and --head."""
    if not 0 <= args.layer < len(names):
        raise VisualizeError(f"--layer {args.layer} out of range: the model has {len(names)} "
                             f"such attention layers (0 to {len(names) - 1})")
    probs = maps[names[args.layer]]
    if isinstance(args.head, int) and not 0 <= args.head < probs.shape[0]:
        raise VisualizeError(f"--head {args.head} out of range: layer {args.layer} has "
                             f"{probs.shape[0]} heads (0 to {probs.shape[0] - 1})")
    return probs


def _attention_command(args) -> str:
    run = Path(args.run)
    if not (run / "config.json").is_file():
        raise VisualizeError(f"--run {run}: not a run directory (no config.json)")
    try:
        loaded = load_run(run)
    except CheckpointError as e:
        raise VisualizeError(str(e)) from None
    if loaded.task is not None or loaded.train_cfg.task != "lm":  # generated task or corpus
        _seq2seq_attention(args, loaded)
        return args.out
    if args.src is not None or args.tgt is not None or args.kind is not None:
        raise VisualizeError("--src, --tgt and --kind are for encoder-decoder runs "
                             "(train.py --task ...); use --text")
    if loaded.train_cfg.model != "transformer":
        raise VisualizeError(f"--run holds a {type(loaded.model).__name__}, which has no "
                             "attention")
    if args.text is None:
        raise VisualizeError("--text is required for a language-model run")
    tok, cfg = loaded.tokenizer, loaded.model_cfg
    ids = tok.encode(args.text)
    if not 1 <= len(ids) <= min(cfg.max_len, _MAX_TOKENS):
        raise VisualizeError(f"--text is {len(ids)} tokens; it must be 1 to "
                             f"{min(cfg.max_len, _MAX_TOKENS)} (max_len={cfg.max_len})")
    maps = attention_maps(loaded.model, loaded.params, ids[None].astype(np.int32))
    names = list(maps)
    probs = _pick(maps, names, args)
    labels = _labels(tok, ids)
    plot_attention(probs, labels, labels, Path(args.out), head=args.head,
                   title=f"{run.name} step {loaded.step}: {names[args.layer]}")
    return args.out


def _head(value: str) -> int | str:
    """``--head``: a head's index or "mean" (the range is checked against the model later)."""
    if value == "mean":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a head's index or 'mean', got {value!r}"
                                         ) from None


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m transformer_jax.visualize",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attention", help="attention heatmaps from a trained checkpoint")
    a.add_argument("--run", required=True, help="run directory (as written by train.py)")
    a.add_argument("--text", help="input text (language-model runs), at most 64 tokens")
    a.add_argument("--src", help="source sentence (encoder-decoder runs)")
    a.add_argument("--tgt", help="target sentence (encoder-decoder runs; default: the "
                                 "model's beam-search translation of --src)")
    a.add_argument("--kind", choices=sorted(_KINDS), default=None,
                   help="encoder-decoder runs: encoder self-, decoder self- or cross-attention "
                        "(default: cross)")
    a.add_argument("--layer", type=int, default=0,
                   help="attention layer index (of that --kind for encoder-decoders; default 0)")
    a.add_argument("--head", type=_head, default=None, metavar="H|mean",
                   help="one head's index, or 'mean' for the mean of the layer's heads "
                        "(default: every head, as a grid)")
    a.add_argument("--out", required=True, help="PNG file to write")
    c = sub.add_parser("curves", help="training curves of one or more runs, overlaid")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--out", required=True, help="PNG file to write")
    p = sub.add_parser("positions", help="the sinusoidal position encoding (§3.5)")
    p.add_argument("--d-model", type=int, default=128, help="model width (even)")
    p.add_argument("--max-len", type=int, default=256, help="positions to show")
    p.add_argument("--out", required=True, help="PNG file to write")
    return parser


@cli.exits_on_ctrl_c("python -m transformer_jax.visualize")
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise VisualizeError(f"--out {out}: directory {out.parent} does not exist")
        if args.command == "attention":
            _attention_command(args)
        elif args.command == "curves":
            runs = [Path(r) for r in args.runs]
            missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
            if missing:
                raise VisualizeError(f"no metrics.jsonl in: {', '.join(missing)}")
            plot_curves(runs, out)
        else:
            if args.d_model < 2 or args.d_model % 2 or args.max_len < 1:
                raise VisualizeError("--d-model must be a positive even number and --max-len "
                                     f"positive, got {args.d_model} and {args.max_len}")
            plot_positions(args.d_model, args.max_len, out)
    except (VisualizeError, ValueError, OSError, CheckpointError) as e:
        # A bad run directory is a ValueError; truncated or foreign checkpoints CheckpointError.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli.plain_warnings("python -m transformer_jax.visualize")
    sys.exit(main())
