"""Measure the train step and the sampler: tokens/s, ms/step, achieved GFLOP/s, time to first step, peak memory;
optionally the PyTorch peer (../shared/bench/torch_mdlm.py) at the same config in the same run, and the ratio.

  python bench.py --preset small
  python bench.py --preset small --torch /tmp/torchvenv/bin/python     # side by side with the PyTorch peer
  CACHELEVEL=0 python bench.py --preset small                          # time to first step with a cold kernel cache
  DEV=NULL NULL_ALLOW_COPYOUT=1 python bench.py --preset base --cost     # what one step costs a GPU, measured on any machine
  DEV=NULL:NVCC:sm_90 NULL_ALLOW_COPYOUT=1 python bench.py --preset base --cost  # ... and compile every kernel for Hopper

The last line printed is one JSON object (scripts read it)."""
import argparse, json, lzma, os, resource, subprocess, sys, tempfile, time
import numpy as np
from tinygrad import Device, GlobalCounters, Tensor, dtypes, nn
from tinygrad.helpers import ansistrip
from tinygrad.uop.ops import Ops, sym_infer
import devices, diffusion
from data import vocab
from model import Config, Denoiser, n_params, parameters
from settings import PRESETS, add_size_flags, check_size, fill, positive

HERE = os.path.dirname(os.path.abspath(__file__))

def flops_per_token(cfg:Config) -> float:
  """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4), the tied output head included,
  plus attention's QKᵀ and AV (4·T·d per layer forward, ×3 with backward). The embedding lookup does no matmul."""
  d, L = cfg.dim, cfg.n_layers
  return 6 * (12 * d * d * L + d * cfg.padded_vocab) + 12 * cfg.seq_len * d * L

def train_step(model, cfg, args):
  """A train step on args.devices and a generator of random batches for it (speed does not depend on the data)."""
  opt = nn.optim.AdamW(list(parameters(model).values()), lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.0)
  def loss(m, x0, u_t, u_mask, rows):  # the plain NELBO with antithetic times, as train.py's default
    return diffusion.nelbo(m, x0, diffusion.antithetic_times(rows[1], u_t)[rows[0]:rows[0] + x0.shape[0]], cfg.mask_id, u=u_mask)
  step = devices.train_step(devices.replicas(model, args.devices), opt, loss)
  rng, B, T = np.random.default_rng(0), args.batch_size, args.seq_len
  return step, lambda: (rng.integers(0, cfg.n_tokens, (1, B, T), dtype=np.int32), rng.random((1, 1), dtype=np.float32), rng.random((1, B, T), dtype=np.float32))

def bench_train(model, cfg, args) -> dict:
  step, data = train_step(model, cfg, args)
  times, peak = [], 0
  for i in range(args.warmup + args.steps):
    x = data()
    t0 = time.perf_counter()
    step(*x).item()
    times.append(time.perf_counter() - t0)
    peak = max(peak, GlobalCounters.mem_used)
    if i == 0: print(f"first train step (compiles kernels): {times[0]:.1f} s", flush=True)
  ms = 1000 * float(np.median(times[args.warmup:]))
  tok = args.batch_size * args.seq_len
  return {"first_step_s": round(times[0], 2), "train_ms_per_step": round(ms, 1), "train_tok_per_s": round(tok / ms * 1000, 1),
          "train_gflops": round(flops_per_token(cfg) * tok / ms / 1e6, 2), "peak_mem_mb": round(peak / 2**20, 1)}

def bench_cost(model, cfg, args) -> dict:
  """One train step scheduled on tinygrad's NULL device, which runs nothing but counts each kernel's operations and the
  bytes it moves through device memory: the GPU's two floors (ops / peak rate, bytes / bandwidth) without a GPU."""
  from tinygrad.engine import realize
  kernels, track = [], realize.track_stats
  def tracked(ctx, call, *a):
    if ctx.update_stats and call.src[0].op is Ops.PROGRAM:
      e = realize.estimate_uop(call)
      kernels.append((call.src[0].arg.name, sym_infer(e.ops, ctx.var_vals), sym_infer(e.mem, ctx.var_vals)))
    return track(ctx, call, *a)
  step, data = train_step(model, cfg, args)
  GlobalCounters.reset()
  realize.track_stats = tracked
  try:
    t0 = time.perf_counter()
    step(*data()).item()
    first = time.perf_counter() - t0
  finally: realize.track_stats = track
  tokens = args.batch_size * args.seq_len
  for key, label in ((1, "operations"), (2, "bytes")):
    print(f"top kernels by {label}:")
    for name, ops, mem in sorted(kernels, key=lambda k: -k[key])[:args.top]:
      print(f"  {ansistrip(name):40s} {ops / 1e9:10.3f} GOP {mem / 1e9:9.4f} GB")
  return {"kernels": len(kernels), "gops": round(GlobalCounters.global_ops / 1e9, 3), "model_gflop": round(flops_per_token(cfg) * tokens / 1e9, 3),
          "ops_ratio": round(GlobalCounters.global_ops / (flops_per_token(cfg) * tokens), 3), "gb_moved": round(GlobalCounters.global_mem / 1e9, 3),
          "mb_per_token": round(GlobalCounters.global_mem / tokens / 1e6, 3), "first_step_s": round(first, 1)}

def bench_sample(model, cfg, args) -> dict:
  x = Tensor.full((args.sample_batch, cfg.seq_len), cfg.mask_id, dtype=dtypes.int32).contiguous()
  cache = not cfg.time_cond
  diffusion.generate(model, x, cfg.mask_id, 4, cache=cache)  # compile the kernels once
  t0 = time.perf_counter()
  nfe = 0
  for _, _, nfe in diffusion.sample(model, x, cfg.mask_id, args.sample_steps, cache=cache): pass
  s = time.perf_counter() - t0
  return {"sample_s": round(s, 2), "sample_nfe": nfe, "sample_tok_per_s": round(args.sample_batch * cfg.seq_len / s, 1)}

def bench_peer(args) -> dict:
  """The PyTorch peer on the bundled sample, decompressed to a temp dir, at the same config."""
  with tempfile.TemporaryDirectory() as tmp:
    paths = {}
    for split in ("train", "valid"):
      paths[split] = os.path.join(tmp, f"{split}.txt")
      with open(paths[split], "wb") as f: f.write(lzma.decompress(open(os.path.join(HERE, "data", "tinystories", f"{split}.txt.xz"), "rb").read()))
    cmd = [args.torch, args.peer, "--train", paths["train"], "--val", paths["valid"], "--dim", str(args.dim), "--layers", str(args.n_layers),
           "--heads", str(args.n_heads), "--seq-len", str(args.seq_len), "--batch", str(args.batch_size), "--vocab-size", str(args.vocab_size),
           "--steps", str(args.steps + 2), "--eval-every", str(10**9), "--eval-windows", "8", "--eval-samples", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode: sys.exit(f"error: the PyTorch peer failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  return {"torch_train_tok_per_s": summary["train_tok_per_s"], "torch_threads": summary["threads"], "torch": summary["torch"]}

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
  add_size_flags(p)
  p.add_argument("--steps", type=positive(), default=10, help="timed train steps")
  p.add_argument("--warmup", type=positive(), default=2, help="untimed train steps first (the JIT captures on the second)")
  p.add_argument("--sample-steps", type=positive(), default=128)
  p.add_argument("--sample-batch", type=positive(), default=1)
  p.add_argument("--skip-sample", action="store_true")
  p.add_argument("--cost", action="store_true", help="count one step's operations and bytes (run with DEV=NULL NULL_ALLOW_COPYOUT=1: no kernel runs)")
  p.add_argument("--top", type=positive(), default=8, help="with --cost: how many of the costliest kernels to list")
  p.add_argument("--one-device", action="store_true", help="train on one device even where the CPU has cores for two")
  p.add_argument("--torch", help="a Python with torch installed: also run the PyTorch peer and report the ratio")
  p.add_argument("--peer", default=os.path.join(HERE, "..", "shared", "bench", "torch_mdlm.py"))
  args = p.parse_args(argv)
  devices.prefer_cpu_backend()
  args.preset = args.preset or ("small" if devices.is_cpu() else "base")
  fill(args, PRESETS[args.preset], {"time_cond": True})
  args.dtype = devices.supported_dtype(args.dtype)
  try: check_size(args)
  except ValueError as e: sys.exit(f"error: {e}")
  args.devices = devices.for_batch(args.batch_size, 1 if args.one_device else args.devices)
  if args.torch and not os.path.exists(args.peer): sys.exit(f"error: no PyTorch peer at {args.peer}: pass --peer PATH")

  cfg = Config(n_tokens=args.vocab_size + 1 if args.vocab_size else vocab.n_tokens(None), seq_len=args.seq_len,  # + <unk>
               dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, time_cond=args.time_cond)
  Tensor.manual_seed(0)
  model = Denoiser(cfg, dtype=args.dtype)
  print(f"device {', '.join(map(devices.name, args.devices))} | preset {args.preset} | {n_params(model) / 1e6:.2f}M parameters | vocab {cfg.n_tokens} | "
        f"batch {args.batch_size} x {args.seq_len} | {args.dtype} | {flops_per_token(cfg) / 1e6:.1f} MFLOP/token", flush=True)
  result = {"preset": args.preset, "device": Device.DEFAULT, "train_devices": len(args.devices), "dtype": args.dtype, "params": n_params(model), "batch_size": args.batch_size,
            "seq_len": args.seq_len, "dim": args.dim, "n_layers": args.n_layers, "vocab_size": cfg.n_tokens, "time_cond": cfg.time_cond}
  if args.cost:
    result |= bench_cost(model, cfg, args)
    print(f"cost: {result['kernels']} kernels, {result['gops']:,.0f} G operations = {result['ops_ratio']:.2f} x the model's FLOPs, "
          f"{result['gb_moved']:.1f} GB moved = {result['mb_per_token']:.2f} MB/token, first step {result['first_step_s']:.0f} s", flush=True)
    return print(json.dumps(result))
  result |= bench_train(model, cfg, args)
  print(f"train: {result['train_ms_per_step']:.0f} ms/step, {result['train_tok_per_s']:,.0f} tokens/s, "
        f"{result['train_gflops']:.1f} GFLOP/s, peak device memory {result['peak_mem_mb']:.0f} MB", flush=True)
  if not args.skip_sample:
    result |= bench_sample(model, cfg, args)
    print(f"sample: {args.sample_steps} steps, NFE {result['sample_nfe']}, {result['sample_s']:.1f} s, {result['sample_tok_per_s']:,.1f} tokens/s", flush=True)
  if args.torch:
    result |= bench_peer(args)
    result["ratio_vs_torch"] = round(result["train_tok_per_s"] / result["torch_train_tok_per_s"], 3)
    print(f"PyTorch peer ({result['torch']}, {result['torch_threads']} threads): {result['torch_train_tok_per_s']:,.0f} tokens/s; "
          f"tinygrad / PyTorch = {result['ratio_vs_torch']:.2f}x", flush=True)
  result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  print(json.dumps(result))

if __name__ == "__main__": main()
