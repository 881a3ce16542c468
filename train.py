"""Train a masked diffusion language model on TinyStories (or your own text) with tinygrad.

  python train.py                          # a preset for this machine's backend, TinyStories (or the bundled sample)
  python train.py --preset tiny --data sample --steps 50 --out out/tiny
  python train.py --resume                 # continue out/ckpt.safetensors exactly where it stopped
  python train.py --causal --out out/twin  # its autoregressive twin, for sample.py --race and --judge

tinygrad picks the backend (DEV=CPU, DEV=CUDA, DEV=METAL, ...); BEAM= and DEBUG= work as usual."""
import argparse, json, math, os, sys, time
import numpy as np
from tinygrad import Context, Tensor, TinyJit, nn
import diffusion
from data import DataError, batches, prepare, vocab
from harness import cli, devices, display, kernels, rundir
from harness.cli import fraction, number, positive
from model import Config, Denoiser, n_params, parameters

PRESETS = ("tiny", "small", "base")  # the tests; a CPU; a GPU
SETTINGS = {  # name: (value, or one per preset; type or choices; help). Each is a flag: --name-with-dashes
  "data": ("tinystories", str, "sample (bundled), tinystories (falls back to sample offline) or a UTF-8 text file"),
  "seed": (1337, number(int, 0), "random seed of the weights, the windows and the noise"),
  "dim": ((32, 128, 512), positive(), "width of the residual stream"),
  "n_layers": ((2, 4, 8), positive(), "transformer blocks"),
  "n_heads": ((2, 4, 8), positive(), "attention heads"),
  "seq_len": ((32, 256, 256), positive(), "tokens per training window: the context"),
  "vocab_size": ((512, 8192, 8192), number(int, 0), "keep the K most frequent training tokens (+ <unk>); 0: all GPT-2"),
  "batch_size": ((8, 8, 64), positive(), "windows per step"),
  "dtype": (("float32", "float32", "bfloat16"), ("float32", "bfloat16", "float16"), "compute dtype (weights: float32)"),
  "time_cond": (False, bool, "the denoiser reads t; off, it sees only x_t (the sampler can then reuse its output)"),
  "causal": (False, bool, "train the autoregressive twin instead: the same network, causal attention, next-token NLL"),
  "steps": ((40, 3000, 20000), positive(), "optimizer steps"),
  "lr": ((3e-3, 1e-3, 6e-4), positive(float), "peak learning rate"),
  "warmup": ((5, 100, 500), positive(), "steps of linear warm-up"),
  "grad_accum": (1, positive(), "micro-batches per optimizer step"),
  "weight_decay": (0.0, number(float, 0), "AdamW's"),
  "grad_clip": (1.0, positive(float), "global gradient-norm clip"),
  "ema": ((0.0, 0.999, 0.9999), fraction, "decay of the weight average used for evaluation and sampling; 0: off"),
  "schedule": ("loglinear", tuple(diffusion.SCHEDULES), "noise schedule"),
  "estimator": ("plain", ("plain", "count"), "the step's NELBO: plain (diffusion.nelbo) or count (nelbo_by_count)"),
  "windows": ("stories", batches.WINDOWS, "where windows start: stories (half after an EOT), padded, random (data/)"),
  "eval_every": ((20, 500, 1000), positive(), "steps between evaluations (the first at step 100 if sooner)"),
  "eval_windows": ((16, 128, 256), positive(), "validation windows"),
  "eval_len": ((32, 128, 256), positive(), "tokens per validation window"),
  "eval_draws": ((2, 8, 8), positive(), "mask counts per validation window at each evaluation (even)"),
  "final_draws": ((4, 32, 32), positive(), "the same for the last evaluation, the run's figure"),
  "devices": (None, positive(), "devices to split a batch over (not kept at --resume); default all, 2 on a CPU"),
}
ARCH = ("dim", "n_layers", "n_heads", "seq_len", "vocab_size", "time_cond", "causal")  # a resumed run may not change
FIRST_EVAL = 100  # an early look at the model, then every eval_every steps

def parse_args(argv=None) -> argparse.Namespace:
  """The flags, generated from SETTINGS; one left out is None until `resolve` fills it."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__[__doc__.index("\n"):])
  p.add_argument("--preset", choices=PRESETS, help="default: small on a CPU, base on a GPU")
  p.add_argument("--out", default="out", help="directory for ckpt.safetensors and log.jsonl; default out")
  p.add_argument("--resume", action="store_true", help="continue the run in --out")
  for name, (value, kind, what) in SETTINGS.items():
    flag = "--" + name.replace("_", "-")
    shown = ", ".join(f"{p} {v}" for p, v in zip(PRESETS, value)) if isinstance(value, tuple) else value
    if kind is bool: p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{what}; default {shown}")
    else: p.add_argument(flag, type=None if isinstance(kind, tuple) else kind, choices=kind if isinstance(kind, tuple)
                         else None, help=f"{what}; default {shown}")
  args = p.parse_args(argv)
  args.explicit = {k for k in SETTINGS if getattr(args, k) is not None}
  return args

def resolve(args, saved:dict|None=None) -> argparse.Namespace:
  """Each setting left out: the resumed run's (not this machine's --devices), else the preset's, else its one value."""
  args.preset = args.preset or (saved or {}).get("preset") or ("small" if devices.is_cpu() else "base")
  saved = saved and {**saved, "windows": batches.windows_of(saved)}
  for name, (value, _, _) in SETTINGS.items():
    if getattr(args, name) is None:
      setattr(args, name, saved[name] if saved and name in saved and name != "devices" else
              value[PRESETS.index(args.preset)] if isinstance(value, tuple) else value)
  if args.causal: args.time_cond = False  # the twin has no noise level to read
  return cli.check_sizes(args)

def learning_rate(step:int, args) -> float:  # linear warm-up, then cosine decay to 10% of the peak
  return args.lr * min(1, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1, step / args.steps))))

def batch(tokens, stories, keep, args, rng) -> list[np.ndarray]:
  """A step's windows x0 (A micro-batches, B, T) and all its draws, from one generator so that a resumed run repeats it
  exactly on any number of devices: times t and mask counts k (A, B) spread over each micro-batch, uniforms u."""
  B, T, A = args.batch_size, args.seq_len + args.causal, args.grad_accum  # the twin predicts a token from those before
  x0 = vocab.to_compact(batches.train_batch(tokens, A * B, T, rng, args.windows, stories), keep).reshape(A, B, T)
  offset = rng.random((A, 1), dtype=np.float32)
  return [x0, diffusion.antithetic_times(offset, B), diffusion.mask_counts(offset, B, T),
          rng.random((A, B, T), dtype=np.float32)]

def objective(args, mask_id:int):
  """The loss of some rows of a micro-batch, with their draws: the NELBO (either estimate), or the twin's NLL."""
  def loss(model, x0:Tensor, t:Tensor, k:Tensor, u:Tensor) -> Tensor:
    if args.causal: return diffusion.ar_nll(model, x0).mean()
    if args.estimator == "count": return diffusion.nelbo_by_count(model, x0, k, u, mask_id, args.schedule).mean()
    return diffusion.nelbo(model, x0, t, mask_id, args.schedule, u)
  return loss

def make_step(copies:list[Denoiser], opt, loss, grad_clip:float, ema:Denoiser|None=None):
  """One optimizer step, data parallel: on each device (devices.replicas) the gradient of its share of the batch; then,
  on the first, their mean, clipped, the optimizer, the weight average, and the new weights sent to the others."""
  params = [list(parameters(m).values()) for m in copies]
  ema_params, home = list(parameters(ema).values()) if ema else [], params[0][0].device
  def gradient(model:Denoiser, ps:list[Tensor]) -> TinyJit:
    @TinyJit
    @Context(TRAINING=1)
    def grad(x0:Tensor, t:Tensor, k:Tensor, u:Tensor) -> tuple[Tensor, Tensor]:
      for p in ps: p.grad = None
      total, A = Tensor.zeros((), device=x0.device), x0.shape[0]
      for i in range(A):  # micro-batches: their gradients add up
        micro = loss(model, x0[i], t[i], k[i], u[i])
        (micro / A).backward()
        total = total + micro.detach() / A
      flat = Tensor.cat(*[p.grad.contiguous().flatten() for p in ps])  # contiguous: else all fuse into one kernel
      return total.realize(flat), flat  # together: realized apart, the forward pass would run twice
    return grad
  @TinyJit
  @Context(TRAINING=1)
  def update(decay:Tensor, *grads:Tensor) -> Tensor:
    g = sum(flat.to(home) for flat in grads) / len(grads)
    g = g * (grad_clip / (g.square().sum().sqrt() + 1e-6)).minimum(1)  # g ← g · min(1, c / ‖g‖)
    for p, part in zip(params[0], g.split([p.numel() for p in params[0]])): p.grad = part.reshape(p.shape)
    updates = opt.schedule_step()
    for e, p in zip(ema_params, params[0]): e.assign(decay * e + (1 - decay) * p)  # θ_ema ← d·θ_ema + (1 − d)·θ
    return Tensor.realize(*updates, *ema_params, *devices.copy_weights(params, lazy=True))

  devices.copy_weights(params)
  grads = [gradient(m, ps) for m, ps in zip(copies, params)]
  def step(x0, t, k, u, ema_decay:float=0.0) -> Tensor:
    with Context(**kernels.STEP_CONTEXT):  # tensor cores for every matmul (kernels.py)
      shares = devices.split([x0, t, k, u], [ps[0].device for ps in params])
      results = devices.on_devices([lambda g=g, x=x: g(*x) for g, x in zip(grads, shares)], grads)  # threads on a CPU
      update(Tensor([ema_decay], device=home), *[flat for _, flat in results])
    return sum(total.to(home) for total, _ in results) / len(results)
  return step

def make_evaluate(copies:list[Denoiser], val, keep, args, mask_id:int, draws:int):
  """Validation NELBO ± its standard error on fixed windows with fixed draws (the same weights, the same numbers): each
  window at `draws` mask counts stratified over 1..L; the twin: its exact NLL. Batches are shared out over `copies`."""
  L, K, rng = args.eval_len, 1 if args.causal else draws, np.random.default_rng(0)
  windows = vocab.to_compact(batches.val_windows(val, L + args.causal, args.eval_windows), keep)
  k = diffusion.mask_counts(rng.random((len(windows), 1)) / K, K, L).reshape(-1)  # (N·K,): K per window
  u = rng.random((len(k), L), dtype=np.float32)
  def score(m, x0, k, u) -> Tensor:
    return diffusion.ar_nll(m, x0) if args.causal else diffusion.nelbo_by_count(m, x0, k, u, mask_id, args.schedule)
  scores = devices.batched(copies, score, [np.repeat(windows, K, 0), k, u], args.batch_size)
  def evaluate() -> tuple[float, float]:
    e = scores()
    return (float(e.mean()), 0.0) if args.causal else diffusion.stratified_mean(e.reshape(-1, K))
  return evaluate

def story(model:Denoiser, keep, args, steps:int=64) -> str:
  """A sample as sample.py writes one by default (after an end of text), for a look at the model at each evaluation."""
  x, first = np.full((1, args.seq_len), model.cfg.mask_id, np.int32), int(batches.reads_after_eot(vars(args)))
  if first: x[0, 0] = vocab.eot(keep)
  *_, (xs, _, _) = diffusion.sample_ar(model, Tensor(x), model.cfg.mask_id) if args.causal else \
    diffusion.sample(model, Tensor(x), model.cfg.mask_id, steps, args.schedule)
  return vocab.decode(xs.numpy()[0][first:], keep)

def setup(args) -> tuple:
  """The run to resume, the settings, the data, its vocabulary and stories: all checked before any work."""
  tensors, meta = rundir.open_run(args.out, args.resume)  # locked; the checkpoint to resume, or none there yet
  resolve(args, meta and meta["args"])
  ds = prepare.load(args.data, explicit="data" in args.explicit)
  args.data = "sample" if ds["name"] == "sample" else prepare.where(args.data)  # a file: found from any directory
  batches.check_enough(ds, args.seq_len + args.causal, args.eval_len + args.causal, args.data, args.preset)
  keep = vocab.top_k(prepare.train_counts(ds["meta"]), args.vocab_size)
  applied = rundir.check_resumable(meta, args, keep, prepare.content_key(ds["meta"]), ARCH) if meta else []
  if meta and meta["step"] >= args.steps:
    sys.exit(print(f"the run in {args.out} is finished (step {meta['step']} of {args.steps}): to train it further, "
                   f"python train.py --out {args.out} --resume --steps N, with N > {meta['step']}"))
  if applied: print(f"resuming step {meta['step']} with " + ", ".join(applied))
  args.windows, stories = batches.windows(ds["train"], args.seq_len + args.causal, args.windows, args.batch_size,
                                          fixed="windows" in args.explicit or bool(meta))
  return tensors, meta, ds, keep, stories

def build(args, tensors, meta, keep) -> tuple:
  """The network, its weight average, the optimizer, the data generator: from the seed, or where the run stopped."""
  cfg = Config(n_tokens=vocab.n_tokens(keep), seq_len=args.seq_len, dim=args.dim, n_layers=args.n_layers,
               n_heads=args.n_heads, time_cond=args.time_cond, causal=args.causal)
  Tensor.manual_seed(args.seed)
  model = Denoiser(cfg, dtype := devices.supported_dtype(args.dtype))
  ema = Denoiser(cfg, dtype) if args.ema > 0 else None
  opt = nn.optim.AdamW(list(parameters(model).values()), lr=args.lr, b1=0.9, b2=0.95, weight_decay=args.weight_decay)
  if ema: Tensor.realize(*[e.assign(p.detach()) for e, p in zip(parameters(ema).values(), parameters(model).values())])
  rng = np.random.default_rng(args.seed)
  if meta: rundir.resume(args.out, meta, tensors, rundir.state(model, ema, opt, keep), rng)  # and repair the log
  rundir.check_space(args.out, sum(v.nbytes() for v in rundir.state(model, ema, opt, keep).values()), bool(meta))
  print(f"device {', '.join(map(devices.name, devices.for_batch(args.batch_size, args.devices)))} | preset "
        f"{args.preset} | {n_params(model) / 1e6:.2f}M parameters | vocab {cfg.n_tokens} | {args.windows} windows | "
        f"{dtype}" + f" (the device has no {args.dtype})" * (dtype != args.dtype) + " | twin (--causal)" * args.causal)
  return model, ema, opt, rng

def train(args, run:dict):
  """The loop: a step, a line of progress, and at each evaluation a checkpoint, then a sample."""
  tensors, meta, ds, keep, stories = setup(args)
  model, ema, opt, rng = build(args, tensors, meta, keep)
  devs, mask_id = devices.for_batch(args.batch_size, args.devices), model.cfg.mask_id
  if shipped := kernels.pin_shipped(args.preset, devs[0]): print(shipped)  # searched schedules, on a GPU they fit
  step = make_step(devices.replicas(model, devs), opt, objective(args, mask_id), args.grad_clip, ema)
  copies = devices.replicas(ema or model, devs)
  evaluate = [make_evaluate(copies, ds["val"], keep, args, mask_id, d) for d in (args.eval_draws, args.final_draws)]
  first = meta["step"] if meta else 0
  run.update(step=first, saved=first, val=meta and meta.get("val"))
  evals = [s for s in range(first + 1, args.steps + 1) if s % args.eval_every == 0 or s in (FIRST_EVAL, args.steps)]
  progress = display.Progress(args.steps, args.batch_size * args.seq_len * args.grad_accum, meta)
  progress.say(f"data {ds['name']} ({len(ds['train']):,} tokens) | step {first + 1} compiles first (~30-60 s on a CPU)"
               f" | validation, a sample and a checkpoint at step {evals[0]}, then every {args.eval_every}")
  def save():
    rundir.save(os.path.join(args.out, "ckpt.safetensors"), rundir.state(model, ema, opt, keep), {
      "config": rundir.config_dict(model.cfg), "step": run["step"], "tokens": progress.tokens, "val": run["val"],
      "elapsed_s": progress.elapsed, "rng": rng.bit_generator.state, "data_key": prepare.content_key(ds["meta"]),
      "vocab_keep": keep if keep is None else [int(i) for i in keep],
      "args": {k: getattr(args, k) for k in ("preset", *SETTINGS) if k != "devices"}})  # not this machine's
    run["saved"] = run["step"]
  with open(os.path.join(args.out, "log.jsonl"), "a") as log:
    while run["step"] < args.steps and not run["stop"]:
      lr, data = learning_rate(run["step"], args), batch(ds["train"], stories, keep, args, rng)
      opt.lr.assign(Tensor([lr], dtype=opt.lr.dtype)).realize()
      t0, run["compiling"] = time.perf_counter(), progress.compiling
      loss = step(*data, ema_decay=min(args.ema, (1 + run["step"]) / (10 + run["step"]))).item()  # a new average tracks
      if not math.isfinite(loss): raise ValueError(rundir.nan_message(loss, run["step"] + 1, args.out, evals[0]))
      run["step"] += 1
      row = progress.step(run["step"], loss, lr, time.perf_counter() - t0)  # the log's row, and the progress line
      if run["step"] in evals:
        progress.say(f"step {run['step']}: evaluating on {args.eval_windows} validation windows...", transient=True)
        t0, (nelbo, se) = time.perf_counter(), evaluate[run["step"] == args.steps]()  # the last one: more draws
        run["val"] = {"step": run["step"], "nelbo": round(nelbo, 4), "se": round(se, 4)}
        row.update(val_nelbo=round(nelbo, 4), val_nelbo_se=round(se, 4), val_ppl=round(math.exp(nelbo), 2),
                   eval_s=round(time.perf_counter() - t0, 2))
      log.write(json.dumps(row) + "\n"); log.flush()
      if row["val_nelbo"] is not None:
        save()  # before anything else is printed
        display.learning_curve(log.name, os.path.join(args.out, "curve.svg"))
        progress.say(display.validation(row, args.causal))
        progress.say("  writing a sample...", transient=True)
        progress.say(f"  sample: {story(ema or model, keep, args)!r}")
  if run["stop"]: save()
  print(f"\n{'interrupted: ' if run['stop'] else ''}checkpoint at step {run['step']} in {args.out}/ckpt.safetensors"
        + " (continue with --resume)" * run["stop"])

def main(argv=None):
  cli.plain_output()
  args, run = parse_args(argv), {"step": 0, "saved": 0, "stop": False, "compiling": False}
  cli.stop_after_step(run)  # Ctrl-C, kill, timeout: stop after the step and save (at once if nothing is unsaved)
  try:
    devices.choose()
    train(args, run)
  except KeyboardInterrupt:
    cli.interrupted(f"{args.out}/ckpt.safetensors holds step {run['saved']} (continue with --resume)" if run["saved"]
                    else "nothing was saved")
  except (DataError, ValueError, FileNotFoundError, MemoryError) as e: sys.exit(f"error: {cli.why(e)}")
  if run["stop"]: sys.exit(130)

if __name__ == "__main__": main()
