"""`zounlearn bench`: how fast the fused passes run here (CPU or GPU, whichever this machine has).

One perturbation pass per direction and one update pass of each rule over a model's parameter
list, as GB/s and as a fraction of torch's add_ and copy_ on the same tensors, then one ZO-SGD
step against MeZO's loop (optimizer work only: the closure is a constant). Prints the tables and
saves them as JSON. The measurements are zounlearn.bench's, the same that make gpu-check and
benchmarks/ run.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from .. import __version__
from ..atomic import write_json
from ..bench import calls, models, passes, steps, table
from ..checks import check_int
from ..errors import UsageError
from .inputs import comma_list

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Share of free memory the tensors may take (the MeZO step allocates a tensor's z and its sum on top).
MEMORY_SHARE = 0.5
# Fewer rounds once a measurement has taken this long (at least one): MeZO's loop takes ~5 s a step
# on GPT-2 small on a 2-core CPU, a slow CPU pass ~1 s.
MAX_SECONDS = 1.0


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="bandwidth of the fused passes and a ZO-SGD step against MeZO's loop, here",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    bench.add_argument("--model", choices=tuple(models.MODELS), default=None,
                       help="whose parameter shapes (default: llama-7b on a GPU, gpt2-small on the CPU)")
    bench.add_argument("--layers", type=int, default=None,
                       help="keep the first N blocks (default: as many as fit in half the free memory)")
    bench.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                       help="the parameters' dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    bench.add_argument("--backends", default=None, metavar="A,B",
                       help="backends to measure (default: every compiled one that runs on the device; "
                            "Triton's CPU interpreter only when named)")
    bench.add_argument("--rounds", type=int, default=3,
                       help="timed rounds per measurement after one warm-up, fewer once they have taken 1 s "
                            "(default: 3; the median is reported)")
    bench.add_argument("--no-step", action="store_true", help="skip the ZO-SGD step against MeZO's loop")
    bench.add_argument("--output", "-o", default=None, metavar="FILE",
                       help="the JSON file to write (default: runs/bench-<date-time>.json)")
    bench.set_defaults(handler=run_bench)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def _backends(spec: str | None, device: torch.device) -> list[str]:
    runnable = calls.runnable(device.type)
    if spec is None:
        chosen = [b for b in runnable if not (device.type == "cpu" and b == "triton")]
        return chosen or ["reference"]
    chosen = comma_list(spec, "--backends", str.strip, "backend names", "cuda,triton")
    for name in chosen:
        if name not in runnable and name != "reference":
            why = calls.unavailable().get(name, f"it does not run on {device.type} tensors")
            raise UsageError(f"--backends: {name!r} cannot run here: {why}")
    return chosen


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def run_bench(args: argparse.Namespace) -> int:
    device = _device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    model = args.model or ("llama-7b" if gpu else "gpt2-small")
    check_int("--rounds", args.rounds, 1)
    backends = _backends(args.backends, device)
    layers = args.layers  # model_shapes checks it
    if layers is None:
        layers = models.layers_that_fit(model, MEMORY_SHARE * _free_bytes(device), passes.bytes_per_param(dtype))
    shapes = models.model_shapes(model, layers)
    output = args.output or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    where = torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine()
    label = f"{model} x{layers} layers"
    print(f"zounlearn {__version__} bench on {device} ({where}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{label}: {models.numel(shapes) / 1e6:.1f} M {str(dtype)[6:]} parameters in {len(shapes)} tensors; "
          f"backends {', '.join(backends)}\n")
    started = time.perf_counter()
    tensors = passes.Tensors.allocate(shapes, dtype, device)
    pass_rows = passes.measure(tensors, passes.fused_passes(), backends, rounds=args.rounds, max_seconds=MAX_SECONDS,
                               label=label)
    print(table.text(pass_rows, table.PASSES[1:]))
    step_rows = []
    if not args.no_step:
        params = tensors.params
        del tensors  # the gradients and the state: room for MeZO's temporaries
        step_rows = steps.measure(params, steps.constant_loss, backends, rounds=args.rounds,
                                  mezo_rounds=args.rounds, max_seconds=MAX_SECONDS, label=label)
        print("\nZO-SGD step, optimizer work only (the closure returns a constant):")
        print(table.text(step_rows, table.STEPS[1:]))
    seconds = time.perf_counter() - started
    write_json(output, {"zounlearn": __version__, "torch": torch.__version__, "device": str(device),
                        "device_name": where, "threads": torch.get_num_threads(), "model": model, "layers": layers,
                        "dtype": str(dtype)[6:], "numel": models.numel(shapes), "tensors": len(shapes),
                        "backends": backends, "seconds": seconds, "passes": pass_rows, "steps": step_rows})
    print(f"\n{seconds:.0f} s; written to {output}")
    return 0
