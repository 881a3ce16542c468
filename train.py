"""Train a masked diffusion language model on TinyStories (or your own text) with tinygrad.

  python train.py                          # a preset for this machine's backend, TinyStories (or the bundled sample)
  python train.py --preset tiny --data sample --steps 50 --out out/tiny
  python train.py --resume                 # continue out/ckpt.safetensors exactly where it stopped

tinygrad picks the backend (DEV=CPU, DEV=CUDA, DEV=METAL, ...); BEAM= and DEBUG= work as usual."""
import argparse, json, math, os, signal, sys, time
import numpy as np
from tinygrad import Tensor, TinyJit, nn
import checkpoint, devices, diffusion
from data import DataError, batches, prepare, vocab
from display import line_plot
from model import Config, Denoiser, n_params, parameters
from settings import PRESETS, add_size_flags, by_preset, check_size, fill, fraction, number, positive

# settings no preset chooses (a flag each; a resumed run keeps its own)
DEFAULTS = dict(data="tinystories", seed=1337, grad_accum=1, schedule="loglinear", weight_decay=0.0, grad_clip=1.0,
                time_cond=True, causal=False, estimator="plain", windows="stories")
ARCH = ("dim", "n_layers", "n_heads", "seq_len", "vocab_size", "time_cond", "causal")  # a resumed run may not change

def parse_args(argv=None) -> argparse.Namespace:
  """Flags left out are None here; `resolve` fills them from the checkpoint being resumed, the preset, or DEFAULTS."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__[__doc__.index("\n"):])
  d = lambda key: f"default {DEFAULTS[key]}"
  p.add_argument("--data", help="sample (bundled), tinystories (falls back to sample offline) or a UTF-8 text file; "
                 f"{d('data')}")
  p.add_argument("--out", default="out", help="directory for ckpt.safetensors and log.jsonl; default out")
  p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
  p.add_argument("--seed", type=number(int, 0), help=d("seed"))
  add_size_flags(p)
  for key, kind, what in [("steps", positive(), "optimizer steps"), ("lr", positive(float), "peak learning rate"),
                          ("warmup", positive(), "steps of linear warm-up"),
                          ("eval_every", positive(), "steps between evaluations"),
                          ("eval_windows", positive(), "validation windows"),
                          ("eval_len", positive(), "tokens per validation window")]:
    p.add_argument("--" + key.replace("_", "-"), type=kind, help=f"{what}; {by_preset(key)}")
  p.add_argument("--eval-draws", type=positive(),
                 help=f"mask counts per validation window at each evaluation (even); {by_preset('eval_draws')}")
  p.add_argument("--final-draws", type=positive(),
                 help=f"the same for the last evaluation, the run's figure; {by_preset('final_draws')}")
  p.add_argument("--ema", type=fraction,
                 help=f"decay of the weight average used for evaluation and sampling, 0: off; {by_preset('ema')}")
  p.add_argument("--grad-accum", type=positive(), help=f"micro-batches per optimizer step; {d('grad_accum')}")
  p.add_argument("--schedule", choices=diffusion.SCHEDULES, help=f"noise schedule for training; {d('schedule')}")
  p.add_argument("--estimator", choices=["plain", "count"], help="how each step estimates the NELBO: plain "
                 "(diffusion.nelbo with antithetic times, as the PyTorch peer) or count (diffusion.nelbo_by_count, "
                 "lower variance); " + d("estimator"))
  p.add_argument("--causal", action="store_true", default=None, help="train the autoregressive twin instead: the same "
                 "network, causal attention, next-token NLL")
  p.add_argument("--windows", choices=batches.WINDOWS, help="training windows: stories (half start at a story, after "
                 "its EOT), padded (the same, EOT after a story's end instead of the next story) or random (anywhere "
                 f"in the stream); {d('windows')}")
  p.add_argument("--weight-decay", type=number(float, 0), help=f"AdamW's; {d('weight_decay')}")
  p.add_argument("--grad-clip", type=positive(float), help=f"global gradient-norm clip; {d('grad_clip')}")
  args = p.parse_args(argv)
  args.explicit = {k for k, v in vars(args).items() if v is not None and k not in ("out", "resume")}
  return args

def resolve(args, saved:dict|None=None) -> argparse.Namespace:
  """Fill unset flags: from the run being resumed, else the preset (by backend when not given), else DEFAULTS."""
  args.preset = args.preset or (saved or {}).get("preset") or ("small" if devices.is_cpu() else "base")
  saved = saved and {**saved, "windows": batches.windows_of(saved)}
  fill(args, saved or {}, PRESETS[args.preset], DEFAULTS)
  for key in ("eval_draws", "final_draws"):
    if getattr(args, key) % 2 and not args.causal:
      raise ValueError(f"--{key.replace('_', '-')} must be even (strata are paired for the standard error), "
                       f"got {getattr(args, key)}")
  if args.causal: args.time_cond = False  # the twin has no noise level to read
  args.wanted_dtype, args.dtype = args.dtype, devices.supported_dtype(args.dtype)
  return check_size(args)

def learning_rate(step:int, args) -> float:
  # linear warm-up, then cosine decay to 10% of the peak
  return args.lr * min(1, (step + 1) / args.warmup) * \
    (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, step / args.steps))))

def batch(tokens, stories, keep, args, rng):
  """A step's data and all its randomness, drawn from one numpy generator so that a resumed run repeats it exactly:
  windows (A, B, T), a time offset per micro-batch (A, 1), a mask uniform per token (A, B, T)."""
  B, T, A = args.batch_size, args.seq_len + args.causal, args.grad_accum  # the twin predicts a token from those before
  x0 = vocab.to_compact(batches.train_batch(tokens, A * B, T, rng, args.windows, stories), keep).reshape(A, B, T)
  return x0, rng.random((A, 1), dtype=np.float32), rng.random((A, B, T), dtype=np.float32)

def objective(args, mask_id:int):
  """The loss of one device's rows (first, first + b) of a micro-batch of `total` rows, for devices.train_step."""
  def loss(model, x0, u_t, u_mask, rows:tuple[int, int]) -> Tensor:
    (first, total), b, L = rows, x0.shape[0], x0.shape[1]
    if args.causal: return diffusion.ar_nll(model, x0).mean()
    if args.estimator == "count":
      k = diffusion.mask_counts(total, L, u_t)[first:first + b]
      return diffusion.nelbo_by_count(model, x0, k, u_mask, mask_id, args.schedule).mean()
    t = diffusion.antithetic_times(total, u_t)[first:first + b]
    return diffusion.nelbo(model, x0, t, mask_id, args.schedule, u_mask)
  return loss

def make_evaluate(reps, val, keep, args, mask_id:int, draws:int):
  """Validation NELBO and its standard error over fixed windows with fixed draws: the same weights always give the same
  numbers. MDLM: each window is scored at `draws` mask counts, one from each of as many equal slices of 1..L, and the
  error is that of these draws. The autoregressive twin: the exact NLL of the same text, with no error to report.
  The batches are shared out over the devices of `reps` (devices.replicas of the model), refreshed at every call."""
  L, K, B, rng = args.eval_len, 1 if args.causal else draws, args.batch_size, np.random.default_rng(0)
  windows = vocab.to_compact(batches.val_windows(val, L + args.causal, args.eval_windows), keep)
  N = len(windows)
  k = 1 + np.floor(L * (np.arange(K) + rng.random((N, 1))) / K).astype(np.int32)  # (N, K) mask counts, stratified
  u = rng.random((N * K, L), dtype=np.float32)
  rows = np.arange(-(-N * K // B) * B).reshape(-1, B) % (N * K)  # whole batches: the last one wraps to the first rows
  def scorer(m) -> TinyJit:
    if args.causal: return TinyJit(lambda x0, k, u: diffusion.ar_nll(m, x0).realize())
    return TinyJit(lambda x0, k, u: diffusion.nelbo_by_count(m, x0, k, u, mask_id, args.schedule).realize())
  scorers, n = [scorer(m) for m, _ in reps], len(reps)
  def run(d:int) -> list[np.ndarray]:
    device = reps[d][1][0].device
    return [scorers[d](*(Tensor(a, device=device) for a in (windows[i // K], k.reshape(-1)[i], u[i]))).numpy()
            for i in rows[d::n]]
  def evaluate() -> tuple[float, float]:
    devices.copy_weights(reps)
    parts = devices.on_devices([lambda d=d: run(d) for d in range(n)], scorers)
    e = np.concatenate([parts[i % n][i // n] for i in range(len(rows))])[:N * K]
    return (float(e.mean()), 0.0) if args.causal else diffusion.stratified_mean(e.reshape(N, K).tolist())
  return evaluate

def unconditional_sample(model, cfg:Config, keep, args, steps:int=64) -> str:
  x, first = np.full((1, cfg.seq_len), cfg.mask_id, np.int32), int(batches.reads_after_eot(vars(args)))
  if first: x[0, 0] = vocab.eot(keep)  # a story starts after an end of text, as the model was trained
  if cfg.causal: states = diffusion.sample_ar(model, Tensor(x), cfg.mask_id)
  else: states = diffusion.sample(model, Tensor(x), cfg.mask_id, steps, cache=not cfg.time_cond)
  for xs, _, _ in states: pass
  return vocab.decode(xs.numpy()[0][first:], keep)

def learning_curve(log_path:str, svg_path:str):
  """log.jsonl as an SVG: training loss, smoothed, and validation NELBO in nats/token by step."""
  rows = [json.loads(line) for line in open(log_path)]
  train, val, avg = [], [(r["step"], r["val_nelbo"]) for r in rows if r["val_nelbo"] is not None], rows[0]["train_loss"]
  for r in rows: avg = 0.95 * avg + 0.05 * r["train_loss"]; train.append((r["step"], avg))
  line_plot(svg_path, [("train loss (smoothed)", train, "#999", 1), ("validation NELBO", val, "#c33", 2)],
            f"step {rows[-1]['step']}", "nats/token")

def state(model, ema, opt, keep) -> dict[str, Tensor]:
  """Everything a checkpoint holds to resume exactly: weights, the average, Adam's moments, the vocabulary."""
  tensors = {f"model.{k}": v for k, v in parameters(model).items()}
  if ema: tensors.update({f"ema.{k}": v for k, v in parameters(ema).items()})
  tensors.update({f"opt.m.{i}": m for i, m in enumerate(opt.m)} | {f"opt.v.{i}": v for i, v in enumerate(opt.v)})
  tensors.update({"opt.b1_t": opt.b1_t, "opt.b2_t": opt.b2_t})
  if keep is not None: tensors["vocab.keep"] = Tensor(np.asarray(keep, np.int32))
  return tensors

def check_resumable(meta, args, keep) -> list[str]:
  """A checkpoint continues only the run that wrote it: same architecture, vocabulary, preset and random state. Every
  other flag given at --resume is applied: returns them, as '--lr 0.0005 (was 0.001)'."""
  saved = meta["args"]
  for k in ARCH + ("preset",):
    if getattr(args, k) != saved.get(k, getattr(args, k)):
      raise DataError(f"the checkpoint in {args.out} has {k}={saved[k]}, but you asked for {getattr(args, k)}: "
                      f"drop --{k.replace('_', '-')} to resume it, or use another --out for a new run")
  if meta["vocab_keep"] != (None if keep is None else [int(i) for i in keep]):
    raise DataError(f"the checkpoint in {args.out} was trained on a different vocabulary (data {saved['data']!r}): "
                    f"resume with the same --data, or use another --out")
  changed = [k for k in sorted(args.explicit) if k in saved and getattr(args, k) != saved[k]]
  if "seed" in changed:
    raise DataError("--seed does nothing at --resume (the random state continues from the checkpoint): drop it")
  if "ema" in changed and (args.ema > 0) != (saved["ema"] > 0):
    raise DataError(f"the run in {args.out} was trained {'with' if saved['ema'] > 0 else 'without'} a weight average: "
                    "--ema can change its decay at --resume, not turn it on or off")
  return [f"--{k.replace('_', '-')} {getattr(args, k)} (was {saved[k]})" for k in changed]

def check_enough(ds, args):
  """The data must fill a training window and a validation window; say how much text that is, for this preset."""
  need = args.seq_len + args.causal
  if len(ds["train"]) < need or len(ds["val"]) < args.eval_len + args.causal:
    total = 20 * need  # a file of one's own: its last 5% is held out for validation
    raise DataError(f"--data {args.data} gives {len(ds['train']):,} training and {len(ds['val']):,} validation tokens, "
                    f"too few for windows of {need} tokens (preset {args.preset}): give it at least {total:,} tokens, "
                    f"about {total * 4 // 1000 + 1} KB of English text, or lower --seq-len")

def setup(args, ckpt_path:str, log_path:str):
  """The checkpoint to resume (with --resume), the settings, the data and its vocabulary, checked before any work:
  one-line errors. A fresh run's directory must hold no checkpoint; a log without one is set aside, not mixed with."""
  try:
    checkpoint.lock(args.out)
    tensors, meta = (None, None)
    if args.resume:
      tensors, meta = checkpoint.load(ckpt_path, f"nothing to resume in {args.out}: start without --resume")
    elif os.path.exists(ckpt_path):
      raise DataError(f"{ckpt_path} already exists: pass --resume to continue it, or --out DIR for a new run")
    resolve(args, meta and meta["args"])
    ds = prepare.load(args.data, explicit="data" in args.explicit)
    if ds["name"] == "sample" and args.data == "tinystories": args.data = "sample"  # offline: record what it trains on
    check_enough(ds, args)
    keep = vocab.top_k(prepare.train_counts(ds["meta"]), args.vocab_size)
    applied = check_resumable(meta, args, keep) if meta else []
  except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")
  if applied: print(f"resuming step {meta['step']} with " + ", ".join(applied))
  if not meta and (old := checkpoint.set_aside(log_path)):
    print(f"{log_path} was left by a run that wrote no checkpoint: moved to {old}")
  return tensors, meta, ds, keep

def restore(tensors, meta, model, ema, opt, keep, args, ckpt_path:str,
            log_path:str) -> tuple[int, np.random.Generator, float, int]:
  """(step, data generator, seconds trained, tokens seen): from the checkpoint being resumed, else those of a new run.
  The log keeps exactly the steps the checkpoint holds: lines past it (steps the checkpoint lost) and a line cut by
  a crash are dropped, and said."""
  rng = np.random.default_rng(args.seed)
  if not meta: return 0, rng, 0.0, 0
  try: checkpoint.restore(state(model, ema, opt, keep), tensors, ckpt_path)
  except ValueError as e: sys.exit(f"error: {e}")
  rng.bit_generator.state = meta["rng"]
  rows, bad = checkpoint.read_log(log_path) if os.path.exists(log_path) else ([], 0)
  kept = [r for r in rows if r.get("step", math.inf) <= meta["step"]]
  checkpoint.write_log(log_path, kept)
  if bad or len(kept) < len(rows) or len(kept) < meta["step"]:
    print(f"{log_path}: kept steps {kept[0]['step'] if kept else '-'}..{kept[-1]['step'] if kept else '-'} of the "
          f"checkpoint's {meta['step']}" + (f", dropped {bad} damaged line(s)" if bad else "") +
          (f", dropped {len(rows) - len(kept)} line(s) past the checkpoint" if len(kept) < len(rows) else ""))
  return meta["step"], rng, meta["elapsed_s"], meta["tokens"]

def main(argv=None):
  args = parse_args(argv)
  devices.choose()
  ckpt_path, log_path = os.path.join(args.out, "ckpt.safetensors"), os.path.join(args.out, "log.jsonl")
  tensors, meta, ds, keep = setup(args, ckpt_path, log_path)

  # the network, its weight average, the optimizer; the run's state from the checkpoint when resuming
  cfg = Config(n_tokens=vocab.n_tokens(keep), seq_len=args.seq_len, dim=args.dim, n_layers=args.n_layers,
               n_heads=args.n_heads, time_cond=args.time_cond, causal=args.causal)
  Tensor.manual_seed(args.seed)
  model = Denoiser(cfg, dtype=args.dtype)
  ema = Denoiser(cfg, dtype=args.dtype) if args.ema > 0 else None
  opt = nn.optim.AdamW(list(parameters(model).values()), lr=args.lr, b1=0.9, b2=0.95, weight_decay=args.weight_decay)
  if ema: Tensor.realize(*[e.assign(p.detach()) for e, p in zip(parameters(ema).values(), parameters(model).values())])
  stories = None if args.windows == "random" else batches.story_starts(ds["train"], args.seq_len + args.causal)
  if stories is not None and len(stories) < args.batch_size and "windows" not in args.explicit and not meta:
    args.windows, stories = "random", None  # one long text (a book): no stories to align windows with
  step, rng, elapsed, tokens_seen = restore(tensors, meta, model, ema, opt, keep, args, ckpt_path, log_path)
  last_eval = meta.get("val") if meta else None

  tok_per_step = args.batch_size * args.seq_len * args.grad_accum
  devs = devices.for_batch(args.batch_size, args.devices)
  print(f"device {', '.join(map(devices.name, devs))} | preset {args.preset} | data {ds['name']} "
        f"({len(ds['train']):,} train tokens) | {n_params(model) / 1e6:.2f}M parameters | vocab {cfg.n_tokens} | "
        f"{args.windows} windows | {tok_per_step:,} tokens/step | {args.dtype}"
        + (f" (the device has no {args.wanted_dtype})" if args.dtype != args.wanted_dtype else "")
        + (" | autoregressive twin (--causal)" if args.causal else ""))
  first_eval = min(args.steps, (step // args.eval_every + 1) * args.eval_every)
  print(f"step {step + 1} compiles the step's kernels first (once: ~30-60 s on a CPU, less when tinygrad has them "
        f"cached); validation, a sample and a checkpoint every {args.eval_every} steps, the first at step {first_eval}",
        flush=True)
  train_step = devices.train_step(devices.replicas(model, devs), opt, objective(args, cfg.mask_id), args.grad_clip,
                                  ema and list(parameters(ema).values()))
  eval_copies = devices.replicas(ema or model, devs)
  evaluate = make_evaluate(eval_copies, ds["val"], keep, args, cfg.mask_id, args.eval_draws)
  final = make_evaluate(eval_copies, ds["val"], keep, args, cfg.mask_id, args.final_draws)

  def save():
    checkpoint.save(ckpt_path, state(model, ema, opt, keep), {
      "config": checkpoint.config_dict(cfg), "step": step, "tokens": tokens_seen, "elapsed_s": elapsed,
      "rng": rng.bit_generator.state, "vocab_keep": None if keep is None else [int(i) for i in keep], "val": last_eval,
      "args": {k: v for k, v in vars(args).items() if k not in ("explicit", "resume", "out", "wanted_dtype")}})

  stop = []
  def on_sigint(*_):
    if stop: raise KeyboardInterrupt
    stop.append(True); print("\nstopping after this step (Ctrl-C again to abort without saving)", flush=True)
  signal.signal(signal.SIGINT, on_sigint); signal.signal(signal.SIGTERM, on_sigint)  # kill, timeout: save as Ctrl-C

  # the loop: a step, a line of progress, and at every evaluation a checkpoint
  log, tty, done_here, timed, timed_s = open(log_path, "a"), sys.stdout.isatty(), 0, 0, 0.0
  while step < args.steps and not stop:
    opt.lr.assign(Tensor([learning_rate(step, args)], dtype=opt.lr.dtype)).realize()
    data = batch(ds["train"], stories, keep, args, rng)
    t0 = time.perf_counter()
    loss = train_step(*data, ema_decay=min(args.ema, (1 + step) / (10 + step))).item()  # a new average tracks the model
    dt = time.perf_counter() - t0
    if not math.isfinite(loss):
      saved = checkpoint_step(ckpt_path)
      on_disk = f"{ckpt_path} holds step {saved}, the last good checkpoint" if saved else \
                f"no checkpoint was written yet (the first comes at step {min(args.steps, args.eval_every)})"
      if tty: print()
      sys.exit(f"error: the loss became {loss} at step {step + 1}; {on_disk}: lower --lr or raise --warmup, and "
               + ("--resume" if saved else "start again"))
    step, elapsed, tokens_seen, done_here = step + 1, elapsed + dt, tokens_seen + tok_per_step, done_here + 1
    if done_here > 2: timed, timed_s = timed + tok_per_step, timed_s + dt  # a process's first two steps compile kernels
    tok_s = timed / timed_s if timed_s else 0.0
    row = {"step": step, "tokens": tokens_seen, "train_loss": round(loss, 4), "val_nelbo": None, "val_nelbo_se": None,
           "val_ppl": None, "eval_s": None, "lr": learning_rate(step - 1, args), "tok_per_s": round(tok_s, 1),
           "elapsed_s": round(elapsed, 2)}
    eta = (args.steps - step) * tok_per_step / tok_s if tok_s else 0
    speed = f"{tok_s:,.0f} tok/s | ETA {eta // 60:.0f}m{eta % 60:02.0f}s" if tok_s else \
            f"compiling: {dt:.0f} s (speed and ETA from step {step - done_here + 3})"
    line = f"step {step}/{args.steps} | loss {loss:.4f} | lr {row['lr']:.2e} | {speed}"
    if tty: print("\r" + line + " " * 8, end="", flush=True)
    elif step % 10 == 0 or done_here <= 3: print(line, flush=True)
    if step % args.eval_every == 0 or step == args.steps:
      if tty: print(f"\nstep {step}: evaluating...", end="", flush=True)
      t_eval = time.perf_counter()
      nelbo, se = (final if step == args.steps else evaluate)()
      last_eval = {"step": step, "nelbo": round(nelbo, 4), "se": round(se, 4)}
      row.update(val_nelbo=round(nelbo, 4), val_nelbo_se=round(se, 4), val_ppl=round(math.exp(nelbo), 2),
                 eval_s=round(time.perf_counter() - t_eval, 2))
      print(f"\r\033[K" if tty else "\n", end="")
      print(f"step {step}: val " + (f"NLL {nelbo:.4f} nats/token, perplexity {row['val_ppl']:.2f}" if args.causal else
            f"NELBO {nelbo:.4f} ± {se:.4f} nats/token, perplexity <= {row['val_ppl']:.2f}")
            + f" ({row['eval_s']:.0f} s)" f"\n  sample: {unconditional_sample(ema or model, cfg, keep, args)!r}",
            flush=True)
    log.write(json.dumps(row) + "\n"); log.flush()
    if row["val_nelbo"] is not None: save(); learning_curve(log_path, os.path.join(args.out, "curve.svg"))
  if stop: save()
  print(f"\n{'interrupted: ' if stop else ''}checkpoint at step {step} in {ckpt_path}"
        + (" (continue with --resume)" if stop else ""))
  if stop: sys.exit(130)

def checkpoint_step(path:str) -> int|None:
  """The step of the checkpoint on disk, or None if there is none (or it cannot be read)."""
  try: return checkpoint.load(path)[1]["step"]
  except (ValueError, FileNotFoundError): return None

if __name__ == "__main__": main()
