"""Measurements shared by `zounlearn bench`, `make gpu-check` (scripts/gpu_check.py) and benchmarks/:
models (parameter shapes and configs), timing, the passes' bandwidth, the ZO-SGD step against
MeZO's loop, steady-state peak memory, and their tables. Every op call goes through calls.py."""
