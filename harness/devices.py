"""Where a run computes: the backend tinygrad picked (checked usable before any work), the dtype it computes in, the
devices a batch is split over, the model's copy on each, and calls run on all of them at once (data parallel)."""
import ctypes, os, shutil, sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
import numpy as np
from tinygrad import Device, Tensor, TinyJit
from tinygrad.helpers import DEV
from tinygrad.nn.state import get_state_dict
from harness import kernels
from model import parameters

def is_cpu(device:str|None=None) -> bool:
  """The CPU backend, or an OpenCL driver that runs on the CPU (PoCL, Intel's CPU runtime): GPU-style kernels on the
  same cores, so a CPU's preset (`small`, float32), not a GPU's."""
  device = device or Device.DEFAULT
  if device.split(":")[0] == "CL":
    from tinygrad.runtime.autogen import opencl as cl
    kind = ctypes.c_uint64()
    cl.clGetDeviceInfo(Device[device].cl_dev, cl.CL_DEVICE_TYPE, 8, ctypes.byref(kind), None)
    return bool(kind.value & cl.CL_DEVICE_TYPE_CPU)
  return device.split(":")[0] == "CPU"

def prefer_cpu_backend():
  """With DEV unset, tinygrad picks an OpenCL driver over its CPU backend even when the driver runs on the CPU (PoCL,
  Intel's CPU runtime): take the CPU backend then, so that installing such a driver changes nothing (two devices, the
  atomic embedding backward). DEV=CL still selects it."""
  if not DEV.device and Device.DEFAULT.startswith("CL") and is_cpu() and shutil.which(os.environ.get("CC", "clang")):
    DEV.value = os.environ["DEV"] = "CPU"  # the environment too, for child processes, as tinygrad does

def choose():
  """The backend for this run: tinygrad's choice (DEV), with an OpenCL driver on the CPU traded for the CPU backend
  (prefer_cpu_backend), opened now, before any work. Exits with one line that says what to do where it cannot be used:
  a backend tinygrad does not have (a typo in DEV), one this machine lacks, or no C compiler for the CPU backend."""
  cc = os.environ.get("CC", "clang")
  install = f"tinygrad's CPU backend compiles kernels with {cc}, which this machine lacks: install it (Linux: " \
            "apt-get install clang; macOS: xcode-select --install)"
  try: backend = Device.DEFAULT.split(":")[0]
  except Exception as e:
    sys.exit(f"error: {install}, or run where tinygrad has a GPU backend" if not shutil.which(cc) else
             f"error: tinygrad found no usable device ({type(e).__name__}: {e}): set DEV=CPU, CUDA, AMD, METAL or CL")
  if backend not in Device._devices:
    sys.exit(f"error: DEV={DEV.device or backend}: tinygrad has no backend {backend!r}: set DEV to one of "
             f"{', '.join(sorted(d for d in Device._devices if d not in ('DISK', 'NPY', 'TINYFS', 'PYTHON')))}")
  if backend == "CPU" and not shutil.which(cc): sys.exit(f"error: {install}, or set DEV to a GPU backend")
  try: Device[Device.DEFAULT]
  except Exception as e:
    sys.exit(f"error: DEV={Device.DEFAULT} cannot be used on this machine ({type(e).__name__}: "
             f"{(str(e) or '?').splitlines()[0]}): set DEV to a backend it has (DEV=CPU works with clang), or unset it")
  prefer_cpu_backend()
  if Device[Device.DEFAULT].renderer.has_local and not is_cpu():  # a GPU (or its compiler, on NULL): fill it
    for key, value in kernels.GPU_SPLIT.items(): os.environ.setdefault(key, value)

def name(device:str|None=None) -> str:
  d = Device[device := device or Device.DEFAULT]
  cpu = ", a CPU" if device.startswith("CL") and is_cpu(device) else ""
  label = (getattr(d, "device_name", None) or d.renderer.target.arch.split(",")[0]) + cpu
  return f"{device} ({label})" if label else device

def supported_dtype(dtype:str, device:str|None=None) -> str:
  """`dtype` where the backend computes in it, else the next one down: bfloat16 → float16 → float32 (CUDA's bfloat16
  needs sm_80+, Metal's Apple6+, the CPU's a clang with __bf16: asked of tinygrad, then tried on one number)."""
  from tinygrad import dtypes
  device, order = device or Device.DEFAULT, ["bfloat16", "float16", "float32"]
  def computes(d:str) -> bool:
    if getattr(dtypes, d) not in Device[device].renderer.supported_dtypes(): return False
    if device.startswith("NULL"): return True  # NULL compiles and runs nothing
    err, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # a compiler that fails prints the kernel
    try: return Tensor([1.5], device=device).cast(d).contiguous().float().item() == 1.5
    except Exception: return False
    finally: os.dup2(err, 2); os.close(err); os.close(null)
  return next((d for d in order[order.index(dtype):-1] if computes(d)), "float32")

def check_memory_to_sample(n:int, length:int, cfg, steps:int|None):
  """Refuses, before any work, samples that need more memory than is free here (Linux's MemAvailable; elsewhere
  unchecked): one line instead of a machine that swaps or a process the kernel kills. What grows with n: each network
  evaluation's logits, softmax and float64 Gumbel noise (on a CPU, in this memory) and every recorded state (frames)."""
  try:
    with open("/proc/meminfo") as f: free = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
  except (OSError, StopIteration, ValueError): return
  frames = (steps or cfg.seq_len // 4) * (1 + 2 * max(0, length - cfg.seq_len) // cfg.seq_len) + 1
  need = n * (32 * min(length, cfg.seq_len) * cfg.n_tokens * is_cpu() + 2 * 4 * length * frames)
  if need > free:
    raise ValueError(f"{n} sample{'s' * (n > 1)} of {length} tokens in {frames} steps need about {need / 2**30:.1f} "
                     f"GiB of memory and {free / 2**30:.1f} GiB is free: lower --num-samples, --length or --steps")

def for_batch(batch_size:int, n:int|None=None) -> list[str]:
  """The devices a batch is split over, each taking an equal slice: n devices of the default backend. Left out: two on
  a CPU with two or more cores (tinygrad runs each CPU kernel in the calling thread, so a second CPU device, driven
  from a second thread, nearly doubles the speed; two is what has been measured), else all of the backend's devices."""
  backend = Device.DEFAULT.split(":")[0]
  if n is None:
    n = min(2, os.cpu_count() or 1) if backend == "CPU" else Device[Device.DEFAULT].count()
    while batch_size % n: n -= 1
  return [Device.DEFAULT] + [f"{backend}:{i}" for i in range(1, n)]

def replicas(model, devices:list[str]) -> list:
  """`model` itself, then one copy on each further device (its weights kept equal to the first's by `copy_weights`).
  With several devices of one backend, tinygrad is asked to compile each kernel once for all of them."""
  copies = [model]
  if len(devices) > 1: kernels.install()
  for device in devices[1:]:
    copies.append(type(model)(model.cfg, model.dtype))
    for v in get_state_dict(copies[-1]).values(): v.replace(v.to(device).realize())  # buffers too
  return copies

def copy_weights(params:list[list[Tensor]], lazy:bool=False) -> list[Tensor]:
  """The first copy's weights (params[0]) assigned to the others'; lazy: not realized yet (for a TinyJit to return)."""
  copies = [c.assign(p.to(c.device)) for ps in params[1:] for c, p in zip(ps, params[0])]
  if copies and not lazy: Tensor.realize(*copies)
  return copies

def split(arrays:list[np.ndarray], devices:list[str], axis:int=1) -> list[list[Tensor]]:
  """Each device's equal share of each array along `axis` (the batch), as Tensors on it."""
  return [[Tensor(np.ascontiguousarray(part), device=d) for part in parts]
          for d, *parts in zip(devices, *[np.split(a, len(devices), axis) for a in arrays])]

_threads = ThreadPoolExecutor(8)

def on_devices(calls:list[Callable], jits:list[TinyJit]) -> list:
  """[call() for call in calls], one per device, all but the first in threads once every TinyJit in `jits` has captured:
  replaying a captured TinyJit is thread-safe, capturing one is not. tinygrad runs a CPU kernel in the calling thread,
  so on a CPU a second device (CPU:1) driven from a second thread is a second core."""
  if any(j.cnt < 2 for j in jits): return [call() for call in calls]
  futures = [_threads.submit(call) for call in calls[1:]]
  return [calls[0]()] + [f.result() for f in futures]

def batched(copies:list, f:Callable, arrays:list[np.ndarray], batch_size:int) -> Callable[[], np.ndarray]:
  """A function that computes f(model, *batch) (one number per row) for every row of `arrays`, in batches of batch_size
  shared out over the devices of `copies` (the first copy's weights copied to the others first), a TinyJit each."""
  n, params = len(arrays[0]), [list(parameters(m).values()) for m in copies]
  rows = np.arange(-(-n // batch_size) * batch_size).reshape(-1, batch_size) % n  # whole batches: the last one wraps
  jits = [TinyJit(lambda *a, m=m: f(m, *a).realize()) for m in copies]
  def run(d:int) -> list[np.ndarray]:
    return [jits[d](*(Tensor(a[i], device=params[d][0].device) for a in arrays)).numpy() for i in rows[d::len(copies)]]
  def scores() -> np.ndarray:
    copy_weights(params)
    parts = on_devices([lambda d=d: run(d) for d in range(len(copies))], jits)
    return np.concatenate([parts[i % len(copies)][i // len(copies)] for i in range(len(rows))])[:n]
  return scores
