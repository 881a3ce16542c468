"""Train a masked diffusion language model on TinyStories (or your own text) with tinygrad.

  python train.py                          # a preset for this machine's backend, TinyStories (or the bundled sample)
  python train.py --preset tiny --data sample --steps 50 --out out/tiny
  python train.py --resume                 # continue out/ckpt.safetensors exactly where it stopped

tinygrad picks the backend (DEV=CPU, DEV=CUDA, DEV=METAL, ...); BEAM= and DEBUG= work as usual."""
import argparse, json, math, os, signal, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes, nn
import diffusion
from data import DataError, prepare, vocab
from data.batches import WINDOWS, story_starts, train_batch, val_windows
from model import (PRESETS, Config, Denoiser, add_size_flags, check_size, config_dict, device_name, devices, is_cpu, load_checkpoint,
                   n_params, parameters, positive, prefer_cpu_backend, replicas, save_checkpoint, supported_dtype)

TRAINING = {  # the training half of each preset (model.PRESETS holds the network and batch); every value is also a flag
  "tiny":  dict(steps=40, lr=3e-3, warmup=5, eval_every=20, eval_windows=16, eval_draws=2, final_draws=4, ema=0.0),
  "small": dict(steps=3000, lr=1e-3, warmup=100, eval_every=500, eval_windows=128, eval_draws=8, final_draws=32, ema=0.999),
  "base":  dict(steps=20000, lr=6e-4, warmup=500, eval_every=1000, eval_windows=256, eval_draws=8, final_draws=32, ema=0.9999),
}
ARCH = ("dim", "n_layers", "n_heads", "seq_len", "vocab_size", "time_cond", "causal")  # what a resumed run may not change

def fraction(s):
  v = float(s)
  if not 0 <= v < 1: raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
  return v

def parse_args(argv=None):
  """Flags left out are None here; `resolve` fills them from the checkpoint being resumed, the preset, or DEFAULTS."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
  p.add_argument("--data", help="sample (bundled), tinystories (default; falls back to sample offline) or a UTF-8 text file")
  p.add_argument("--out", default="out", help="directory for ckpt.safetensors and log.jsonl (default: out)")
  p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
  p.add_argument("--seed", type=int)
  add_size_flags(p)
  for name, kind in [("steps", positive(int)), ("lr", positive(float)), ("warmup", positive(int)), ("eval_every", positive(int)),
                     ("eval_windows", positive(int))]:
    p.add_argument("--" + name.replace("_", "-"), type=kind)
  p.add_argument("--eval-draws", type=positive(int), help="mask counts per validation window at each evaluation (even)")
  p.add_argument("--final-draws", type=positive(int), help="the same for the last evaluation, the run's figure (even)")
  p.add_argument("--ema", type=fraction, help="decay of the weight average used for evaluation and sampling; 0: off")
  p.add_argument("--grad-accum", type=positive(int), help="micro-batches per optimizer step (default 1)")
  p.add_argument("--schedule", choices=diffusion.SCHEDULES, help="noise schedule for training (default loglinear)")
  p.add_argument("--estimator", choices=["plain", "count"], help="how each step estimates the NELBO: plain (default: "
                 "diffusion.nelbo with antithetic times, as the PyTorch peer) or count (diffusion.nelbo_by_count, lower variance)")
  p.add_argument("--causal", action="store_true", default=None,
                 help="train the autoregressive twin instead: the same network, causal attention, next-token NLL")
  p.add_argument("--windows", choices=WINDOWS, help="training windows: stories (default: half start at a story, after its EOT), "
                 "padded (the same, EOT after a story's end instead of the next story) or random (anywhere in the stream)")
  p.add_argument("--weight-decay", type=float)
  p.add_argument("--grad-clip", type=positive(float), help="global gradient-norm clip (default 1.0)")
  args = p.parse_args(argv)
  args.explicit = {k for k, v in vars(args).items() if v is not None and k not in ("out", "resume")}
  return args

DEFAULTS = dict(data="tinystories", seed=1337, grad_accum=1, schedule="loglinear", weight_decay=0.0, grad_clip=1.0, time_cond=True, causal=False, estimator="plain", windows="stories")

def resolve(args, saved:dict|None=None):
  """Fill unset flags: from the run being resumed, else the preset (by backend when not given), else DEFAULTS."""
  args.preset = args.preset or (saved or {}).get("preset") or ("small" if is_cpu() else "base")
  saved = saved and {"windows": "random", **saved}  # runs from before --windows drew their windows anywhere
  for k, v in {**DEFAULTS, **PRESETS[args.preset], **TRAINING[args.preset], **(saved or {})}.items():
    if getattr(args, k, None) is None: setattr(args, k, v)
  for name in ("eval_draws", "final_draws"):
    if getattr(args, name) % 2 and not args.causal:
      raise ValueError(f"--{name.replace('_', '-')} must be even (strata are paired for the standard error), got {getattr(args, name)}")
  if args.causal: args.time_cond = False  # the twin has no noise level to read
  args.wanted_dtype, args.dtype = args.dtype, supported_dtype(args.dtype)
  return check_size(args)

def learning_rate(step:int, args) -> float:
  # linear warm-up, then cosine decay to 10% of the peak
  return args.lr * min(1, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, step / args.steps))))

def batch(tokens, stories, keep, args, rng):
  """A step's data and all its randomness, drawn from one numpy generator so that a resumed run repeats it exactly."""
  B, T, A = args.batch_size, args.seq_len + args.causal, args.grad_accum  # the twin predicts each token from the ones before
  x0 = vocab.to_compact(train_batch(tokens, A * B, T, rng, args.windows, stories), keep).reshape(A, B, T)
  return x0, rng.random((A, 1), dtype=np.float32), rng.random((A, B, T), dtype=np.float32)

def make_evaluate(model, val, keep, args, mask_id, draws:int):
  """Validation NELBO and its standard error over fixed windows with fixed draws: the same weights always give the same
  numbers. MDLM: each window is scored at `draws` mask counts, one from each of as many equal slices of 1..L, and the
  error is that of these draws. The autoregressive twin: the exact NLL of the same text, with no error to report.
  The batches are shared out over the train step's devices, on copies of `model` refreshed at every call."""
  L, K, B, rng = args.seq_len, 1 if args.causal else draws, args.batch_size, np.random.default_rng(0)
  windows = vocab.to_compact(val_windows(val, L + args.causal, args.eval_windows), keep)
  N = len(windows)
  k = 1 + np.floor(L * (np.arange(K) + rng.random((N, 1))) / K).astype(np.int32)  # (N, K) mask counts, stratified
  u = rng.random((N * K, L), dtype=np.float32)
  rows = np.arange(-(-N * K // B) * B).reshape(-1, B) % (N * K)  # whole batches: the last one wraps around to the first rows
  copies = replicas(model, devices(B, args.devices))
  def scorer(m) -> TinyJit:
    if args.causal: return TinyJit(lambda x0, k, u: diffusion.ar_nll(m, x0).realize())
    return TinyJit(lambda x0, k, u: diffusion.nelbo_by_count(m, x0, k, u, mask_id, args.schedule).realize())
  scorers, n, pool = [scorer(m) for m, _ in copies], len(copies), ThreadPoolExecutor(len(copies))
  def run(d:int) -> list[np.ndarray]:
    device = copies[d][1][0].device
    return [scorers[d](*(Tensor(a, device=device) for a in (windows[i // K], k.reshape(-1)[i], u[i]))).numpy() for i in rows[d::n]]
  def evaluate() -> tuple[float, float]:
    for _, ps in copies[1:]:
      for c, p in zip(ps, copies[0][1]): c.assign(p.to(c.device)).realize()
    parts = list(pool.map(run, range(n))) if scorers[0].cnt >= 2 else [run(d) for d in range(n)]  # the first call captures
    e = np.concatenate([parts[i % n][i // n] for i in range(len(rows))])[:N * K]
    return (float(e.mean()), 0.0) if args.causal else diffusion.stratified_mean(e.reshape(N, K).tolist())
  return evaluate

def unconditional_sample(model, cfg, keep, windows, steps=64) -> str:
  x, first = np.full((1, cfg.seq_len), cfg.mask_id, np.int32), int(cfg.causal or windows != "random")
  if first: x[0, 0] = vocab.eot(keep)  # a story starts after an end of text, as the model was trained
  states = diffusion.sample_ar(model, Tensor(x), cfg.mask_id) if cfg.causal else diffusion.sample(model, Tensor(x), cfg.mask_id, steps, cache=not cfg.time_cond)
  for xs, _, _ in states: pass
  return vocab.decode(xs.numpy()[0][first:], keep)

def learning_curve(log_path:str, svg_path:str):
  """log.jsonl as an SVG (no plotting library): training loss, smoothed, and validation NELBO in nats/token by step."""
  rows = [json.loads(line) for line in open(log_path)]
  train, val, avg = [], [(r["step"], r["val_nelbo"]) for r in rows if r["val_nelbo"] is not None], rows[0]["train_loss"]
  for r in rows: avg = 0.95 * avg + 0.05 * r["train_loss"]; train.append((r["step"], avg))
  (W, H, m), ys = (640, 320, 48), [y for _, y in train + val]
  X = lambda s: m + (W - 2 * m) * s / rows[-1]["step"]
  Y = lambda y: H - m - (H - 2 * m) * (y - min(ys)) / ((max(ys) - min(ys)) or 1)
  path = lambda pts: " ".join(f"{X(s):.1f},{Y(y):.1f}" for s, y in pts)
  svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/><path d="M{m},{m}V{H - m}H{W - m}" fill="none" stroke="#444"/>',
         f'<text x="4" y="{Y(max(ys)) + 4:.0f}">{max(ys):.2f}</text><text x="4" y="{Y(min(ys)) + 4:.0f}">{min(ys):.2f}</text>',
         f'<text x="{W - m}" y="{H - m + 16}" text-anchor="end">step {rows[-1]["step"]}</text><text x="{m}" y="{m - 8}">nats/token</text>',
         f'<polyline points="{path(train)}" fill="none" stroke="#999"/><text x="{W - m}" y="{m}" text-anchor="end" fill="#999">train loss (smoothed)</text>',
         f'<polyline points="{path(val)}" fill="none" stroke="#c33" stroke-width="2"/><text x="{W - m}" y="{m + 16}" text-anchor="end" fill="#c33">validation NELBO</text>',
         "</svg>"]
  with open(svg_path, "w") as f: f.write("\n".join(svg))

def state(model, ema, opt, keep) -> dict[str, Tensor]:
  tensors = {f"model.{k}": v for k, v in parameters(model).items()}
  if ema: tensors.update({f"ema.{k}": v for k, v in parameters(ema).items()})
  tensors.update({f"opt.m.{i}": m for i, m in enumerate(opt.m)} | {f"opt.v.{i}": v for i, v in enumerate(opt.v)})
  tensors.update({"opt.b1_t": opt.b1_t, "opt.b2_t": opt.b2_t})
  if keep is not None: tensors["vocab.keep"] = Tensor(np.asarray(keep, np.int32))
  return tensors

def check_resumable(meta, args, keep):
  """A checkpoint continues only the run that wrote it: same architecture, same vocabulary."""
  for k in ARCH:
    if getattr(args, k) != meta["args"][k]:
      raise DataError(f"the checkpoint in {args.out} has {k}={meta['args'][k]}, but you asked for {getattr(args, k)}: "
                      f"drop --{k.replace('_', '-')} to resume it, or use another --out for a new run")
  if meta["vocab_keep"] != (None if keep is None else [int(i) for i in keep]):
    raise DataError(f"the checkpoint in {args.out} was trained on a different vocabulary (data {meta['args']['data']!r}): "
                    f"resume with the same --data, or use another --out")

def main(argv=None):
  args = parse_args(argv)
  prefer_cpu_backend()
  ckpt_path, log_path = os.path.join(args.out, "ckpt.safetensors"), os.path.join(args.out, "log.jsonl")
  try:
    tensors, meta = (None, None)
    if args.resume: tensors, meta = load_checkpoint(ckpt_path)
    elif os.path.exists(ckpt_path): raise DataError(f"{ckpt_path} already exists: pass --resume to continue it, or --out DIR for a new run")
    resolve(args, meta and meta["args"])
    ds = prepare.load(args.data, explicit="data" in args.explicit)
    keep = vocab.top_k(prepare.train_counts(ds["meta"]), args.vocab_size)
    if meta: check_resumable(meta, args, keep)
  except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")

  cfg = Config(vocab_size=vocab.n_tokens(keep), seq_len=args.seq_len, dim=args.dim, n_layers=args.n_layers,
               n_heads=args.n_heads, time_cond=args.time_cond, causal=args.causal)
  Tensor.manual_seed(args.seed)
  model = Denoiser(cfg, dtype=args.dtype)
  ema = Denoiser(cfg, dtype=args.dtype) if args.ema > 0 else None
  opt = nn.optim.AdamW(list(parameters(model).values()), lr=args.lr, b1=0.9, b2=0.95, weight_decay=args.weight_decay)
  if ema:
    for e, p in zip(parameters(ema).values(), parameters(model).values()): e.assign(p.detach()).realize()
  step, rng, elapsed, tokens_seen = 0, np.random.default_rng(args.seed), 0.0, 0
  stories = None if args.windows == "random" else story_starts(ds["train"], args.seq_len + args.causal)
  if stories is not None and len(stories) < args.batch_size and "windows" not in args.explicit and not meta:
    args.windows, stories = "random", None  # one long text (a book): no stories to align windows with
  if meta:
    for k, v in state(model, ema, opt, keep).items():
      if k not in tensors or tensors[k].shape != v.shape: sys.exit(f"error: {ckpt_path} lacks {k} or has another shape: it was not written by this train.py")
      v.assign(tensors[k].cast(v.dtype)).realize()
    step, elapsed, tokens_seen = meta["step"], meta["elapsed_s"], meta["tokens"]
    rng.bit_generator.state = meta["rng"]
    with open(log_path) as f: kept = [l for l in f if json.loads(l)["step"] <= step]  # drop lines past the checkpoint
    with open(log_path + ".tmp", "w") as f: f.writelines(kept)
    os.replace(log_path + ".tmp", log_path)
  os.makedirs(args.out, exist_ok=True)

  tok_per_step = args.batch_size * args.seq_len * args.grad_accum
  devs = devices(args.batch_size, args.devices)
  print(f"device {', '.join(map(device_name, devs))} | preset {args.preset} | data {ds['name']} ({len(ds['train']):,} train tokens) | "
        f"{n_params(model) / 1e6:.2f}M parameters | vocab {cfg.vocab_size} | {args.windows} windows | {tok_per_step:,} tokens/step | {args.dtype}"
        + (f" (the device has no {args.wanted_dtype})" if args.dtype != args.wanted_dtype else "")
        + (" | autoregressive twin (--causal)" if args.causal else ""))
  train_step = diffusion.train_step(replicas(model, devs), opt, cfg.mask_id, args.schedule, args.grad_clip,
                                    ema and list(parameters(ema).values()), "ar" if args.causal else args.estimator)
  evaluate = make_evaluate(ema or model, ds["val"], keep, args, cfg.mask_id, args.eval_draws)
  final = make_evaluate(ema or model, ds["val"], keep, args, cfg.mask_id, args.final_draws)

  def checkpoint():
    save_checkpoint(ckpt_path, state(model, ema, opt, keep), {
      "config": config_dict(cfg), "step": step, "tokens": tokens_seen, "elapsed_s": elapsed, "rng": rng.bit_generator.state,
      "vocab_keep": None if keep is None else [int(i) for i in keep],
      "args": {k: v for k, v in vars(args).items() if k not in ("explicit", "resume", "out", "wanted_dtype")}})

  stop = []
  def on_sigint(*_):
    if stop: raise KeyboardInterrupt
    stop.append(True); print("\nstopping after this step (Ctrl-C again to abort without saving)", flush=True)
  signal.signal(signal.SIGINT, on_sigint)

  log, tty, timed, timed_s = open(log_path, "a"), sys.stdout.isatty(), 0, 0.0
  while step < args.steps and not stop:
    opt.lr.assign(Tensor([learning_rate(step, args)], dtype=opt.lr.dtype)).realize()
    data = batch(ds["train"], stories, keep, args, rng)
    t0 = time.perf_counter()
    loss = train_step(*data, ema_decay=min(args.ema, (1 + step) / (10 + step))).item()  # a young average follows the model
    dt = time.perf_counter() - t0
    if not math.isfinite(loss):
      sys.exit(f"\nerror: the loss became {loss} at step {step + 1}; {ckpt_path} still holds the last good checkpoint "
               f"(lower --lr, or raise --warmup, and --resume)")
    step, elapsed, tokens_seen = step + 1, elapsed + dt, tokens_seen + tok_per_step
    if step > 2 or args.resume: timed, timed_s = timed + tok_per_step, timed_s + dt  # the first steps compile kernels
    tok_s = timed / timed_s if timed_s else 0.0
    row = {"step": step, "tokens": tokens_seen, "train_loss": round(loss, 4), "val_nelbo": None, "val_nelbo_se": None, "val_ppl": None, "eval_s": None,
           "lr": learning_rate(step - 1, args), "tok_per_s": round(tok_s, 1), "elapsed_s": round(elapsed, 2)}
    eta = (args.steps - step) * tok_per_step / tok_s if tok_s else 0
    line = f"step {step}/{args.steps} | loss {loss:.4f} | lr {row['lr']:.2e} | {tok_s:,.0f} tok/s | ETA {eta // 60:.0f}m{eta % 60:02.0f}s"
    if tty: print("\r" + line, end="", flush=True)
    elif step % 10 == 0 or step == 1: print(line, flush=True)
    if step % args.eval_every == 0 or step == args.steps:
      t_eval = time.perf_counter()
      nelbo, se = (final if step == args.steps else evaluate)()
      row.update(val_nelbo=round(nelbo, 4), val_nelbo_se=round(se, 4), val_ppl=round(math.exp(nelbo), 2), eval_s=round(time.perf_counter() - t_eval, 2))
      print(f"\nstep {step}: val " + (f"NLL {nelbo:.4f} nats/token, perplexity {row['val_ppl']:.2f}" if args.causal else
            f"NELBO {nelbo:.4f} ± {se:.4f} nats/token, perplexity <= {row['val_ppl']:.2f}") + f" ({row['eval_s']:.0f} s)"
            f"\n  sample: {unconditional_sample(ema or model, cfg, keep, args.windows)!r}", flush=True)
    log.write(json.dumps(row) + "\n"); log.flush()
    if row["val_nelbo"] is not None: checkpoint(); learning_curve(log_path, os.path.join(args.out, "curve.svg"))
  if stop: checkpoint()
  print(f"\n{'interrupted: ' if stop else ''}checkpoint at step {step} in {ckpt_path}" + (" (continue with --resume)" if stop else ""))
  if stop: sys.exit(130)

if __name__ == "__main__": main()
