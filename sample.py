"""Generate text with a trained masked diffusion LM, and watch it condense out of masks.

  python sample.py --visualize                          # animate the reverse process in the terminal
  python sample.py --prompt "Once upon a time" --num-samples 3
  python sample.py --prompt "Tom had a [MASK*3] dog. [MASK*20] The end."   # infilling
  python sample.py --html story.html                    # a self-contained page that replays the denoising
  python sample.py --length 512                         # past the context: block by block, until the story ends
  python sample.py --race out/ar/ckpt.safetensors --html race.html   # diffusion and left-to-right, side by side
  python sample.py --quality --judge out/ar/ckpt.safetensors --num-samples 32   # gen PPL, entropy, repetition, copying
  python sample.py --quality --judge out/ar/ckpt.safetensors --num-samples 8 --sweep quality.svg   # the quality table

A checkpoint of the autoregressive twin (train.py --causal) samples left to right with the same options."""
import argparse, re, sys, time
import numpy as np
from tinygrad import Tensor
import checkpoint, devices, diffusion, display, quality
from data import DataError, batches, prepare, vocab
from model import Denoiser, parameters

MARKER = re.compile(r"\[MASK(?:\*(\d+))?\]")

def load(path:str) -> tuple[Denoiser, list|None, dict]:
  """The denoiser from a train.py checkpoint (its EMA weights when it has them), its vocabulary and the run's flags."""
  tensors, meta = checkpoint.load(path)
  model = Denoiser(checkpoint.config(meta))
  prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
  checkpoint.restore({prefix + k: v for k, v in parameters(model).items()}, tensors, path)
  return model, (tensors["vocab.keep"].numpy().tolist() if "vocab.keep" in tensors else None), meta["args"]

def load_twin(path:str, keep, flag:str) -> Denoiser:
  """The autoregressive twin given as --judge or --race, on the diffusion model's vocabulary."""
  twin, twin_keep, _ = load(path)
  if not twin.cfg.causal: raise ValueError(f"--{flag} {path} is not an autoregressive twin: train one with `python train.py --causal`")
  if twin_keep != keep: raise ValueError(f"--{flag} {path} has another vocabulary than the diffusion model: train both "
                                         "on the same --data and --vocab-size")
  return twin

def template(prompt:str, keep, length:int|None, context:int, mask_id:int, start:int|None=None) -> np.ndarray:
  """Token ids with mask_id where text is to be generated. `[MASK]` is one token to fill, `[MASK*N]` N tokens; text
  outside the markers is kept verbatim. Without markers the prompt is a prefix and the rest, up to length, is generated.
  start: a token put first (the end of text that a story follows), not counted in length. The prompt must fit the
  first context; the length need not (block by block, `diffusion.sample_blocks`)."""
  if "[MASK" in MARKER.sub("", prompt): raise ValueError("malformed marker in --prompt: write [MASK] or [MASK*N] with N >= 1")
  pieces, pos = [] if start is None else [np.array([start])], 0
  for m in MARKER.finditer(prompt):
    n = int(m.group(1) or 1)
    if n < 1: raise ValueError("malformed marker in --prompt: [MASK*N] needs N >= 1")
    pieces += [vocab.encode(prompt[pos:m.start()], keep), np.full(n, mask_id)]
    pos = m.end()
  ids, n = np.concatenate(pieces + [vocab.encode(prompt[pos:], keep)]).astype(np.int32), int(start is not None)
  length = n + length if length else (len(ids) if MARKER.search(prompt) else context)
  if len(ids) > context: raise ValueError(f"the prompt is {len(ids) - n} tokens, more than the model context ({context - n}): shorten it")
  if len(ids) > length: raise ValueError(f"the prompt is {len(ids) - n} tokens, more than --length {length - n}: shorten it or raise --length")
  return np.concatenate([ids, np.full(length - len(ids), mask_id, np.int32)])

def reverse_process(model, init:np.ndarray, args, stop:int|None=None):
  """The sampler for this checkpoint: the reverse diffusion from the masks in init (block by block past the context), or
  the autoregressive twin left to right; either stops early once every sample has written `stop` (an end of text)."""
  x, cfg = Tensor(np.tile(init, (args.num_samples, 1)).astype(np.int32)), model.cfg
  if cfg.causal: return diffusion.sample_ar(model, x, cfg.mask_id, args.temperature, args.top_p, stop)
  return diffusion.sample_blocks(model, x, cfg.mask_id, args.steps, cfg.seq_len, stop, first=int(init[0] != cfg.mask_id),
                                 schedule=args.schedule, method=args.sampler, cache=not cfg.time_cond and args.sampler == "ancestral",
                                 temperature=args.temperature, top_p=args.top_p)

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__[__doc__.index("\n"):])
  p.add_argument("--ckpt", default="out/ckpt.safetensors", help="a checkpoint written by train.py; default out/ckpt.safetensors")
  p.add_argument("--num-samples", type=int, default=1, help="default 1")
  p.add_argument("--length", type=int, help="tokens per sample (default: the model's context, or the infilling template); "
                 "more than the context: written block by block, until every story has ended")
  p.add_argument("--steps", type=int, default=128, help="reverse-process steps; default 128")
  p.add_argument("--sampler", choices=["ancestral", "confidence"], default="ancestral",
                 help="default ancestral (cached automatically when the model has no time conditioning)")
  p.add_argument("--schedule", choices=diffusion.SCHEDULES, default="loglinear", help="default loglinear")
  # defaults from the quality table (BENCHMARKS.md): the lowest generative perplexity among the settings whose samples
  # are as varied as real text (token entropy, distinct 4-grams); the confidence sampler's lower perplexity comes from repeating itself
  p.add_argument("--temperature", type=float, default=0.8, help="default 0.8; 0: greedy")
  p.add_argument("--top-p", type=float, default=0.9, help="default 0.9; 1: off")
  p.add_argument("--seed", type=int, default=0, help="same seed, same device: same text; default 0")
  p.add_argument("--prompt", default="", help="a prefix, or a template with [MASK] / [MASK*N] to fill in")
  p.add_argument("--visualize", action="store_true", help="animate the reverse process (plain snapshots when not a terminal)")
  p.add_argument("--fps", type=float, default=20, help="frames per second of the animation; default 20")
  p.add_argument("--html", help="also write a self-contained HTML page replaying the denoising")
  p.add_argument("--quality", action="store_true", help="score the samples: generative perplexity under --judge, entropy, "
                 "distinct 4-grams, 8-grams copied from the training split; with held-out text as a reference row (JSON lines)")
  p.add_argument("--judge", help="an autoregressive twin's checkpoint (train.py --causal) to compute generative perplexity")
  p.add_argument("--sweep", metavar="SVG", help="with --quality: also each sampler, temperature, top-p and step count of the "
                 "quality table (quality.SWEEP), and plot generative perplexity against network evaluations into SVG")
  p.add_argument("--keep-going", action="store_true", help="show the text after a story's end of text, and write the whole --length")
  p.add_argument("--race", metavar="AR_CKPT", help="race the diffusion model against its autoregressive twin (train.py "
                 "--causal): both write side by side, one network evaluation per frame (with --html: also as a page)")
  args = p.parse_args(argv)
  for key in ("num_samples", "steps", "fps"):
    if getattr(args, key) <= 0: p.error(f"--{key.replace('_', '-')} must be > 0")
  if args.length is not None and args.length <= 0: p.error("--length must be > 0")
  if args.temperature < 0 or not 0 < args.top_p <= 1: p.error("--temperature must be >= 0 and --top-p in (0, 1]")
  if args.sweep and not args.quality: p.error("--sweep needs --quality (and --judge for generative perplexity)")
  if args.race and (args.quality or MARKER.search(args.prompt)):
    p.error("--race takes a prefix --prompt (the left-to-right side cannot fill in), and no --quality")
  return args

def setup(args):
  """The model, its vocabulary and run, the template to fill, and the judge and race twin if asked for; one-line errors."""
  try:
    model, keep, run_args = load(args.ckpt)
    cfg = model.cfg
    first = int(bool(args.race) or batches.reads_after_eot(run_args))  # then a story is what follows an end of text
    init = template(args.prompt, keep, args.length, cfg.seq_len, cfg.mask_id, vocab.eot(keep) if first else None)
    if cfg.causal and len(init) > cfg.seq_len:
      raise ValueError(f"--length {args.length} is more than the autoregressive twin's context ({cfg.seq_len - 1})")
    if (args.sweep or args.race) and cfg.causal: raise ValueError(f"{args.ckpt} is an autoregressive twin: pass the diffusion model as --ckpt")
    judge = load_twin(args.judge, keep, "judge") if args.quality and args.judge else None  # said before any sampling
    twin = load_twin(args.race, keep, "race") if args.race else None
    if twin and len(init) > twin.cfg.seq_len: raise ValueError(f"--race writes within both contexts: lower --length to {twin.cfg.seq_len - 1}")
  except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")
  return model, keep, run_args, init, first, judge, twin

def score(args, model, keep, run_args, runs, judge):
  """--quality: the figures of the samples, of held-out text and of the judge's own samples (at --temperature, --top-p)."""
  try:
    ds = prepare.load(run_args["data"], explicit=True, log=lambda *a: print(*a, file=sys.stderr))
    own = None
    if judge is not None and args.judge != args.ckpt:
      Tensor.manual_seed(args.seed)
      start = np.r_[vocab.eot(keep), np.full(judge.cfg.seq_len - 1, judge.cfg.mask_id)].astype(np.int32)
      xs, _, nfe = [*reverse_process(judge, start, args)][-1]
      own = (xs.numpy()[:, 1:], {"temperature": args.temperature, "top_p": args.top_p, "nfe": nfe})
    return quality.report(runs, judge, keep, ds, own)
  except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")

def sweep(args, model, init, first:int) -> list[tuple[np.ndarray, dict]]:
  """--quality --sweep: the same prompt through each (sampler, temperature, top-p, steps) of quality.SWEEP."""
  runs = []
  for sampler, temperature, top_p, steps in quality.SWEEP:
    a = argparse.Namespace(**{**vars(args), "sampler": sampler, "temperature": temperature, "top_p": top_p, "steps": steps})
    Tensor.manual_seed(args.seed); t0 = time.perf_counter()
    for xs, _, nfe in reverse_process(model, init, a): pass
    runs.append((xs.numpy()[:, first:], {"sampler": sampler, "temperature": temperature, "top_p": top_p, "steps": steps,
                                         "nfe": nfe, "seconds": round(time.perf_counter() - t0, 2)}))
  return runs

def main(argv=None):
  args = parse_args(argv)
  devices.prefer_cpu_backend()
  model, keep, run_args, init, first, judge, twin = setup(args)
  cfg, eot = model.cfg, vocab.eot(keep)
  if args.sweep:  # the quality table instead of one run; the judge's own samples, the reference row, at temperature 1
    runs = sweep(args, model, init, first)
    args.temperature, args.top_p = 1.0, 1.0
    return quality.plot(score(args, model, keep, run_args, runs, judge), args.sweep)

  # run each side (one, or two in a race), recording when each position was revealed; animate as it goes
  gen, stop = init == cfg.mask_id, None if args.keep_going or args.quality else eot
  if cfg.causal: args.steps = int(gen.sum())  # left to right: one step, and one network evaluation, per token
  sides = [("diffusion", model), ("autoregressive twin", twin)] if twin else [("", model)]
  t0, tty, runs = time.perf_counter(), sys.stdout.isatty(), []
  for side, m in sides:
    Tensor.manual_seed(args.seed)
    revealed_at, labels = np.where(gen, 1 << 30, -1)[None].repeat(args.num_samples, 0), ["step 0  t = 1.000  0% revealed"]
    for k, (xs, s, nfe) in enumerate(reverse_process(m, init, args, stop), start=1):
      xs = xs.numpy()
      revealed_at[(revealed_at == 1 << 30) & (xs != cfg.mask_id)] = nfe if twin else k  # the race counts frames in NFE
      block, j = divmod(k - 1, args.steps)
      labels.append((f"block {block + 1}  " if len(init) > cfg.seq_len else "") + f"step {j + 1}/{args.steps}  t = {s:.3f}  "
                    f"{round(100 * float((xs[:, gen] != cfg.mask_id).mean()) if gen.any() else 100, 1)}% revealed  NFE {nfe}")
      if args.visualize and not twin and (tty or (block == 0 and k in np.linspace(0, args.steps, 6).round()) or (block and s == 0)):
        display.show(labels[-1], [("", xs[i], revealed_at[i], k) for i in range(len(xs))], first, gen, keep, cfg.mask_id, tty, args.fps)
    runs.append((side, xs, revealed_at, nfe))
  wall = time.perf_counter() - t0

  # show: the race replayed by NFE, or the texts up to their ends; the page; the quality figures; a summary line
  ends = [[None if args.keep_going else vocab.story_end(x, ~gen, keep) for x in xs] for _, xs, _, _ in runs]
  if twin:
    total = max(nfe for *_, nfe in runs)
    labels = [f"NFE {k}: " + " · ".join(f"{side} {min(k, nfe)}{' (done)' if k >= nfe else ''}" for side, _, _, nfe in runs)
              for k in range(total + 1)]
    for k in range(1, total + 1):
      if tty or k in np.linspace(0, total, 6).round():
        display.show(labels[k], [(f"{side} ({nfe} NFE)", xs[i], ra[i], k) for side, xs, ra, nfe in runs for i in range(len(xs))],
                     first, gen, keep, cfg.mask_id, tty, args.fps)
  elif not args.visualize:
    for i, x in enumerate(xs):
      cut = "" if ends[0][i] is not None or args.keep_going or not gen[-1] else f"\n[cut: no end of text within {len(init) - first} tokens]"
      print(vocab.decode(x[first:ends[0][i]], keep) + cut + ("\n" + "-" * 40 if i < len(xs) - 1 else ""))
  if args.html:
    display.write_html(args.html, [(side, xs[i, first:], ra[i, first:], e[i] and e[i] - first)
                                   for (side, xs, ra, _), e in zip(runs, ends) for i in range(len(xs))], labels, keep)
  if args.quality:
    extra = {"sampler": "autoregressive" if cfg.causal else args.sampler, "temperature": args.temperature, "top_p": args.top_p,
             "steps": args.steps, "nfe": nfe, "seconds": round(wall, 2)}
    score(args, model, keep, run_args, [(xs[:, first:], extra)], judge)
  print(f"{args.num_samples} x {len(init) - first} tokens | " + " | ".join(f"{side + ': ' if side else ''}NFE {nfe}" for side, _, _, nfe in runs)
        + f" | {wall:.1f} s{' (with animation delays)' if args.visualize and tty else ''} | "
        f"{len(runs) * args.num_samples * gen.sum() / wall:,.0f} tokens/s", file=sys.stderr)

if __name__ == "__main__": main()
