"""Shared test set-up and constants (test modules import them: `from conftest import DEVICE`).
Without a GPU, Triton kernels run in its interpreter, which must be chosen before any kernel
module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402 -- after the interpreter is chosen

from zounlearn.ops import backends  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes, one empty tensor: laid end to end, no tensor starts on a Philox group boundary.
SHAPES = [(37, 11), (129,), (0,), (5, 3, 7), (1,), (300,)]
# The backends that can run the ops for DEVICE here, the reference (every test's oracle) last.
BACKENDS = [name for name in backends.BACKENDS if backends.runs_on(name, DEVICE)]
FAST_BACKENDS = [name for name in BACKENDS if name != "reference"]


@pytest.fixture
def backend(request):
    """Parametrize with indirect=True: the test runs with that backend's kernels registered."""
    with backends.use(request.param):
        yield request.param


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """A cache directory holding the default embedded model and its retrain model, built once per session (~40 s
    on one core): for the commands that use them (demo, study). Pass it as ZOUNLEARN_CACHE."""
    from zounlearn.unlearning import embedded_model, retrain_model

    cache = tmp_path_factory.mktemp("zounlearn-cache")
    embedded_model(cache_dir=cache / "models", threads=1)  # puts torch's thread count back itself
    retrain_model(cache_dir=cache / "models", threads=1)
    return cache


@pytest.fixture(scope="session")
def small_files(tmp_path_factory):
    """The small embedded model (tiny.SMALL_EMBEDDED) saved as a Hugging Face directory, and its
    forget, retain and holdout splits as JSONL files: {"cache", "model", "forget": [paths], ...}."""
    import json

    from tiny import SMALL_EMBEDDED, split_rows

    from zounlearn.unlearning import embedded_model, embedded_model_dir

    cache = tmp_path_factory.mktemp("small-models")
    _, _, data = embedded_model(0, config=SMALL_EMBEDDED, cache_dir=cache, threads=1)
    root = tmp_path_factory.mktemp("small-data")
    files = {"cache": cache, "model": str(embedded_model_dir(0, config=SMALL_EMBEDDED, cache_dir=cache))}
    for role in ("forget", "retain", "holdout"):
        files[role] = []
        for kind, rows in split_rows(getattr(data, role)).items():
            if rows:
                files[role].append(str(root / f"{role}-{kind}.jsonl"))
                with open(files[role][-1], "w") as f:
                    f.writelines(json.dumps(row) + "\n" for row in rows)
    return files
