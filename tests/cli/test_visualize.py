"""``python -m transformer_jax.visualize``: each command writes a real PNG; bad input exits 2."""

import dataclasses
import json
import struct

import numpy as np
import pytest

from transformer_jax.cli import visualize
from transformer_jax.config import PRESETS, RECIPES
from transformer_jax.runs.load import load_run
from transformer_jax.train import loop

DEFAULT_RUN = RECIPES["cpu-lm"].train  # the default run's training settings


def png_size(path):
    """(width, height) from the PNG header; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny LM trained for a few steps on the embedded corpus (in-process, one device)."""
    out = tmp_path_factory.mktemp("viz") / "run"
    cfg = dataclasses.replace(PRESETS["tiny"], num_decoder_layers=2, num_heads=2)
    tc = DEFAULT_RUN.replace(out=str(out), steps=6, batch_size=4, seq_len=32, log_every=2,
                     eval_every=6, ckpt_every=6, steps_per_call=2, sample_tokens=0,
                     parallel="none")
    loop.run(cfg, tc, progress=False, log=lambda _: None)
    return out


def test_attention_one_head_and_grid(lm_run, tmp_path):
    text = "def f(x): return x"
    one, grid = tmp_path / "one.png", tmp_path / "grid.png"
    assert visualize.main(["attention", "--run", str(lm_run), "--text", text, "--layer", "1",
                           "--head", "0", "--out", str(one)]) == 0
    assert visualize.main(["attention", "--run", str(lm_run), "--text", text,
                           "--out", str(grid)]) == 0
    w1, h1 = png_size(one)
    w2, _ = png_size(grid)
    assert 300 < w1 < 2000 and 300 < h1 < 2000
    assert w2 > 1.5 * w1  # two heads side by side


def test_attention_maps_are_causal_probabilities(lm_run):
    run = load_run(lm_run)
    ids = np.frombuffer(b"hello world", np.uint8).astype(np.int32)[None]
    maps = visualize.attention_maps(run.model, run.params, ids)
    assert list(maps) == ["layer_0/self_attention", "layer_1/self_attention"]
    probs = maps["layer_0/self_attention"]
    assert probs.shape == (2, 11, 11)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.triu(probs, k=1).max() == 0.0  # nothing attends to the future


def test_curves_overlay_runs(lm_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    lines = [{"step": s, "loss": 5.0 - s, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.1,
              "time_s": float(s)} for s in (1, 2, 3)]
    lines.append({"step": 3, "loss": 2.0, "val_loss": 2.5, "val_bpb": 3.6, "lr": 1e-3,
                  "tokens_per_s": 100.0, "mfu": 0.1, "time_s": 3.5})
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "curves.png"
    assert visualize.main(["curves", str(lm_run), str(other), "--out", str(out)]) == 0
    assert png_size(out) == (1600, 850)


def test_positions(tmp_path):
    out = tmp_path / "pos.png"
    assert visualize.main(["positions", "--d-model", "64", "--max-len", "50",
                           "--out", str(out)]) == 0
    assert png_size(out) == (1300, 500)


@pytest.mark.parametrize("args,message", [
    (["attention", "--run", "{missing}", "--text", "x", "--out", "{out}"], "not a run directory"),
    (["attention", "--run", "{run}", "--text", "x" * 65, "--out", "{out}"], "65 tokens"),
    (["attention", "--run", "{run}", "--text", "x", "--layer", "7", "--out", "{out}"],
     "--layer 7 out of range"),
    (["attention", "--run", "{run}", "--text", "x", "--head", "5", "--out", "{out}"],
     "--head 5 out of range"),
    (["attention", "--run", "{run}", "--out", "{out}"], "--text is required"),
    (["curves", "{missing}", "--out", "{out}"], "no metrics.jsonl"),
    (["positions", "--d-model", "5", "--out", "{out}"], "positive even"),
    (["positions", "--out", "{missing}/x.png"], "does not exist"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, lm_run, tmp_path, capsys):
    fill = {"missing": str(tmp_path / "nope"), "run": str(lm_run), "out": str(tmp_path / "o.png")}
    assert visualize.main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


# ---- the encoder–decoder: encoder self-, decoder self- and cross-attention ------------------


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory):
    """A reversal run directory with an untrained tiny encoder–decoder (1 + 1 layers, 2 heads)."""
    from model_helpers import write_seq2seq_run

    out = tmp_path_factory.mktemp("viz") / "s2s"
    write_seq2seq_run(out, "reverse", seeds=(0,))
    return out


def test_encoder_decoder_maps_have_the_right_axes(seq2seq_run):
    run = load_run(seq2seq_run)
    src = np.asarray([[3, 4, 5, 2]], np.int32)  # "a b c <eos>"
    tgt = np.asarray([[1, 5, 4]], np.int32)  # "<bos> c b"
    maps = visualize.attention_maps(run.model, run.params, src, tgt)
    assert list(maps) == ["decoder_0/cross_attention", "decoder_0/self_attention",
                          "encoder_0/self_attention"]
    assert maps["encoder_0/self_attention"].shape == (2, 4, 4)
    assert maps["decoder_0/self_attention"].shape == (2, 3, 3)
    assert maps["decoder_0/cross_attention"].shape == (2, 3, 4)
    for probs in maps.values():
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.triu(maps["decoder_0/self_attention"], k=1).max() == 0.0


@pytest.mark.parametrize("extra", [["--tgt", "e d c", "--kind", "encoder", "--head", "1"],
                                   ["--tgt", "e d c", "--kind", "decoder"],
                                   []])  # cross-attention to the model's own translation
def test_encoder_decoder_attention_pngs(seq2seq_run, tmp_path, extra):
    out = tmp_path / "attention.png"
    assert visualize.main(["attention", "--run", str(seq2seq_run), "--src", "a b c d e",
                           *extra, "--out", str(out)]) == 0
    w, h = png_size(out)
    assert 300 < w < 2000 and 200 < h < 2000  # 4 tokens, 2 heads: one short row of maps


@pytest.mark.parametrize("args,message", [
    (["--text", "x"], "pass --src"),
    (["--src", "a zebra"], "'zebra'"),
    (["--src", "a b", "--tgt", "a " * 17], "at most 16"),
    (["--src", "a b", "--tgt", "a", "--layer", "1"], "--layer 1 out of range"),
    (["--src", "a b", "--tgt", "a", "--head", "2"], "--head 2 out of range"),
])
def test_encoder_decoder_bad_arguments_exit_2(seq2seq_run, tmp_path, capsys, args, message):
    out = tmp_path / "o.png"
    assert visualize.main(["attention", "--run", str(seq2seq_run), *args,
                           "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("n_heads,head,n_tokens", [(2, None, 2), (1, 0, 1), (4, None, 3),
                                                   (2, None, 20)])
def test_the_title_sits_above_the_head_titles(monkeypatch, tmp_path, n_heads, head, n_tokens):
    """A short sentence makes a small figure: the title must not cover the heads' titles."""
    from matplotlib.figure import Figure

    boxes = []  # (the title's box, the head titles' boxes) as drawn when saved

    def savefig(fig, *args, **kwargs):
        save(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        boxes.append((fig._suptitle.get_window_extent(renderer),
                      [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]))

    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", savefig)
    probs = np.full((n_heads, n_tokens, n_tokens + 1), 1.0 / (n_tokens + 1), np.float32)
    labels = [f"w{i}" for i in range(n_tokens + 1)]
    visualize.plot_attention(probs, labels[:n_tokens], labels, tmp_path / "a.png", head=head,
                             title="run step 10: cross-attention, layer 0")
    ((title, heads),) = boxes
    assert len(heads) == (1 if head is not None else n_heads)
    for box in heads:
        assert title.y0 >= box.y1, (title, box)  # above, not overlapping


def _drawn_panels(monkeypatch):
    """Record, for each figure saved, its heatmap panels: [(title, data [T, S]), ...]."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def savefig(fig, *args, **kwargs):
        figures.append([(ax.get_title(), np.asarray(ax.images[0].get_array()))
                        for ax in fig.axes if ax.images])
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


@pytest.mark.parametrize("kind", ["cross", "decoder"])
def test_head_mean_draws_the_mean_of_the_heads_probabilities(seq2seq_run, tmp_path, monkeypatch,
                                                             kind):
    figures = _drawn_panels(monkeypatch)
    args = ["attention", "--run", str(seq2seq_run), "--src", "a b c", "--tgt", "c b a e",
            "--kind", kind]
    assert visualize.main([*args, "--out", str(tmp_path / "grid.png")]) == 0
    assert visualize.main([*args, "--head", "mean", "--out", str(tmp_path / "mean.png")]) == 0
    grid, ((title, mean),) = figures
    assert [t for t, _ in grid] == ["head 0", "head 1"] and title == "mean of 2 heads"
    heads = np.stack([data for _, data in grid])  # [N, T, S]: each head's probabilities
    # Queries: <bos> and the 4 target words; keys: the 3 source words and <eos>, or the queries.
    assert mean.shape == heads.shape[1:] == ((5, 4) if kind == "cross" else (5, 5))
    np.testing.assert_allclose(mean, heads.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(mean.sum(-1), 1.0, atol=1e-5)  # still a distribution a row
    assert not np.allclose(mean, heads[0], atol=1e-3)  # the two heads differ: not head 0
    png_size(tmp_path / "mean.png")


def test_head_takes_an_index_or_mean(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        visualize.main(["attention", "--run", str(tmp_path), "--src", "a", "--head", "avg",
                        "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--head" in err and "'mean'" in err and "'avg'" in err
    # A layer's heads averaged (the probabilities [N, T, S] of three heads, two queries):
    probs = np.asarray([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]],
                        [[0.5, 0.5], [0.2, 0.8]]], np.float32)
    panels, titles = visualize.head_panels(probs, "mean")
    np.testing.assert_allclose(panels, [[[0.5, 0.5], [0.4, 0.6]]], rtol=1e-6)
    assert titles == ["mean of 3 heads"]
    panels, titles = visualize.head_panels(probs, 2)
    np.testing.assert_array_equal(panels, probs[2:])
    assert titles == ["head 2"]
    panels, titles = visualize.head_panels(probs)
    np.testing.assert_array_equal(panels, probs)
    assert titles == ["head 0", "head 1", "head 2"]
