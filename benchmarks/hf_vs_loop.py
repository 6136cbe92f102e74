"""One unlearning recipe through transformers' Trainer (zounlearn.hf) or through our own loop, in a
fresh process: steps per second and peak resident memory.

    python benchmarks/hf_vs_loop.py trainer adazo     # prints one JSON line
    python benchmarks/hf_vs_loop.py loop adazo

The recipe: GradDiff on a 4-layer GPT-2 (n_embd 256, random weights, float32, CPU, dropout off)
over the synthetic people of tests/tiny.py, 8 forget and 8 retain examples per step, STEPS
steps after WARMUP untimed ones. Both paths see the same batches (LoopBatches) and build the same
optimizer (make_optimizer). Timed: each step from its start to its end (the Trainer: a
callback's on_step_begin to on_step_end; the loop: the step times of its metrics.jsonl),
logging, evaluation (the loop's, on one example) and saving excluded. The high-water mark
(VmHWM) is reset once the model and the data exist, just before training starts: added_bytes is
what each path adds on top of the process as it was then (the libraries, the model, the data).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # read by glibc at start-up only
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402
import transformers  # noqa: E402
from tiny import DATA, tokenizer  # noqa: E402

from zounlearn.hf import LoopBatches, Trainer, one_batch  # noqa: E402
from zounlearn.optim.registry import make_optimizer  # noqa: E402
from zounlearn.unlearning import Split, UnlearningData  # noqa: E402
from zounlearn.unlearning.loop import LoopConfig, unlearn  # noqa: E402
from zounlearn.unlearning.report import read_metrics  # noqa: E402

STEPS, WARMUP, BATCH = 30, 3, 8
OPTIONS = {"adamw": (1e-3, {}), "adazo": (1e-3, {}), "hybrid": (1e-3, {"zo_lr": 1e-4, "block": 5})}


def _model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    eos = tokenizer().eos_token_id
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=len(tokenizer()), bos_token_id=eos,
                                     eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


class GradDiff(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return -model(**inputs["forget"]).loss + model(**inputs["retain"]).loss


class StepTimer(transformers.TrainerCallback):
    """Sums the time of each step after the warm-up."""

    def __init__(self):
        self.seconds, self.start = 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > WARMUP:
            self.seconds += time.perf_counter() - self.start


RESIDENT_AT_RESET: list[int] = []


def _reset_high_water_mark() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    RESIDENT_AT_RESET.append(_status("VmRSS"))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def trainer(name: str, directory: str) -> float:
    lr, options = OPTIONS[name]
    model = _model()
    total = WARMUP + STEPS
    optimizer = make_optimizer(name, model.parameters(), lr=lr, seed=0, total_steps=total, **options)
    args = transformers.TrainingArguments(directory, max_steps=total, per_device_train_batch_size=1, max_grad_norm=0,
                                          lr_scheduler_type="constant", logging_steps=10, save_strategy="no",
                                          report_to=[], remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    timer = StepTimer()
    run = GradDiff(model, args, train_dataset=LoopBatches(DATA, tokenizer(), BATCH), data_collator=one_batch,
                   optimizers=(optimizer, None), callbacks=[timer])
    _reset_high_water_mark()
    run.train()
    return timer.seconds


def loop(name: str, directory: str) -> float:
    lr, options = OPTIONS[name]
    model = _model()
    config = LoopConfig(objective="graddiff", optimizer=name, lr=lr, steps=WARMUP + STEPS, batch_size=BATCH,
                        optimizer_options=options, eval_batch_size=1)
    one = UnlearningData(*(Split(s.name, train=s.train[:1]) for s in (DATA.forget, DATA.retain)))
    _reset_high_water_mark()
    unlearn(model, tokenizer(), DATA, config, directory, progress=False, save_model=False, eval_data=one)
    elapsed = [r["elapsed"] for r in read_metrics(os.path.join(directory, "metrics.jsonl")) if r["type"] == "train"]
    return elapsed[-1] - elapsed[WARMUP - 1]


def main(path: str, name: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    with tempfile.TemporaryDirectory() as directory:
        seconds = {"trainer": trainer, "loop": loop}[path](name, os.path.join(directory, "run"))
    peak = _status("VmHWM")
    print(json.dumps({"steps_per_second": STEPS / seconds, "peak_bytes": peak,
                      "added_bytes": peak - RESIDENT_AT_RESET[0], "steps": STEPS}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
