"""A pytest plugin that keeps one shard of the collected tests, so that `make gpu-check` can run a
test run as several processes at once (pytest-xdist is not installed on the GPU machine).

    PYTEST_SHARD=2/8 PYTHONPATH=scripts python -m pytest -p pytest_shard tests/...

Tests are grouped by their parameters minus those named in PYTEST_SHARD_IGNORE (comma-separated,
e.g. "layout"), so that tests which compile the same Triton kernels land in the same process;
the groups are dealt largest first to the shard with the fewest tests.
"""

from __future__ import annotations

import os


def _key(item, ignore: set[str]) -> str:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return item.nodeid
    params = {k: v for k, v in callspec.params.items() if k not in ignore}
    return f"{item.path.name}::{sorted((k, str(v)) for k, v in params.items())}"


def pytest_collection_modifyitems(config, items) -> None:
    spec = os.environ.get("PYTEST_SHARD")
    if not spec:
        return
    index, count = (int(x) for x in spec.split("/"))
    ignore = {name for name in os.environ.get("PYTEST_SHARD_IGNORE", "").split(",") if name}
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(_key(item, ignore), []).append(item)
    loads = [0] * count
    mine = set()
    for key in sorted(groups, key=lambda k: (-len(groups[k]), k)):
        shard = loads.index(min(loads))
        loads[shard] += len(groups[key])
        if shard == index:
            mine.update(id(item) for item in groups[key])
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in mine])
    items[:] = [item for item in items if id(item) in mine]
