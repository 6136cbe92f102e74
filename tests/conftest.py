"""Shared test set-up. Without a GPU, Triton kernels run in its interpreter, which must be
chosen before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """A cache directory holding the default embedded model, built once per session (~40 s on one core):
    for the commands that use it (demo, study). Pass it as ZOUNLEARN_CACHE."""
    from zounlearn.unlearning import embedded_model

    cache = tmp_path_factory.mktemp("zounlearn-cache")
    threads = torch.get_num_threads()
    embedded_model(cache_dir=cache / "models", threads=1)
    torch.set_num_threads(threads)
    return cache
