"""Where a run computes: the backend tinygrad picked, the dtype it computes in, the devices a batch is split over, and
one optimizer step spread over them (data parallel). Shared by the drivers; the math it runs is diffusion.py's."""
import ctypes, os, shutil, sys
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from tinygrad import Context, Device, Tensor, TinyJit
from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
from tinygrad.dtype import to_dtype
from tinygrad.engine import realize
from tinygrad.helpers import DEV
from tinygrad.nn.state import get_state_dict
from tinygrad.uop.ops import Ops, UOp
from model import Denoiser, parameters

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
  (prefer_cpu_backend). Exits with one line that says what to install where tinygrad can compute nowhere (its CPU
  backend compiles every kernel with clang; without it, and without a GPU, no backend is usable)."""
  cc = os.environ.get("CC", "clang")
  install = f"tinygrad's CPU backend compiles kernels with {cc}, which this machine lacks: install it (Linux: apt-get " \
            f"install clang; macOS: xcode-select --install)"
  try: backend = Device.DEFAULT.split(":")[0]
  except Exception as e:
    sys.exit(f"error: {install}, or run where tinygrad has a GPU backend" if not shutil.which(cc) else
             f"error: tinygrad found no usable device ({type(e).__name__}: {e}): set DEV=CPU, CUDA, AMD, METAL or CL")
  if backend == "CPU" and not shutil.which(cc): sys.exit(f"error: {install}, or set DEV to a GPU backend")
  prefer_cpu_backend()

def name(device:str|None=None) -> str:
  d = Device[device := device or Device.DEFAULT]
  cpu = ", a CPU" if device.startswith("CL") and is_cpu(device) else ""
  label = (getattr(d, "device_name", None) or d.renderer.target.arch.split(",")[0]) + cpu
  return f"{device} ({label})" if label else device

def supported_dtype(dtype:str, device:str|None=None) -> str:
  """`dtype` where the backend computes in it, else the next one down: bfloat16 → float16 → float32 (CUDA's bfloat16
  needs sm_80+, Metal's Apple6+, the CPU's a clang with __bf16: asked of tinygrad, then tried on one number)."""
  device, order = device or Device.DEFAULT, ["bfloat16", "float16", "float32"]
  def computes(d:str) -> bool:
    if to_dtype(d) not in Device[device].renderer.supported_dtypes(): return False
    if device.startswith("NULL"): return True  # NULL compiles and runs nothing
    err, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # a compiler that fails prints the kernel
    try: return Tensor([1.5], device=device).cast(d).contiguous().float().item() == 1.5
    except Exception: return False
    finally: os.dup2(err, 2); os.close(err); os.close(null)
  return next((d for d in order[order.index(dtype):-1] if computes(d)), "float32")

def for_batch(batch_size:int, n:int|None=None) -> list[str]:
  """The devices a batch is split over, each taking an equal slice: n devices of the default backend. Left out: two on
  a CPU with two or more cores (tinygrad runs each CPU kernel in the calling thread, so a second CPU device, driven
  from a second thread, nearly doubles the speed; two is what has been measured), else all of the backend's devices."""
  backend = Device.DEFAULT.split(":")[0]
  if n is None:
    n = min(2, os.cpu_count() or 1) if backend == "CPU" else Device[Device.DEFAULT].count()
    while batch_size % n: n -= 1
  return [Device.DEFAULT] + [f"{backend}:{i}" for i in range(1, n)]

Replicas = list[tuple[Denoiser, list[Tensor]]]

def replicas(model:Denoiser, devices:list[str]) -> Replicas:
  """(copy, its parameters): `model` itself, then one copy on each further device, its weights kept equal to the
  first's by `copy_weights`."""
  copies = [model]
  for device in devices[1:]:
    copies.append(Denoiser(model.cfg, model.dtype))
    for v in get_state_dict(copies[-1]).values(): v.replace(v.to(device).realize())  # buffers too
  return [(m, list(parameters(m).values())) for m in copies]

def copy_weights(reps:Replicas, lazy:bool=False) -> list[Tensor]:
  """The first replica's weights assigned to the others; lazy: not realized yet (for a TinyJit to return)."""
  copies = [c.assign(p.to(c.device)) for _, ps in reps[1:] for c, p in zip(ps, reps[0][1])]
  if copies and not lazy: Tensor.realize(*copies)
  return copies

_threads = ThreadPoolExecutor(8)

def on_devices(calls:list[Callable], jits:list[TinyJit]) -> list:
  """[call() for call in calls], one per device, all but the first in threads once every TinyJit in `jits` has captured:
  replaying a captured TinyJit is thread-safe, capturing one is not. tinygrad runs a CPU kernel in the calling thread,
  so on a CPU a second device (CPU:1) driven from a second thread is a second core."""
  if any(j.cnt < 2 for j in jits): return [call() for call in calls]
  futures = [_threads.submit(call) for call in calls[1:]]
  return [calls[0]()] + [f.result() for f in futures]

def train_step(reps:Replicas, opt, loss:Callable, grad_clip:float=1.0, ema_params:list[Tensor]|None=None):
  """One optimizer step: on each device (a TinyJit each) the gradient of `loss` over that device's rows of each
  micro-batch; then (one TinyJit on the first device) the mean of the gradients, clipped to global norm grad_clip, the
  optimizer, the weight average, and the new weights copied to the other devices. The first replica holds opt's
  parameters. loss(denoiser, x0, u_t, u_mask, rows) -> a scalar, where rows = (first, all) says which rows of the whole
  batch these are (randomness spread over the batch, such as antithetic times, is computed whole and sliced). All
  randomness comes in with the data: x0 (A, B, T) micro-batches, u_t (A, 1) and u_mask (A, B, T) uniforms, numpy
  arrays, so that a run repeats exactly from its data generator, on any number of devices. ema_params, if given, are a
  weight average updated as θ_ema ← d·θ_ema + (1 − d)·θ with the decay d passed to each step."""
  n, params = len(reps), reps[0][1]

  def gradient(denoiser:Denoiser, ps:list[Tensor], first:int) -> TinyJit:
    @TinyJit
    @Context(TRAINING=1)
    def grad(x0:Tensor, u_t:Tensor, u_mask:Tensor) -> tuple[Tensor, Tensor]:
      for p in ps: p.grad = None
      A, b = x0.shape[:2]
      total = Tensor.zeros((), device=x0.device)
      for i in range(A):
        micro = loss(denoiser, x0[i], u_t[i], u_mask[i], (first * b, n * b))
        (micro / A).backward()
        total = total + micro.detach() / A
      flat = Tensor.cat(*[p.grad.contiguous().flatten() for p in ps])  # contiguous: else every gradient fuses into one kernel
      return total.realize(flat), flat  # together: realized apart, the forward pass would run twice
    return grad

  @TinyJit
  @Context(TRAINING=1)
  def update(decay:Tensor, *grads:Tensor) -> Tensor:
    g = sum(flat.to(params[0].device) for flat in grads) / n
    g = g * (grad_clip / (g.square().sum().sqrt() + 1e-6)).minimum(1)  # g ← g · min(1, c / ‖g‖)
    for p, part in zip(params, g.split([p.numel() for p in params])): p.grad = part.reshape(p.shape)
    updates = opt.schedule_step()
    for e, p in zip(ema_params or [], params): e.assign(decay * e + (1 - decay) * p)  # θ_ema ← d·θ_ema + (1 − d)·θ
    return Tensor.realize(*updates, *(ema_params or []), *copy_weights(reps, lazy=True))

  copy_weights(reps)
  grads = [gradient(denoiser, ps, j) for j, (denoiser, ps) in enumerate(reps)]

  @Context(**STEP_CONTEXT)
  def step(x0, u_t, u_mask, ema_decay:float=0.0) -> Tensor:
    B, b = x0.shape[1], x0.shape[1] // n
    if b * n != B: raise ValueError(f"the batch size {B} must be a multiple of the {n} devices")
    inputs = [[Tensor(a, device=ps[0].device) for a in (x0[:, j*b:(j+1)*b], u_t, u_mask[:, j*b:(j+1)*b])]
              for j, (_, ps) in enumerate(reps)]
    results = on_devices([lambda g=g, x=x: g(*x) for g, x in zip(grads, inputs)], grads)
    update(Tensor([ema_decay], device=params[0].device), *[flat for _, flat in results])
    return sum(total.to(params[0].device) for total, _ in results) / n
  return step

# ***** compiling the step: what tinygrad is told when it turns the step's graph into kernels. Speed only: each leaves
# the numbers as they are (tests/test_model.py, tests/test_bench.py) and names the backend it serves.

# CUDA, AMD, METAL (the backends with tensor cores): tensor cores also for reductions over more than one axis. The weight
# gradients of the gated Linears (proj, down) are such: the adaLN gate multiplies each Linear's output, its gradient
# fuses into the weight gradient, and the reduction over B·T becomes two axes. tinygrad's default gives tensor cores only
# to single-axis reductions: 14% of a `base` step's operations ran on ordinary cores (BENCHMARKS.md). No effect where
# there are no tensor cores (an x86 CPU). Set around every call of the step: a TinyJit compiles its kernels when it
# captures, after the captured function has returned.
STEP_CONTEXT = dict(TC_OPT=1)

def kernel_key(ast:UOp) -> str:
  """A kernel's identity whatever device it runs on: its AST with the device of each buffer left out."""
  params = {u: u.replace(arg=replace(u.arg, device=None)) for u in ast.toposort() if u.op is Ops.PARAM}
  return ast.substitute(params).key.hex()

pinned: dict[str, tuple[Opt, ...]] = {}  # kernel_key -> the schedule to apply, from `pin`
compiled: dict[UOp, tuple[str, UOp]] = {}  # each compiled kernel (a PROGRAM) -> its kernel_key and its AST before opts

def pin(schedules:list[dict]):
  """Apply these schedules (from `bench.py --search`: kernel key, name, opts) whenever their kernels are compiled,
  instead of tinygrad's heuristic or a search. A schedule whose opts no longer fit its kernel is a compile error that
  names it; `unmatched` lists the schedules whose kernels were not compiled."""
  pinned.update({s["key"]: tuple(Opt(OptOps[op], axis, tuple(arg) if isinstance(arg, list) else arg) for op, axis, arg in s["opts"])
                 for s in schedules})

def unmatched() -> list[str]: return sorted(set(pinned) - {key for key, _ in compiled.values()})

def _lower_and_compile(linear:UOp) -> UOp:
  """realize.lower_and_compile, with two changes before it: a pinned schedule becomes the kernel's opts_to_apply, and a
  kernel for a further device of a backend (CPU:1) is lowered as the first device's (CPU): the same code, compiled
  once (its buffers' devices are the call's, not the AST's)."""
  subs, pins = {}, []
  for call in linear.toposort():
    if call.op is not Ops.CALL or (ast := call.src[0]).op is not Ops.SINK or realize._get_call_to_compile(call) is None: continue
    new = ast.substitute({u: u.replace(arg=replace(u.arg, device=u.arg.device.split(":")[0])) for u in ast.toposort()
                          if u.op is Ops.PARAM and isinstance(u.arg.device, str)})
    if (key := kernel_key(ast)) in pinned:
      new, pins = new.replace(arg=replace(new.arg, opts_to_apply=pinned[key])), pins + [key]
    if new is not ast: subs[call] = call.replace(src=(new, *call.src[1:]))
  try: out = _tinygrad_lower_and_compile(linear.substitute(subs) if subs else linear)
  except KernelOptError as e:
    if not pins: raise
    raise KernelOptError(f"a pinned schedule no longer fits its kernel ({e}; kernels {', '.join(k[:12] for k in pins)}): "
                         "search again with bench.py --profile --search") from e
  for before, after in zip(linear.src, out.src):
    if after.op is Ops.CALL and after.src[0].op is Ops.PROGRAM and before.src[0].op is Ops.SINK:
      compiled[after.src[0]] = (kernel_key(before.src[0]), before.src[0])
  return out

# installed when this module is imported: every kernel the drivers compile goes through it
_tinygrad_lower_and_compile, realize.lower_and_compile = realize.lower_and_compile, _lower_and_compile
