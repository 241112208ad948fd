"""One process of the two-process CPU run in tests/parallel/test_sharding.py (and its configs).

``python tests/multihost_worker.py HOST:PORT PROCESS_ID OUT DATA [OUT DATA ...]`` joins the
other process; then, for each (OUT, DATA) pair (DATA: a text file or a prepared dataset folder),
it trains the sharded run to step 2 (stopping as if SIGTERM had come: a checkpoint of the
global, cross-process-sharded arrays), then runs again into the same directory: it restores
that checkpoint and trains to step 4. Prints one JSON line per pair with what it did. (One
launch for several datasets: starting the processes costs more than their training.)
"""

import dataclasses
import json
import sys

from transformer_jax.config import PRESETS, RECIPES, TrainConfig

DEFAULT_RUN = RECIPES["cpu-lm"].train  # the default run's training settings

MODEL = dataclasses.replace(PRESETS["tiny"], vocab_size=256, dropout_rate=0.0,
                            num_decoder_layers=1)
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2


def train_config(out, data_file, **overrides) -> TrainConfig:
    """The run both processes make; the test makes it again on one device."""
    settings = {"out": str(out), "data": (str(data_file),), "steps": 4, "batch_size": 8,
                "seq_len": 16, "warmup": 1, "lr": 3e-3,
                "eps": 1e-4,  # see _setup in tests/parallel/test_sharding.py
                "steps_per_call": 1, "log_every": 1, "eval_every": 4, "ckpt_every": 2,
                "eval_batch_size": 256, "parallel": "sharded",
                "mesh": "fsdp=4",  # FSDP across both processes: each host holds half
                "sample_tokens": 0}
    return DEFAULT_RUN.replace(**{**settings, **overrides})


def main(coordinator: str, process_id: str, *runs: str) -> None:
    from transformer_jax.parallel import distributed

    distributed.initialize(coordinator, NUM_PROCESSES, int(process_id))

    import jax

    from transformer_jax.data.prepared import data_vocab_size
    from transformer_jax.runs import metrics
    from transformer_jax.train import loop

    metrics.peak_flops = lambda devices: (1e9, "test")  # skip the CPU matmul probe
    for out, data_file in zip(runs[::2], runs[1::2]):
        tc = train_config(out, data_file)
        model = dataclasses.replace(MODEL, vocab_size=data_vocab_size(tc.data.data))  # a dataset's
        first = loop.run(model, tc, stop_at=2, progress=False)
        second = loop.run(model, tc, progress=False)
        print(json.dumps({"out": out, "process": jax.process_index(),
                          "devices": jax.device_count(), "first_step": first.step,
                          "resumed_from": second.start_step, "step": second.step,
                          "val_loss": second.val_loss}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
