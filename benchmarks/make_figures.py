"""Regenerate the README's pictures from runs and benchmark results (nothing drawn by hand).

    python benchmarks/make_figures.py [--run runs/cpu-lm] [--compare runs/lstm ...]
                                      [--translate-run runs/translate]

Writes into docs/figures/:
  * positions.png      — the sinusoidal encoding (§3.5) and its position-similarity matrix
  * attention_grid.png — all heads of the last layer of the default run on a code snippet
  * attention_head.png — one head, larger
  * curves.png         — loss / validation loss / lr / tokens/s of the run(s)
  * cross_attention.png — cross-attention of ``python train.py --task translate`` (if trained)
The benchmark plots stay where their scripts write them (benchmarks/results/<name>/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: transformer_jax

from transformer_jax.cli import visualize  # noqa: E402

TEXT = "for i in range(10):\n    print(i)"
SENTENCE = "the big red cats near a dog saw this old king today"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "cpu-lm",
                        help="the trained run to draw attention and curves from")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="more runs to overlay on the curves")
    parser.add_argument("--translate-run", type=Path, default=ROOT / "runs" / "translate",
                        help="the trained translate run to draw cross-attention from")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out
    status = visualize.main(["positions", "--d-model", "128", "--max-len", "128",
                             "--out", str(out / "positions.png")])
    if (args.run / "config.json").is_file():
        n_layers = json.loads((args.run / "config.json").read_text())["model"][
            "num_decoder_layers"]
        status |= visualize.main(["attention", "--run", str(args.run), "--text", TEXT,
                                  "--layer", str(n_layers - 1),
                                  "--out", str(out / "attention_grid.png")])
        status |= visualize.main(["attention", "--run", str(args.run), "--text", TEXT,
                                  "--layer", str(n_layers - 1), "--head", "0",
                                  "--out", str(out / "attention_head.png")])
        status |= visualize.main(["curves", str(args.run), *map(str, args.compare),
                                  "--out", str(out / "curves.png")])
    else:
        print(f"no run at {args.run}: train one with `python train.py` first", file=sys.stderr)
        status = 2
    if (args.translate_run / "config.json").is_file():
        status |= visualize.main(["attention", "--run", str(args.translate_run), "--src",
                                  SENTENCE, "--kind", "cross", "--layer", "1",
                                  "--out", str(out / "cross_attention.png")])
    else:
        print(f"no run at {args.translate_run}: `python train.py --task translate` draws "
              "cross_attention.png", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
