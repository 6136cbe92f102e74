"""One launch over many tensors: the table that tells each program of a launch which tensor its
tile belongs to, as csrc/cuda/multi_tensor.cuh's launch arguments do for the CUDA kernels.

A launch covers the tensors of one dtype whose pointers are all 16-byte aligned and whose
numel and lead are multiples of 16 (the kernels then tell the compiler so, and it emits vector
loads), or all the others of that dtype. Its grid is the sum of the tensors' tile counts; a
program finds its tensor by binary search in the TILE_START row. The table is one int64 tensor
of ROWS rows and one column per tensor, on the tensors' device (raw addresses, which the kernels
turn back into pointers); building it costs about 3 microseconds per tensor on the host (CPU
tensors, measured), where a launch per tensor cost 12-20 (issue 14). A call whose tiles exceed
one grid (MAX_GRID programs) takes more launches. Triton's interpreter can run these kernels on
CPU tensors only: it copies a kernel's tensor arguments to the host, not the tensors behind the
table's addresses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The table's rows (jit code reads only constexpr globals): the addresses of the parameter, of
# the output or gradient and of m and v (the parameter's where unused), the numel, the lead and
# the first group (as the per-tensor arguments of kernels/perturb.py's _tile), the first tile
# of the tensor in the launch's grid, and the tensor's index in the op's arguments (scales).
PARAM, OTHER, M, V, NUMEL, LEAD, FIRST_GROUP, TILE_START, INDEX = (tl.constexpr(r) for r in range(9))
ROWS = 9
ALIGNMENT = 16
MAX_GRID = 2**31 - 1  # programs in grid dimension 0
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class Launch(NamedTuple):
    table: torch.Tensor  # int64 [ROWS, count] on the tensors' device
    count: int  # tensors in the launch
    tiles: int  # programs in the launch's grid
    dtype: tl.dtype  # the parameters' (and outputs' or gradients')
    aligned: bool  # every pointer 16-byte aligned, numel and lead multiples of 16


def launches(pointers: Sequence[Sequence[torch.Tensor | None]], offsets: Sequence[int], group_size: int,
             tile: int) -> Iterator[Launch]:
    """The launches of one op call. pointers[i] = (param, other, m, v) of tensor i (None where
    unused); offsets[i] its global offset; tile = group_size x groups per program. Empty tensors
    are left out."""
    columns: dict[tuple[torch.dtype, bool], list[list[int]]] = {}
    for index, (tensors, offset) in enumerate(zip(pointers, offsets)):
        param = tensors[0]
        numel = param.numel()
        if numel == 0:
            continue
        addresses = [param.data_ptr() if t is None else t.data_ptr() for t in tensors]
        lead = offset % group_size
        aligned = all(a % ALIGNMENT == 0 for a in addresses) and numel % 16 == 0 and lead % 16 == 0
        # The tile count by hand: triton.cdiv is a jit function, slow to call on the host.
        columns.setdefault((param.dtype, aligned), []).append(
            [*addresses, numel, lead, offset // group_size, -(-(lead + numel) // tile), index])
    device = next((t[0].device for t in pointers), torch.device("cpu"))
    for (dtype, aligned), cols in columns.items():
        yield from _split(cols, dtype, aligned, device)


def _split(cols: list[list[int]], dtype: torch.dtype, aligned: bool, device: torch.device) -> Iterator[Launch]:
    """cols (with each tensor's tile count in the TILE_START row) as launches of at most MAX_GRID
    programs, the row turned into each tensor's first tile."""
    start, tiles = 0, 0
    for end, col in enumerate(cols + [None]):
        count = 0 if col is None else col[TILE_START.value]
        if col is None or tiles + count > MAX_GRID:
            if end > start:
                yield Launch(_table(cols[start:end], device), end - start, tiles, TRITON_DTYPES[dtype], aligned)
            start, tiles = end, 0
        if col is not None:
            if count > MAX_GRID:
                raise ValueError(f"a tensor of {col[NUMEL.value]} elements needs more than {MAX_GRID} programs")
            col[TILE_START.value] = tiles
            tiles += count


def _table(cols: list[list[int]], device: torch.device) -> torch.Tensor:
    rows = torch.tensor(cols, dtype=torch.int64).t().contiguous()
    if device.type == "cpu":
        return rows
    # Pinned, so the copy is asynchronous; the caching host allocator keeps the buffer until it is done.
    return rows.pin_memory().to(device, non_blocking=True)


@triton.jit
def find_tensor(table_ptr, count, pid):
    """(column of the tensor whose tiles hold program pid, pid's tile within that tensor): the
    last column whose TILE_START is <= pid (the row starts at 0 and increases)."""
    starts = table_ptr + TILE_START * count
    lo = 0
    hi = count
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(starts + mid) <= pid:
            lo = mid
        else:
            hi = mid
    return lo, pid - tl.load(starts + lo)


@triton.jit
def entry(table_ptr, count, row, column):
    """The table's int64 at (row, column)."""
    return tl.load(table_ptr + row * count + column)


@triton.jit
def pointer(table_ptr, count, row, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address at (row, column) as a pointer to DTYPE, 16-byte aligned where ALIGNED."""
    ptr = entry(table_ptr, count, row, column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr
