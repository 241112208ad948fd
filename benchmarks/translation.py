"""Translation end to end on a real corpus with no download: prepare, train, evaluate.

    python benchmarks/translation.py --quick                  # gettext catalogs, en -> de
    python benchmarks/translation.py --quick --pairs train.en train.de
    python benchmarks/translation.py --pairs corpus.jsonl --source-lang en --target-lang fr

The default corpus is this machine's gettext catalogs (``--catalogs de``, built by
:mod:`benchmarks.catalogs`): human translations of program messages, about 50k English ->
German pairs on a Debian machine. ``prepare --pairs`` holds out a 2% test split by a hash of
the source; the translate-text recipe trains the paper's encoder-decoder on the rest; the test
split is decoded as §6.1 does (beam 4, α 0.6, the last 5 checkpoints averaged) and scored with
sacreBLEU and chrF on detokenised text. Beside it, in the same run and on the same test pairs:

* copy-the-source, the floor a model must clear (names, numbers and format strings are shared);
* a translation memory (:func:`benchmarks.baselines.memory_translate`): the target of the most
  similar other source by character-trigram TF-IDF cosine, as ``msgmerge`` proposes fuzzy
  entries. That is what a translator would use instead of a model.

``--quick`` is the budgeted run (the recipe's steps: about 10 minutes on 2 CPU cores,
compilation included); without it the run trains 3 times as many steps. Writes results.json
(test_bleu, copy_bleu, memory_bleu, chrf, wall_s, num_train_pairs, the signatures, example
translations, the real-token share of the batches), results.md and bleu_vs_time.png to
benchmarks/results/translation/ (or ``--out``); the corpus, dataset and run go to ``--work``.
"""

from __future__ import annotations

import dataclasses
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


def _configs(args, dataset: Path, out: Path):
    from transformer_jax.config import RECIPES
    from transformer_jax.data.pair_dataset import open_pairs

    recipe = RECIPES["translate-text"]
    model = dataclasses.replace(recipe.model, vocab_size=open_pairs(dataset).vocab_size)
    steps = args.steps or recipe.train.schedule.steps * (1 if args.quick else 3)
    # Four validations; with --steps, checkpoints keep the recipe's share of the run between
    # the first and the last of the 5 averaged ones.
    every = recipe.train.loop.ckpt_every * steps // recipe.train.schedule.steps
    tc = recipe.train.replace(data=(str(dataset),), out=str(out), steps=steps,
                              eval_every=max(steps // 4, 1), ckpt_every=max(every, 1),
                              batch_tokens=args.batch_tokens or recipe.train.data.batch_tokens)
    return model, tc


def main(argv=None) -> int:
    from benchmarks import baselines, common
    from transformer_jax.data.pair_dataset import open_pairs
    from transformer_jax.data.pair_files import pair_files
    from transformer_jax.data.prepare_pairs import PairSettings, prepare_pairs
    from transformer_jax.runs import metrics
    from transformer_jax.train import loop, translation

    args = _parser().parse_args(argv)
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
    model, tc = _configs(args, work / "ds", work / "run")
    result = loop.run(model, tc, progress=False, log=print)
    wall_s = time.perf_counter() - t0
    records = metrics.read_jsonl(work / "run" / "metrics.jsonl")
    final = records[-1]

    test = data.test.texts()
    sources, refs = [s for s, _ in test], [t for _, t in test]
    held = set(sources)
    memory_pairs = [(s, t) for s, t in pairs if s not in held]
    t1 = time.perf_counter()
    memory = baselines.memory_translate([s for s, _ in memory_pairs],
                                        [t for _, t in memory_pairs], sources)
    memory_s = time.perf_counter() - t1
    memory_scores, copy_scores = baselines.scores(memory, refs), baselines.copy_scores(sources,
                                                                                        refs)
    hyps = (work / "run" / translation.HYPOTHESES).read_text(encoding="utf-8").splitlines()
    shares = [r["real_share"] for r in records if "real_share" in r]
    curve = [{"wall_s": prepare_s + r["time_s"], "step": r["step"], "val_bleu": r["val_bleu"]}
             for r in records if "val_bleu" in r]
    r = {"corpus": corpus, "num_train_pairs": len(data.train), "num_valid_pairs": len(data.valid),
         "num_test_pairs": len(data.test), "vocab_size": data.vocab_size,
         "test_bleu": final["test_bleu"], "chrf": final["test_chrf"],
         "copy_bleu": copy_scores["bleu"], "copy_chrf": copy_scores["chrf"],
         "memory_bleu": memory_scores["bleu"], "memory_chrf": memory_scores["chrf"],
         "bleu_signature": final["bleu_signature"], "chrf_signature": final["chrf_signature"],
         "wall_s": wall_s, "prepare_s": prepare_s, "train_and_eval_s": result.wall_s,
         "memory_s": memory_s, "steps": result.step,
         "real_share": {"mean": sum(shares) / max(len(shares), 1), "min": min(shares or [0])},
         "tokens_per_s": result.tokens_per_s, "val_bleu_curve": curve,
         "model": model.to_dict(), "train": tc.to_dict(),
         "examples": [{"source": s, "reference": t, "model": h, "memory": m}
                      for s, t, h, m in list(zip(sources, refs, hyps, memory))[:EXAMPLES]]}
    machine = common.describe_machine()
    out = common.write_results("translation", {"machine": machine, "results": r},
                               _markdown(r, machine, argv), args.out)
    _plot(r, out / "bleu_vs_time.png")
    print(json.dumps({k: r[k] for k in ("test_bleu", "copy_bleu", "memory_bleu", "chrf",
                                        "wall_s", "num_train_pairs")}))
    print(f"wrote {out}/results.json, results.md, bleu_vs_time.png")
    return 0


def _markdown(r: dict, machine: dict, argv) -> str:
    from benchmarks import common

    command = "python benchmarks/translation.py " + " ".join(argv or sys.argv[1:])
    rows = [{"system": "Transformer (translate-text recipe), beam 4, α 0.6, 5 averaged",
             "BLEU": r["test_bleu"], "chrF": r["chrf"]},
            {"system": "translation memory (char-trigram TF-IDF)", "BLEU": r["memory_bleu"],
             "chrF": r["memory_chrf"]},
            {"system": "copy the source", "BLEU": r["copy_bleu"], "chrF": r["copy_chrf"]}]
    examples = "\n".join(f"- source: `{e['source']}`\n  - reference: `{e['reference']}`\n"
                         f"  - model: `{e['model']}`\n  - memory: `{e['memory']}`"
                         for e in r["examples"][:4])
    return "\n\n".join([
        "# Translation on a real corpus: prepare, train, evaluate",
        (f"Machine: {machine['device']}; {machine['date']}. Command: `{command.strip()}`. "
        "The machine was shared with other jobs: wall times are noisy."),
        (f"Corpus: {r['corpus']}; {r['num_train_pairs']:,} training, {r['num_valid_pairs']:,} "
        f"validation, {r['num_test_pairs']:,} test pairs (test by source hash); shared BPE of "
        f"{r['vocab_size']} tokens. {r['steps']} steps; batches "
        f"{100 * r['real_share']['mean']:.1f}% real tokens (lowest interval "
        f"{100 * r['real_share']['min']:.1f}%). Wall time {r['wall_s']:.0f} s (prepare "
        f"{r['prepare_s']:.0f} s, compilation included)."),
        common.markdown_table(rows, [("system", "system"), ("BLEU", "BLEU"), ("chrF", "chrF")]),
        f"sacreBLEU: `{r['bleu_signature']}`; chrF: `{r['chrf_signature']}`.",
        "![BLEU against wall time](bleu_vs_time.png)",
        "Examples (the first test pairs):\n\n" + examples])


def _plot(r: dict, path: Path) -> None:
    from benchmarks import common

    fig, ax = common.figure(figsize=(6.4, 4.0))
    curve = r["val_bleu_curve"]
    ax.plot([c["wall_s"] for c in curve], [c["val_bleu"] for c in curve], "o-",
            label="model: validation slice, greedy")
    ax.plot([r["wall_s"]], [r["test_bleu"]], "*", markersize=12,
            label="model: test, beam 4, averaged")
    ax.axhline(r["memory_bleu"], color="tab:green", linestyle="--",
               label="translation memory (test)")
    ax.axhline(r["copy_bleu"], color="tab:gray", linestyle=":", label="copy the source (test)")
    ax.set_xlabel("wall time since the start (s), preparation and compilation included")
    ax.set_ylabel("sacreBLEU")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
