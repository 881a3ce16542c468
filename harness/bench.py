"""Measure train.py's step and the sampler: tokens/s, ms/step, achieved GFLOP/s, time to first step, peak memory;
optionally the PyTorch peer (../shared/bench/torch_mdlm.py) at the same config in the same run, and the ratio. Every
flag that is not the benchmark's own is train.py's (--preset, --dim, --dtype, --devices, ...).

  python -m harness.bench --preset small
  python -m harness.bench --preset small --torch /tmp/torchvenv/bin/python     # beside the PyTorch peer
  CACHELEVEL=0 python -m harness.bench --preset small                          # first step with a cold kernel cache
  DEV=NULL NULL_ALLOW_COPYOUT=1 python -m harness.bench --preset base --cost   # what a step costs a GPU, anywhere
  DEV=NULL:NVCC:sm_90 NULL_ALLOW_COPYOUT=1 python -m harness.bench --preset base --cost  # each kernel for Hopper
  python -m harness.bench --preset base --profile --top 20                     # where a step's time goes, by kernel
  python -m harness.bench --preset base --profile --search 12 --write-schedules s.json  # search the slowest, pin
  python -m harness.bench --preset base --schedules s.json                     # the train step with those pinned

The last line printed is one JSON object (scripts read it). It hooks tinygrad's realize.track_stats (an internal, listed
in the README) while it records a step's kernels, and puts it back after."""
import argparse, json, lzma, math, os, resource, subprocess, sys, tempfile, time
from dataclasses import replace
import numpy as np
from tinygrad import Device, GlobalCounters, Tensor, nn
from tinygrad.codegen import to_program
from tinygrad.codegen.opt import OptOps
from tinygrad.engine import realize
from tinygrad.helpers import Context, ansistrip, perf_counter_us, prod
from tinygrad.uop.ops import Ops, sym_infer
import diffusion, train
from data import vocab
from harness import cli, devices, kernels as kernel_hooks
from harness.cli import positive
from model import Config, Denoiser, n_params, parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def flops_per_token(cfg:Config) -> float:
  """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4), the tied output head included,
  plus attention's QKᵀ and AV (4·T·d per layer forward, ×3 with backward). The embedding lookup does no matmul."""
  d, L = cfg.dim, cfg.n_layers
  return 6 * (12 * d * d * L + d * cfg.padded_vocab) + 12 * cfg.seq_len * d * L

def train_step(model, args):
  """train.py's step (its objective, its data parallel) on args.devices, and a generator of its inputs: random tokens
  (speed does not depend on the data) with train.py's own draws."""
  opt = nn.optim.AdamW(list(parameters(model).values()), lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.0)
  step = train.make_step(devices.replicas(model, args.devices), opt, train.objective(args, model.cfg.mask_id), 1.0)
  rng, tokens = np.random.default_rng(0), np.random.default_rng(1).integers(0, model.cfg.n_tokens, 1 << 20)
  return step, lambda: train.batch(tokens, None, None, argparse.Namespace(**{**vars(args), "windows": "random"}), rng)

def bench_train(model, cfg, args) -> dict:
  step, data = train_step(model, args)
  times, peak = [], 0
  for i in range(args.warmup + args.steps):
    x = data()
    t0 = time.perf_counter()
    step(*x).item()
    times.append(time.perf_counter() - t0)
    peak = max(peak, GlobalCounters.mem_used)
    if i == 0: print(f"first train step (compiles kernels): {times[0]:.1f} s", flush=True)
  ms, tok = 1000 * float(np.median(times[args.warmup:])), args.batch_size * args.seq_len
  return {"first_step_s": round(times[0], 2), "train_ms_per_step": round(ms, 1),
          "train_tok_per_s": round(tok / ms * 1000, 1), "train_gflops": round(flops_per_token(cfg) * tok / ms / 1e6, 2),
          "peak_mem_mb": round(peak / 2**20, 1)}

def run_recorded(step, x, timed:bool) -> tuple[list[dict], float]:
  """One call of step(*x) with a record of every kernel it runs: name, operations, bytes moved, whether tensor cores do
  its matmul, its thread blocks, its kernel key (kernels.kernel_key) and, if timed, its time (the device is
  synchronized after each kernel). The step must have been captured with JIT=2 for its kernels to run one by one."""
  kernels, track = [], realize.track_stats
  def tracked(ctx, call, st, ets):
    if ctx.update_stats and (prg := call.src[0]).op is Ops.PROGRAM:
      if timed: Device[d if isinstance(d := call.src[1].device, str) else d[0]].synchronize()
      e = realize.estimate_uop(call)
      kernels.append({"name": ansistrip(prg.arg.name), "ops": sym_infer(e.ops, ctx.var_vals),
                      "bytes": sym_infer(e.mem, ctx.var_vals), "blocks": blocks(prg.arg),
                      "tc": any(o.op is OptOps.TC for o in prg.src[0].arg.applied_opts),
                      "key": kernel_hooks.compiled[prg][0] if prg in kernel_hooks.compiled else None,
                      "s": float(perf_counter_us() - st) * 1e-6 if timed else None})
    return track(ctx, call, st, ets)
  realize.track_stats = tracked
  try:
    t0 = time.perf_counter()
    step(*x).item()
    return kernels, time.perf_counter() - t0
  finally: realize.track_stats = track

def blocks(info) -> int:
  """The thread blocks a kernel launches (its grid). One that leaves the block size to the runtime (no local size) is
  counted as its threads in blocks of 1,024, the most a block holds: at least that many."""
  grid = prod(int(g) for g in info.global_size)
  return grid if info.local_size is not None else max(1, math.ceil(grid / 1024))

def fill(kernels:list[dict], sms:int) -> tuple[float, dict|None]:
  """The share of the step's operations in kernels of at least two waves of blocks (2·sms, which keep every SM busy),
  and the largest kernel on fewer blocks than the card has SMs (some SMs idle however it is scheduled)."""
  filled = sum(k["ops"] for k in kernels if k["blocks"] >= 2 * sms) / max(1, sum(k["ops"] for k in kernels))
  return filled, max((k for k in kernels if k["blocks"] < sms), key=lambda k: k["ops"], default=None)

def tc_share(kernels:list[dict]) -> float:
  """The share of the step's operations in kernels that run on tensor cores."""
  return sum(k["ops"] for k in kernels if k["tc"]) / max(1, sum(k["ops"] for k in kernels))

def bench_cost(model, cfg, args) -> dict:
  """One train step scheduled on tinygrad's NULL device, which runs nothing but counts each kernel's operations and the
  bytes it moves through device memory: the GPU's two floors (ops / peak rate, bytes / bandwidth) without a GPU; on
  NULL:NVCC:sm_90 every kernel is also compiled for Hopper: tensor cores or not, and its launch grid (the fill)."""
  step, data = train_step(model, args)
  GlobalCounters.reset()
  kernels, first = run_recorded(step, data(), timed=False)
  tokens, ops = args.batch_size * args.seq_len, GlobalCounters.global_ops
  for key, label in (("ops", "operations"), ("bytes", "bytes")):
    print(f"top kernels by {label}:")
    for k in sorted(kernels, key=lambda k: -k[key])[:args.top]:
      print(f"  {k['name']:40s} {k['ops'] / 1e9:10.3f} GOP {k['bytes'] / 1e9:9.4f} GB {k['blocks']:7d} blocks"
            + "  tensor cores" * k["tc"])
  missed = [k for k in kernels if k["name"].startswith("r") and not k["tc"] and k["ops"] > 0.005 * ops]
  filled, starved = fill(kernels, args.sms)
  if starved: print(f"largest kernel on fewer than {args.sms} blocks: {starved['name']}, {starved['ops'] / 1e9:.3f} "
                    f"GOP on {starved['blocks']} blocks")
  model_flops = flops_per_token(cfg) * tokens
  return {"fill": round(filled, 4), "largest_under_sms": starved and {"name": starved["name"],
          "blocks": starved["blocks"], "gops": round(starved["ops"] / 1e9, 3)}, "kernels": len(kernels),
          "gops": round(ops / 1e9, 3), "model_gflop": round(model_flops / 1e9, 3),
          "ops_ratio": round(ops / model_flops, 3),
          "gb_moved": round(GlobalCounters.global_mem / 1e9, 3), "first_step_s": round(first, 1),
          "mb_per_token": round(GlobalCounters.global_mem / tokens / 1e6, 3), "tc_share": round(tc_share(kernels), 4),
          "big_reductions_without_tc": sorted({k["name"] for k in missed})}

def profile(kernels:list[dict], top:int) -> list[dict]:
  """Kernels grouped by key (a kernel that runs once per layer is one row), slowest first: calls, ms, achieved
  GFLOP/s and GB/s, tensor cores or not."""
  rows = {}
  for k in kernels:
    r = rows.setdefault(k["key"] or k["name"], {"name": k["name"], "key": k["key"], "calls": 0, "ms": 0.0, "ops": 0,
                                                "bytes": 0, "tc": k["tc"], "blocks": k["blocks"]})
    r["calls"], r["ms"], r["ops"], r["bytes"] = r["calls"] + 1, r["ms"] + 1e3 * k["s"], r["ops"] + k["ops"], \
      r["bytes"] + k["bytes"]
  total = sum(r["ms"] for r in rows.values())
  out = sorted(rows.values(), key=lambda r: -r["ms"])[:top]
  for r in out:
    r |= {"ms": round(r["ms"], 3), "share": round(r["ms"] / total, 4), "gflops": round(r["ops"] / r["ms"] / 1e6, 1),
          "gbs": round(r["bytes"] / r["ms"] / 1e6, 1)}
    print(f"  {r['name']:40s} x{r['calls']:<3d} {r['ms']:9.2f} ms {100 * r['share']:5.1f}% {r['gflops']:9.1f} GFLOP/s "
          f"{r['gbs']:7.1f} GB/s {r['blocks']:7d} blocks" + "  tensor cores" * r["tc"], flush=True)
  return out

def timed_step(model, args) -> tuple[list[dict], float]:
  """train.py's step, built and warmed up, then one step recorded kernel by kernel."""
  step, data = train_step(model, args)
  for _ in range(args.warmup): step(*data()).item()
  kernels, wall = run_recorded(step, data(), timed=True)
  print(f"one step: {1e3 * wall:.1f} ms, {len(kernels)} kernels, {1e3 * sum(k['s'] for k in kernels):.1f} ms in "
        "kernels; the slowest:")
  return kernels, wall

def bench_profile(model, cfg, args) -> dict:
  """Where one train step's time goes, kernel by kernel, on one device; with --search N, also a BEAM search of the N
  slowest kernels (BEAM=--beam), their schedules written to --write-schedules for `kernels.pin`, and the step again
  with them pinned."""
  kernel_hooks.install()  # to know each kernel's key, for the search
  kernels, wall = timed_step(model, args)
  rows = profile(kernels, args.top)
  out = {"step_ms": round(1e3 * wall, 2), "kernel_ms": round(1e3 * sum(k["s"] for k in kernels), 2),
         "tc_share": round(tc_share(kernels), 4), "fill": round(fill(kernels, args.sms)[0], 4),
         "profile": [{k: r[k] for k in ("name", "calls", "ms", "share", "gflops", "gbs", "tc", "blocks")}
                     for r in rows]}
  if not args.search: return out
  asts, renderer, schedules = dict(kernel_hooks.compiled.values()), Device[args.devices[0]].renderer, []
  for r in rows[:args.search]:
    if r["key"] is None or r["key"] not in asts: continue
    t0, ast = time.perf_counter(), asts[r["key"]]
    searched = to_program(ast.replace(arg=replace(ast.arg, beam=args.beam)), renderer)
    opts = searched.src[0].arg.applied_opts
    schedules.append({"key": r["key"], "name": r["name"], "searched_name": ansistrip(searched.arg.name),
                      "device": args.devices[0], "beam": args.beam,
                      "opts": [[o.op.name, o.axis, list(o.arg) if isinstance(o.arg, tuple) else o.arg] for o in opts]})
    print(f"searched {r['name']} ({r['ms']:.2f} ms a step): {len(opts)} opts in {time.perf_counter() - t0:.0f} s",
          flush=True)
  if args.write_schedules:
    with open(args.write_schedules, "w") as f: json.dump(schedules, f, indent=1)
  kernel_hooks.pin(schedules)
  print(f"with the {len(schedules)} schedules pinned:")
  kernels, wall = timed_step(model, args)  # the same step, compiled again with the found schedules pinned
  profile(kernels, args.top)
  return out | {"searched": len(schedules), "pinned_step_ms": round(1e3 * wall, 2),
                "pinned_kernel_ms": round(1e3 * sum(k["s"] for k in kernels), 2),
                "unmatched_schedules": len(kernel_hooks.unmatched())}

def bench_sample(model, cfg, args) -> dict:
  """sample.py's default sampler on one batch of all-masked windows, its kernels compiled by a first short run."""
  x = Tensor.full((args.sample_batch, cfg.seq_len), cfg.mask_id).cast("int32").contiguous()
  for _ in diffusion.sample(model, x, cfg.mask_id, 4): pass  # compile the kernels once
  t0, nfe = time.perf_counter(), 0
  for _, _, nfe in diffusion.sample(model, x, cfg.mask_id, args.sample_steps): pass
  s = time.perf_counter() - t0
  return {"sample_s": round(s, 2), "sample_nfe": nfe, "sample_tok_per_s": round(args.sample_batch * cfg.seq_len / s, 1)}

def bench_peer(args) -> dict:
  """The PyTorch peer on the bundled sample, decompressed to a temp dir, at the same config."""
  with tempfile.TemporaryDirectory() as tmp:
    paths = {split: os.path.join(tmp, f"{split}.txt") for split in ("train", "valid")}
    for split, path in paths.items():
      with open(path, "wb") as f, lzma.open(os.path.join(ROOT, "data", "tinystories", f"{split}.txt.xz")) as xz:
        f.write(xz.read())
    cmd = [args.torch, args.peer, "--train", paths["train"], "--val", paths["valid"], "--dim", str(args.dim),
           "--layers", str(args.n_layers), "--heads", str(args.n_heads), "--seq-len", str(args.seq_len),
           "--batch", str(args.batch_size), "--vocab-size", str(args.vocab_size), "--steps", str(args.steps + 2),
           "--eval-every", str(10**9), "--eval-windows", "8", "--eval-samples", "1",
           "--device", {"CUDA": "cuda", "NV": "cuda", "METAL": "mps"}.get(Device.DEFAULT.split(":")[0], "cpu"),
           "--dtype", "bfloat16" if args.dtype == "bfloat16" else "float32"]
    out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"error: the PyTorch peer failed: {(out.stderr.strip() or str(out.returncode)).splitlines()[-1]}")
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  return {"torch_train_tok_per_s": summary["train_tok_per_s"], "torch_threads": summary["threads"],
          "torch": summary["torch"]}

def parse_args(argv=None) -> argparse.Namespace:
  """The benchmark's own flags; the rest are train.py's, resolved as train.py resolves them (its preset by backend)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__[__doc__.index("\n"):])
  p.add_argument("--steps", type=positive(), default=10, help="timed train steps")
  p.add_argument("--warmup", type=positive(), default=2, help="untimed steps first (the JIT captures on the second)")
  p.add_argument("--sample-steps", type=positive(), default=128)
  p.add_argument("--sample-batch", type=positive(), default=1)
  p.add_argument("--skip-sample", action="store_true")
  p.add_argument("--cost", action="store_true", help="count one step's operations, bytes and the GPU's fill (run with "
                 "DEV=NULL NULL_ALLOW_COPYOUT=1: no kernel runs)")
  p.add_argument("--sms", type=positive(), default=132, help="with --cost: the card's SMs (an H200's 132): a kernel on "
                 "fewer thread blocks leaves some idle, one on two waves of them fills it")
  p.add_argument("--top", type=positive(), default=8, help="with --cost or --profile: how many of the costliest")
  p.add_argument("--profile", action="store_true", help="time one train step kernel by kernel, on one device")
  p.add_argument("--search", type=positive(), metavar="N", help="with --profile: BEAM-search the N slowest kernels, "
                 "then time the step again with their schedules pinned (kernels.pin)")
  p.add_argument("--beam", type=positive(), default=4, help="with --search: the beam width (BEAM); default 4")
  p.add_argument("--write-schedules", metavar="JSON", help="with --search: write the schedules found, for --schedules")
  p.add_argument("--schedules", metavar="JSON", help="pin the schedules in this file (written by --write-schedules)")
  p.add_argument("--one-device", action="store_true", help="train on one device even where the CPU has cores for two")
  p.add_argument("--torch", help="a Python with torch installed: also run the PyTorch peer and report the ratio")
  p.add_argument("--peer", default=os.path.join(ROOT, "..", "shared", "bench", "torch_mdlm.py"))
  args, rest = p.parse_known_args(argv)
  if args.search and not args.profile: p.error("--search needs --profile")
  try: trained = train.resolve(train.parse_args(rest))
  except ValueError as e: sys.exit(f"error: {e}")
  for k, v in vars(trained).items(): setattr(args, k, v) if k not in ("steps", "warmup") else None
  args.wanted, args.dtype = args.dtype, devices.supported_dtype(args.dtype)
  args.devices = devices.for_batch(args.batch_size, 1 if args.one_device or args.profile else args.devices)
  return args

def main(argv=None):
  cli.plain_output()
  devices.choose()
  args = parse_args(argv)
  if args.schedules:
    try: kernel_hooks.pin(json.load(open(args.schedules)))
    except (OSError, ValueError, KeyError, TypeError) as e: sys.exit(f"error: --schedules {args.schedules}: {e}")
  if args.torch and not os.path.exists(args.peer): sys.exit(f"error: no PyTorch peer at {args.peer}: pass --peer PATH")
  cfg = Config(n_tokens=vocab.n_tokens(list(range(args.vocab_size)) if args.vocab_size else None), seq_len=args.seq_len,
               dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, time_cond=args.time_cond)
  Tensor.manual_seed(0)
  model = Denoiser(cfg, dtype=args.dtype)
  print(f"device {', '.join(map(devices.name, args.devices))} | preset {args.preset} | {n_params(model) / 1e6:.2f}M "
        f"parameters | vocab {cfg.n_tokens} | batch {args.batch_size} x {args.seq_len} | {args.dtype} | "
        f"{flops_per_token(cfg) / 1e6:.1f} MFLOP/token", flush=True)
  result = {"preset": args.preset, "device": Device.DEFAULT, "train_devices": len(args.devices), "dtype": args.dtype,
            "params": n_params(model), "batch_size": args.batch_size, "seq_len": args.seq_len, "dim": args.dim,
            "n_layers": args.n_layers, "vocab_size": cfg.n_tokens, "time_cond": cfg.time_cond}
  if args.cost:
    result |= bench_cost(model, cfg, args)
    print(f"cost: {result['kernels']} kernels, {result['gops']:,.0f} G operations = {result['ops_ratio']:.2f} x the "
          f"model's FLOPs, {result['gb_moved']:.1f} GB moved = {result['mb_per_token']:.2f} MB/token, "
          f"{100 * result['fill']:.1f}% of operations in kernels of >= {2 * args.sms} blocks", flush=True)
    return print(json.dumps(result))
  if args.profile:
    with Context(JIT=2): result |= bench_profile(model, cfg, args)  # JIT=2: kernels one by one, not as a graph
    return print(json.dumps(result))
  result |= bench_train(model, cfg, args)
  print(f"train: {result['train_ms_per_step']:.0f} ms/step, {result['train_tok_per_s']:,.0f} tokens/s, "
        f"{result['train_gflops']:.1f} GFLOP/s, peak device memory {result['peak_mem_mb']:.0f} MB", flush=True)
  if not args.skip_sample:
    result |= bench_sample(model, cfg, args)
    print(f"sample: {args.sample_steps} steps, NFE {result['sample_nfe']}, {result['sample_s']:.1f} s, "
          f"{result['sample_tok_per_s']:,.1f} tokens/s", flush=True)
  if args.torch:
    result |= bench_peer(args)
    result["ratio_vs_torch"] = round(result["train_tok_per_s"] / result["torch_train_tok_per_s"], 3)
    print(f"PyTorch peer ({result['torch']}, {result['torch_threads']} threads): "
          f"{result['torch_train_tok_per_s']:,.0f} tokens/s; tinygrad / PyTorch = {result['ratio_vs_torch']:.2f}x",
          flush=True)
  if args.schedules: result["unmatched_schedules"] = len(kernel_hooks.unmatched())
  result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  print(json.dumps(result))

if __name__ == "__main__": main()
