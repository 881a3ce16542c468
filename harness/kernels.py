"""What tinygrad is told when it turns the train step's graph into kernels. Speed only: the numbers stay the same
(tests/test_kernels.py). STEP_CONTEXT is a setting of tinygrad's public Context. The rest hooks into tinygrad's
lowering (`tinygrad.engine.realize.lower_and_compile`, an internal function listed in the README): `install()` puts
the hook in place, and only code that uses it calls it: a run on several devices of one backend (each kernel compiled
once for all of them) and pinned schedules (harness/bench.py). Where this tinygrad has no such function, install()
says so in one line and everything still runs, compiling per device, without the pins."""
import json, os, sys
from dataclasses import replace
try:
  from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
  from tinygrad.engine import realize
  from tinygrad.uop.ops import Ops, UOp
except ImportError: realize = None

# CUDA, AMD, METAL (the backends with tensor cores): tensor cores also for reductions over more than one axis. The
# weight gradients of the gated Linears (proj, down) are such: the adaLN gate multiplies each Linear's output, its
# gradient fuses into the weight gradient, and the reduction over B·T becomes two axes. tinygrad's default gives tensor
# cores only to single-axis reductions: 14% of a `base` step's operations ran on ordinary cores (BENCHMARKS.md). No
# effect where there are no tensor cores (an x86 CPU). Set around every call of the step: a TinyJit compiles its
# kernels when it captures, after the captured function has returned.
STEP_CONTEXT = dict(TC_OPT=1)

# GPU backends: tinygrad splits a reduction into partial sums (schedule/rangeify.py, split_reduceop) once it adds at
# least REDUCEOP_SPLIT_THRESHOLD numbers into each output, into up to 2^REDUCEOP_SPLIT_SIZE partial outputs. Its
# defaults (32768, 22) leave a weight gradient (the B·T tokens added into each of a few hundred thousand outputs) on
# fewer thread blocks than a GPU has multiprocessors, most of them idle (BENCHMARKS.md). tinygrad reads both once (a
# cached getenv): devices.choose() sets them, before anything is compiled, for a GPU backend only.
GPU_SPLIT = {"REDUCEOP_SPLIT_THRESHOLD": "16384", "REDUCEOP_SPLIT_SIZE": "25"}

def kernel_key(ast:"UOp") -> str:
  """A kernel's identity whatever device it runs on: its AST with the device of each buffer left out."""
  params = {u: u.replace(arg=replace(u.arg, device=None)) for u in ast.toposort() if u.op is Ops.PARAM}
  return ast.substitute(params).key.hex()

pinned: dict[str, tuple] = {}    # kernel_key -> the schedule (opts) to apply, from `pin`
lenient: set[str] = set()        # keys whose schedule is dropped, said in a line, when it no longer fits its kernel
compiled: dict = {}              # each compiled kernel (a PROGRAM) -> its kernel_key and its AST before opts
_original = None                 # tinygrad's lower_and_compile, once install() has replaced it
SCHEDULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schedules")  # ARCH.json, from bench --search

def pin(schedules:list[dict], strict:bool=True) -> bool:
  """Apply these schedules (from `bench --search`: kernel key, name, opts) whenever their kernels are compiled, instead
  of tinygrad's heuristic or a search. One whose opts no longer fit its kernel is a compile error that names it (not
  strict: it is dropped, said in one line); `unmatched` lists those whose kernels were not compiled. False (and
  nothing pinned) without the hook."""
  if not install(): return False
  pinned.update({s["key"]: tuple(Opt(OptOps[op], axis, tuple(arg) if isinstance(arg, list) else arg)
                                 for op, axis, arg in s["opts"]) for s in schedules})
  if not strict: lenient.update(s["key"] for s in schedules)
  return True

def pin_shipped(preset:str, device:str, folder:str=SCHEDULES) -> str|None:
  """The schedules searched for the default GPU preset's step (base) on this GPU's architecture, shipped in folder,
  pinned leniently; the line that says so, or None where there are none."""
  from tinygrad import Device
  path = os.path.join(folder, f"{getattr(Device[device].renderer.target, 'arch', None)}.json")
  if preset != "base" or not os.path.exists(path) or not pin(schedules := json.load(open(path)), strict=False):
    return None
  return f"{len(schedules)} kernel schedules searched for this step on this GPU pinned ({os.path.relpath(path)})"

def unmatched() -> list[str]: return sorted(set(pinned) - {key for key, _ in compiled.values()})

def install() -> bool:
  """Puts _lower_and_compile in the place of tinygrad's lower_and_compile, once; False, said in one line, where this
  tinygrad has no such hook point."""
  global _original
  if _original is None:
    if realize is None or not callable(getattr(realize, "lower_and_compile", None)) or \
       not callable(getattr(realize, "_get_call_to_compile", None)):
      if _original is not False:
        print("note: this tinygrad has no engine.realize.lower_and_compile to hook: each device compiles its own "
              "kernels (a slower first step) and no schedule is pinned", file=sys.stderr)
      _original = False
    else: _original, realize.lower_and_compile = realize.lower_and_compile, _lower_and_compile
  return _original is not False

def _lower_and_compile(linear:"UOp") -> "UOp":
  """realize.lower_and_compile, with two changes before it: a pinned schedule becomes the kernel's opts_to_apply, and a
  kernel for a further device of a backend (CPU:1) is lowered as the first device's (CPU): the same code, compiled
  once (its buffers' devices are the call's, not the AST's)."""
  subs, pins = {}, []
  for call in linear.toposort():
    if call.op is not Ops.CALL or (ast := call.src[0]).op is not Ops.SINK or realize._get_call_to_compile(call) is None:
      continue
    new = ast.substitute({u: u.replace(arg=replace(u.arg, device=u.arg.device.split(":")[0])) for u in ast.toposort()
                          if u.op is Ops.PARAM and isinstance(u.arg.device, str)})
    if (key := kernel_key(ast)) in pinned:
      new, pins = new.replace(arg=replace(new.arg, opts_to_apply=pinned[key])), pins + [key]
    if new is not ast: subs[call] = call.replace(src=(new, *call.src[1:]))
  try: out = _original(linear.substitute(subs) if subs else linear)
  except KernelOptError as e:
    if not pins: raise
    if all(k in lenient for k in pins):  # shipped schedules: compile those kernels as tinygrad would, and say so
      print(f"note: {len(pins)} pinned schedule(s) no longer fit their kernels ({e}): compiled without them",
            file=sys.stderr)
      for k in pins: pinned.pop(k, None)
      return _lower_and_compile(linear)
    raise KernelOptError(f"a pinned schedule no longer fits its kernel ({e}; kernels {', '.join(k[:12] for k in pins)})"
                         ": search again with python -m harness.bench --profile --search") from e
  for before, after in zip(linear.src, out.src):
    if after.op is Ops.CALL and after.src[0].op is Ops.PROGRAM and before.src[0].op is Ops.SINK:
      compiled[after.src[0]] = (kernel_key(before.src[0]), before.src[0])
  return out
