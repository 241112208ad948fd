"""Translation end to end on a real corpus with no download: prepare, train, evaluate; and the
paper's Table 2 comparison, the Transformer against an attentional RNN translator.

    python benchmarks/translation.py --quick                  # gettext catalogs, en -> de
    python benchmarks/translation.py --quick --pairs train.en train.de
    python benchmarks/translation.py --pairs corpus.jsonl --source-lang en --target-lang fr
    python benchmarks/translation.py --quick --models transformer,lstm     # ≤ 15 min here
    python benchmarks/translation.py --models transformer,lstm,gru   # sweeps the rates
    python benchmarks/translation.py --quick --models transformer,transformer-pre,lstm

The default corpus is this machine's gettext catalogs (``--catalogs de``, built by
:mod:`benchmarks.catalogs`): human translations of program messages, about 50k English ->
German pairs on a Debian machine. ``prepare --pairs`` holds out a 2% test split by a hash of
the source; the translate-text recipe trains the paper's encoder-decoder on the rest; the test
split is decoded as §6.1 does (beam 4, α 0.6, the last 5 checkpoints averaged) and scored with
sacreBLEU and chrF on detokenised text. Beside it, in the same run and on the same test pairs:

* copy-the-source, the floor a model must clear (names, numbers and format strings are shared);
* a translation memory (:func:`benchmarks.baselines.memory_translate`): the target of the most
  similar training source by character-trigram TF-IDF cosine, as ``msgmerge`` proposes fuzzy
  entries. That is what a translator would use instead of a model.

The Transformer alone trains the recipe's steps (``--quick``: about 10 minutes on 2 CPU cores,
compilation included; without it, 3 times as many). With ``--models`` naming several, each
trains for the same ``--budget`` of seconds and each Transformer (the paper's post-LN, or
``transformer-pre``) is compared with each RNN (:mod:`benchmarks.translation_runs`: the
protocol and the two figures); the full form first sweeps each model's learning rate.
Writes results.json (test_bleu, copy_bleu, memory_bleu, chrf, wall_s, num_train_pairs, the
signatures, example translations, each model's row and curve, and for a comparison
``time_to_rnn_bleu_ratio`` and ``bleu_gain_at_equal_time``), results.md and bleu_vs_time.png to
benchmarks/results/translation/ (a comparison: translation_vs_rnn/), or ``--out``; the corpus,
dataset and runs go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.* and transformer_jax

VOCAB = 4000  # a small shared BPE: ~50k short pairs, and a cheap output layer on a CPU
MAX_TOKENS = 64  # training pairs longer than this are dropped (the test split keeps all)
TEST_FRACTION = 0.02  # the hash split of benchmarks/catalogs.py: about 1,100 test pairs
EXAMPLES = 8


def _parser():
    from benchmarks import common

    p = common.arg_parser(__doc__, "the budgeted run: the translate-text recipe's steps")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--catalogs", metavar="LANG", default="de",
                   help="English -> LANG from /usr/share/locale/LANG (default: %(default)s)")
    g.add_argument("--pairs", nargs="+", metavar="FILE",
                   help="any corpus prepare --pairs reads: two aligned files, TSV or JSONL")
    p.add_argument("--source-lang", default="en", help="JSONL: translation.<lang> of the source")
    p.add_argument("--target-lang", default="de", help="JSONL: translation.<lang> of the target")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    p.add_argument("--batch-tokens", type=int,
                   help="token slots a side of a batch (default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate of every model (default: "
                   "the recipe's for the Transformer alone; each model's pinned rate, or "
                   "--sweep's choice, with a budget)")
    p.add_argument("--models", default="transformer", metavar="M,M",
                   help="transformer, transformer-pre (pre-LN), lstm, gru; several are "
                   "trained for the same --budget, and each Transformer, listed first, is "
                   "compared with each RNN (default: %(default)s)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="training seconds of each model, compilation excluded (default: "
                   "the recipe's steps for the Transformer alone; 120 with --quick, else "
                   "600, for a comparison)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction,
                   help="first pick each model's learning rate: the lowest validation loss "
                   "after a third of the budget's steps at each of translation_runs.SWEEP_LR "
                   "(default: on for a comparison without --quick; else each model's pinned "
                   "rate, translation_runs.TUNED_LR)")
    p.add_argument("--work", type=Path, default=Path("/tmp/translation-benchmark"),
                   help="corpus, dataset and run directory (default: %(default)s; replaced)")
    return p


def _corpus(args, work: Path) -> tuple[list[Path], list[tuple[str, str]], str]:
    """(the files prepare reads, all their pairs, a description) of the chosen corpus."""
    from benchmarks import catalogs
    from transformer_jax.data.pair_files import iter_pairs, pair_files

    if args.pairs:
        files = pair_files(args.pairs, f"translation.{args.source_lang}",
                           f"translation.{args.target_lang}")
        return [Path(p) for p in args.pairs], list(iter_pairs(files)), " ".join(args.pairs)
    pairs, n_files = catalogs.catalog_pairs(args.catalogs)
    if not pairs:
        sys.exit(f"translation.py: no gettext catalogs under {catalogs.LOCALE}/{args.catalogs}"
                 "/LC_MESSAGES; give a corpus with --pairs FILE...")
    args.source_lang, args.target_lang = "en", args.catalogs
    path = work / f"catalogs.{args.catalogs}.jsonl"
    catalogs.write_jsonl(pairs, path, args.catalogs)
    return [path], pairs, f"{n_files} gettext catalogs, en -> {args.catalogs}"


def _baselines(pairs, held: set[str], *splits) -> list[dict]:
    """Copy-the-source and translation-memory scores of each split's (source, reference)
    texts, the memory built once from the pairs whose source is not ``held``."""
    from benchmarks import baselines

    memory_pairs = [(s, t) for s, t in pairs if s not in held]
    sources = [s for texts in splits for s, _ in texts]
    memory = baselines.memory_translate([s for s, _ in memory_pairs],
                                        [t for _, t in memory_pairs], sources)
    out, start = [], 0
    for texts in splits:
        hyps, start = memory[start:start + len(texts)], start + len(texts)
        srcs, refs = [s for s, _ in texts], [t for _, t in texts]
        out.append({"memory": baselines.scores(hyps, refs),
                    "copy": baselines.copy_scores(srcs, refs), "memory_hypotheses": hyps})
    return out


def _train_all(args, names, dataset: Path, vocab_size: int) -> tuple[list[dict], dict]:
    """(one row of :func:`translation_runs.train_and_score` a model, the budget)."""
    from benchmarks import translation_runs as tr

    work = args.work
    lone = len(names) == 1 and names[0] in tr.TRANSFORMERS
    budget = args.budget or (None if lone and not args.sweep
                             else 120.0 if args.quick else 600.0)
    rows = []
    for name in names:
        cfg = tr.model_config(name, vocab_size)
        lr, tried = args.lr or (tr.TUNED_LR[name] if budget else None), None
        if budget:
            probe = tr.train_config(name, dataset, work / f"probe-{name}", lr=lr,
                                    batch_tokens=args.batch_tokens)
            steps = tr.steps_for_budget(cfg, probe, budget, work / f"probe-{name}")
        else:
            steps = args.steps or tr.RECIPES["translate-text"].train.schedule.steps * (
                1 if args.quick else 3)
        if args.sweep:
            tried = tr.sweep(cfg, name, dataset, work, max(steps // 3, 1), args.batch_tokens)
            lr = min(tried, key=lambda rate: tried[rate]["val_loss"])
        tc = tr.train_config(name, dataset, work / f"run-{name}", steps=steps, lr=lr,
                             batch_tokens=args.batch_tokens, evals=tr.EVALS if budget else 4)
        print(f"{name}: {cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, d_model "
              f"{cfg.d_model}, lr {tc.schedule.lr:g}, {steps} steps"
              + (f" (the budget of {budget:.0f} s)" if budget else ""), flush=True)
        rows.append(tr.train_and_score(name, cfg, tc))
        if tried:
            rows[-1]["lrs_tried"] = {f"{k:g}": v for k, v in tried.items()}
    return rows, {"budget_s": budget}


def _models(parser, args) -> list[str]:
    """``--models`` as a list, refused in one line unless it names distinct known models, a
    Transformer first where there are several and at least one RNN; ``args.sweep`` resolved
    (a comparison's full form sweeps the rates, its ``--quick`` form takes the pinned ones)."""
    from benchmarks import translation_runs as tr

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in tr.MODELS]
    if unknown or not names or len(set(names)) != len(names):
        parser.error(f"--models {args.models}: give distinct names among {', '.join(tr.MODELS)}")
    if len(names) > 1 and (names[0] not in tr.TRANSFORMERS
                           or all(m in tr.TRANSFORMERS for m in names)):
        parser.error("--models: several models compare Transformers with RNNs; list a "
                     "Transformer first and at least one of lstm, gru")
    if args.sweep is None:
        args.sweep = len(names) > 1 and not args.quick
    return names


def main(argv=None) -> int:
    from benchmarks import common
    from benchmarks import translation_runs as tr
    from transformer_jax.data.pair_dataset import open_pairs
    from transformer_jax.data.pair_files import pair_files
    from transformer_jax.data.prepare_pairs import PairSettings, prepare_pairs
    from transformer_jax.train import translation

    parser = _parser()
    args = parser.parse_args(argv)
    names = _models(parser, args)
    t0 = time.perf_counter()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    paths, pairs, corpus = _corpus(args, work)
    files = pair_files(paths, f"translation.{args.source_lang}",
                       f"translation.{args.target_lang}")
    prepare_pairs(files, work / "ds", PairSettings(vocab_size=VOCAB, max_tokens=MAX_TOKENS,
                                                   test_fraction=TEST_FRACTION), log=print)
    prepare_s = time.perf_counter() - t0
    data = open_pairs(work / "ds")
    test, valid = data.test.texts(), data.valid.texts(translation.NUM_BLEU)
    held = {s for s, _ in test} | {s for s, _ in data.valid.texts()}
    t1 = time.perf_counter()
    test_base, valid_base = _baselines(pairs, held, test, valid)
    memory_s = time.perf_counter() - t1
    rows, budget = _train_all(args, names, work / "ds", data.vocab_size)
    first = rows[0]
    hyps = {row["model"]: (Path(row["out"]) / translation.HYPOTHESES).read_text(
        encoding="utf-8").splitlines() for row in rows}
    r = {"corpus": corpus, "num_train_pairs": len(data.train), "num_valid_pairs": len(data.valid),
         "num_test_pairs": len(data.test), "vocab_size": data.vocab_size,
         "test_bleu": first["test_bleu"], "chrf": first["chrf"],
         "copy_bleu": test_base["copy"]["bleu"], "copy_chrf": test_base["copy"]["chrf"],
         "memory_bleu": test_base["memory"]["bleu"], "memory_chrf": test_base["memory"]["chrf"],
         "valid_slice": {"pairs": len(valid), "copy_bleu": valid_base["copy"]["bleu"],
                         "memory_bleu": valid_base["memory"]["bleu"]},
         "bleu_signature": first["bleu_signature"], "chrf_signature": first["chrf_signature"],
         "wall_s": time.perf_counter() - t0, "prepare_s": prepare_s, "memory_s": memory_s,
         **budget, "models": rows,
         "examples": [{"source": s, "reference": t, **{m: h[i] for m, h in hyps.items()},
                       "memory": test_base["memory_hypotheses"][i]}
                      for i, (s, t) in enumerate(test[:EXAMPLES])]}
    if len(rows) > 1:
        r["comparisons"] = tr.compare_all(rows)
        r.update({k: r["comparisons"][0][k]
                  for k in ("time_to_rnn_bleu_ratio", "bleu_gain_at_equal_time")})
    machine = common.describe_machine()
    name = "translation" if len(rows) == 1 else "translation_vs_rnn"
    out = common.write_results(name, {"machine": machine, "results": r},
                               _markdown(r, machine, argv), args.out)
    _plot(r, out / "bleu_vs_time.png")
    print(json.dumps({k: r[k] for k in ("test_bleu", "copy_bleu", "memory_bleu", "chrf",
                                        "wall_s", "num_train_pairs", "time_to_rnn_bleu_ratio",
                                        "bleu_gain_at_equal_time") if k in r}))
    print(f"wrote {out}/results.json, results.md, bleu_vs_time.png")
    return 0


def _markdown(r: dict, machine: dict, argv) -> str:
    from benchmarks import common

    command = "python benchmarks/translation.py " + " ".join(argv or sys.argv[1:])
    rows = [{"system": f"{m['model']} ({m['layers']} layers, d_model {m['d_model']}), beam 4, "
             "α 0.6, 5 averaged", "BLEU": m["test_bleu"], "chrF": m["chrf"]}
            for m in r["models"]]
    rows += [{"system": "translation memory (char-trigram TF-IDF)", "BLEU": r["memory_bleu"],
              "chrF": r["memory_chrf"]},
             {"system": "copy the source", "BLEU": r["copy_bleu"], "chrF": r["copy_chrf"]}]
    runs = common.markdown_table(
        [{**m, "params": f"{m['params'] / 1e6:.2f}M", "train_tflop": m["train_flops"] / 1e12}
         for m in r["models"]],
        [("model", "model"), ("params", "parameters"), ("lr", "peak lr"), ("steps", "steps"),
         ("train_s", "training s"), ("train_tflop", "training TFLOP"),
         ("tokens_per_s", "train target tokens/s"), ("best_val_bleu", "best validation BLEU"),
         ("test_bleu", "test BLEU"), ("decode_sentences_per_s", "beam-4 decoding sentences/s")])
    parts = [
        "# Translation on a real corpus: prepare, train, evaluate",
        (f"Machine: {machine['device']}; {machine['date']}. Command: `{command.strip()}`."),
        (f"Corpus: {r['corpus']}; {r['num_train_pairs']:,} training, {r['num_valid_pairs']:,} "
         f"validation, {r['num_test_pairs']:,} test pairs (test by source hash); shared BPE of "
         f"{r['vocab_size']} tokens. Batches "
         f"{100 * r['models'][0]['real_share']['mean']:.1f}% real tokens (lowest interval "
         f"{100 * r['models'][0]['real_share']['min']:.1f}%). Wall time {r['wall_s']:.0f} s "
         f"(prepare {r['prepare_s']:.0f} s, compilation included)."
         + (f" Each model trained for the steps that take {r['budget_s']:.0f} s at its step "
            "time (a probe's lower quartile; compilation excluded)." if r.get("budget_s")
            else "")),
        "Test split:\n\n" + common.markdown_table(
            rows, [("system", "system"), ("BLEU", "BLEU"), ("chrF", "chrF")]),
        f"sacreBLEU: `{r['bleu_signature']}`; chrF: `{r['chrf_signature']}`.",
        "Runs (validation BLEU: greedy, on the first "
        f"{r['valid_slice']['pairs']} validation pairs):\n\n" + runs]
    parts += [f"Learning rates tried by `--sweep` for {m['model']} (after a third of the steps: "
              "validation loss per target token, BLEU): " + ", ".join(
                  f"{lr}: {t['val_loss']:.3f}, {t['val_bleu']:.1f}"
                  for lr, t in m["lrs_tried"].items())
              for m in r["models"] if m.get("lrs_tried")]
    for c in r.get("comparisons", []):
        ratio = c["time_to_rnn_bleu_ratio"]
        parts.append(
            f"{c['transformer']} against {c['rnn']}: time to the {c['rnn']}'s best "
            f"validation BLEU ({c['rnn_best_val_bleu']:.1f}) "
            + (f"{ratio:.2f}× the {c['rnn']}'s ({c['transformer_time_to_rnn_best_s']:.0f} s "
               f"against {c['rnn_time_to_best_s']:.0f} s)" if ratio is not None
               else f"not reached by the {c['transformer']}")
            + (f"; the {c['rnn']} reached the {c['transformer']}'s best "
               f"({c['transformer_best_val_bleu']:.1f}) in "
               f"{c['rnn_time_to_transformer_best_ratio']:.2f}× the {c['transformer']}'s time"
               if c.get("rnn_time_to_transformer_best_ratio") is not None else "")
            + f"; test BLEU at equal time {c['bleu_gain_at_equal_time']:+.1f}; training "
            f"tokens/s {c['train_tokens_per_s_ratio']:.2f}× and beam decoding sentences/s "
            f"{c['decode_sentences_per_s_ratio']:.2f}× the {c['rnn']}'s.")
    examples = "\n".join(
        f"- source: `{e['source']}`\n  - reference: `{e['reference']}`\n"
        + "".join(f"  - {m['model']}: `{e[m['model']]}`\n" for m in r["models"])
        + f"  - memory: `{e['memory']}`" for e in r["examples"][:4])
    parts += ["![BLEU against training time and FLOPs](bleu_vs_time.png)",
              "Examples (the first test pairs):\n\n" + examples]
    return "\n\n".join(parts)


def _plot(r: dict, path: Path) -> None:
    from benchmarks import common

    fig, axes = common.figure(2, figsize=(11.0, 4.2))
    for ax, key, label in ((axes[0], "train_s", "training time (s), compilation included"),
                           (axes[1], "flops", "training FLOPs (model estimate)")):
        for i, m in enumerate(r["models"]):
            color = f"C{i}"
            curve = m["curve"]
            ax.plot([c[key] for c in curve], [c["val_bleu"] for c in curve], "o-", color=color,
                    label=f"{m['model']}: validation slice, greedy")
            end = m["train_s"] if key == "train_s" else m["train_flops"]
            ax.plot([end], [m["test_bleu"]], "*", color=color, markersize=12,
                    label=f"{m['model']}: test, beam 4, averaged")
        ax.axhline(r["valid_slice"]["memory_bleu"], color="black", linestyle="--",
                   label="translation memory (validation slice)")
        ax.axhline(r["valid_slice"]["copy_bleu"], color="tab:gray", linestyle=":",
                   label="copy the source (validation slice)")
        ax.set_xlabel(label)
        ax.set_ylabel("sacreBLEU")
    axes[0].legend(fontsize=7)
    common.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
