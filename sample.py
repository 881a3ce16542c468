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
from settings import number, positive

MARKER = re.compile(r"\[MASK(?:\*(\d+))?\]")

def load(path:str, missing:str="run `python train.py` first, or pass --ckpt") -> tuple[Denoiser, list|None, dict]:
  """The denoiser from a train.py checkpoint (its weight average when it has one), its vocabulary, and the metadata
  (the run's settings, its step, its last validation figure)."""
  tensors, meta = checkpoint.load(path, missing)
  model = Denoiser(checkpoint.config(meta))
  prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
  checkpoint.restore({prefix + k: v for k, v in parameters(model).items()}, tensors, path)
  meta["averaged"] = prefix == "ema."
  return model, (tensors["vocab.keep"].numpy().tolist() if "vocab.keep" in tensors else None), meta

def describe(path:str, meta:dict) -> str:
  """What a checkpoint is, in one line: preset, step, its validation figure, averaged weights or not."""
  run, val = meta["args"], meta.get("val") or {}
  kind = "autoregressive twin" if run.get("causal") else "MDLM"
  figure = (f"val {'NLL' if run.get('causal') else 'NELBO'} {val['nelbo']:.3f} at step {val['step']}" if val
            else "no evaluation yet")
  return (f"{path}: {kind}, preset {run.get('preset')}, step {meta['step']} of {run.get('steps')}, {figure}, "
          f"{'averaged (EMA) weights' if meta['averaged'] else 'raw weights'}, data {run.get('data')}")

def load_twin(path:str, keep, flag:str) -> Denoiser:
  """The autoregressive twin given as --judge or --race, on the diffusion model's vocabulary."""
  twin, twin_keep, _ = load(path, "train one with `python train.py --causal --out DIR` and pass DIR/ckpt.safetensors")
  if not twin.cfg.causal:
    raise ValueError(f"--{flag} {path} is not an autoregressive twin: train one with `python train.py --causal`")
  if twin_keep != keep: raise ValueError(f"--{flag} {path} has another vocabulary than the diffusion model: train both "
                                         "on the same --data and --vocab-size")
  return twin

def template(prompt:str, keep, length:int|None, context:int, mask_id:int, start:int|None=None) -> np.ndarray:
  """Token ids with mask_id where text is to be generated. `[MASK]` is one token to fill, `[MASK*N]` N tokens; text
  outside the markers is kept verbatim. Without markers the prompt is a prefix and the rest, up to length, is generated.
  start: a token put first (the end of text that a story follows), not counted in length. The prompt must fit the
  first context; the length need not (block by block, `diffusion.sample_blocks`), up to 100 contexts."""
  if re.search(r"\[\s*mask", MARKER.sub("", prompt), re.I):
    raise ValueError("malformed marker in --prompt: write [MASK] or [MASK*N], in capitals, with N >= 1")
  pieces, pos, size, n = [] if start is None else [np.array([start])], 0, int(start is not None), int(start is not None)
  for m in MARKER.finditer(prompt):
    pieces.append(vocab.encode(prompt[pos:m.start()], keep))
    count, pos = int(m.group(1) or 1), m.end()
    if count < 1: raise ValueError("malformed marker in --prompt: [MASK*N] needs N >= 1")
    if (size := size + len(pieces[-1]) + count) > context:  # checked before anything that size is made
      raise ValueError(f"the --prompt template holds at least {size - n} tokens, more than the model context "
                       f"({context - n}): shorten it")
    pieces.append(np.full(count, mask_id))
  ids = np.concatenate(pieces + [vocab.encode(prompt[pos:], keep)]).astype(np.int32)
  if length and length > 100 * context:
    raise ValueError(f"--length {length} is more than 100 contexts ({100 * context}): lower it")
  length = n + length if length else (len(ids) if MARKER.search(prompt) else context)
  if len(ids) > context:
    raise ValueError(f"the prompt is {len(ids) - n} tokens, more than the model context ({context - n}): shorten it")
  if len(ids) > length:
    raise ValueError(f"the prompt is {len(ids) - n} tokens, more than --length {length - n}: "
                     "shorten it or raise --length")
  return np.concatenate([ids, np.full(length - len(ids), mask_id, np.int32)])

def reverse_process(model, init:np.ndarray, args, stop:int|None=None):
  """The sampler for this checkpoint: the reverse diffusion from the masks in init (block by block past the context), or
  the autoregressive twin left to right; either stops early once every sample has written `stop` (an end of text)."""
  x, cfg = Tensor(np.tile(init, (args.num_samples, 1)).astype(np.int32)), model.cfg
  if cfg.causal: return diffusion.sample_ar(model, x, cfg.mask_id, args.temperature, args.top_p, stop)
  return diffusion.sample_blocks(model, x, cfg.mask_id, args.steps, cfg.seq_len, stop,
                                 first=int(init[0] != cfg.mask_id), schedule=args.schedule, method=args.sampler,
                                 cache=not cfg.time_cond and args.sampler == "ancestral", temperature=args.temperature,
                                 top_p=args.top_p, choice_noise=args.choice_noise)

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__[__doc__.index("\n"):])
  p.add_argument("--ckpt", default="out/ckpt.safetensors",
                 help="a checkpoint written by train.py; default out/ckpt.safetensors")
  p.add_argument("--num-samples", type=positive(), default=1, help="default 1")
  p.add_argument("--length", type=positive(), help="tokens per sample (default: the model's context, or the infilling "
                 "template); more than the context: written block by block, until every story has ended")
  p.add_argument("--steps", type=positive(), help="reverse-process steps (network evaluations) per block; default: "
                 "a quarter of the tokens a block writes (32 for 128), which the quality table found to cost little "
                 "(BENCHMARKS.md)")
  p.add_argument("--sampler", choices=["ancestral", "confidence"], default="confidence", help="default confidence; "
                 "ancestral: exact (cached automatically when the model has no time conditioning)")
  p.add_argument("--choice-noise", type=number(float, 0), default=4.0, help="confidence sampler: Gumbel noise on the "
                 "order in which positions are revealed, annealed with t (MaskGIT's choice temperature); default 4")
  p.add_argument("--schedule", choices=diffusion.SCHEDULES, default="loglinear", help="default loglinear")
  # the defaults are the quality table's (BENCHMARKS.md) lowest generative perplexity at ≤ 32 network evaluations for
  # 128 tokens among the settings whose samples are as varied as text (entropy ≥ 0.95x text's): without choice noise the
  # confidence sampler repeats itself; ancestral sampling at temperature 0.8, top-p 0.9 reads at 1.7x its perplexity
  p.add_argument("--temperature", type=number(float, 0), default=1.0, help="default 1; 0: greedy")
  p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="in (0, 1]; default 1: off")
  p.add_argument("--seed", type=number(int, 0), default=0, help="same seed, same device: same text; default 0")
  p.add_argument("--prompt", default="", help="a prefix, or a template with [MASK] / [MASK*N] to fill in")
  p.add_argument("--visualize", action="store_true",
                 help="animate the reverse process (plain snapshots when not a terminal)")
  p.add_argument("--fps", type=positive(float), default=20, help="frames per second of the animation; default 20")
  p.add_argument("--html", help="also write a self-contained HTML page replaying the denoising")
  p.add_argument("--quality", action="store_true", help="score the samples: generative perplexity under --judge, "
                 "entropy, distinct 4-grams, 8-grams copied from the training split; with held-out text as a reference "
                 "row (JSON lines)")
  p.add_argument("--judge",
                 help="an autoregressive twin's checkpoint (train.py --causal) to compute generative perplexity")
  p.add_argument("--sweep", metavar="SVG", help="with --quality: also each sampler, temperature, top-p and step count "
                 "of the quality table (quality.SWEEP), and plot generative perplexity against network evaluations "
                 "into SVG")
  p.add_argument("--keep-going", action="store_true",
                 help="show the text after a story's end of text, and write the whole --length")
  p.add_argument("--race", metavar="AR_CKPT", help="race the diffusion model against its autoregressive twin (train.py "
                 "--causal): both write side by side, one network evaluation per frame (with --html: also as a page)")
  args = p.parse_args(argv)
  if args.quality and args.length is not None and args.length < 8:
    p.error("--quality needs --length 8 or more (it counts 8-grams copied from the training data)")
  if args.sweep and not args.quality: p.error("--sweep needs --quality (and --judge for generative perplexity)")
  if args.race and (args.quality or MARKER.search(args.prompt)):
    p.error("--race takes a prefix --prompt (the left-to-right side cannot fill in), and no --quality")
  return args

def setup(args) -> argparse.Namespace:
  """All checked before sampling, with one-line errors: the model, its vocabulary and run (meta), the template to fill
  (init; a story's EOT first when first = 1), the judge and its reference data for --quality, the twin for --race."""
  try:
    model, keep, meta = load(args.ckpt)
    cfg, judge, twin, ds = model.cfg, None, None, None
    first = int(bool(args.race) or batches.reads_after_eot(meta["args"]))  # then a story is what follows an end of text
    init = template(args.prompt, keep, args.length, cfg.seq_len, cfg.mask_id, vocab.eot(keep) if first else None)
    if cfg.causal and len(init) > cfg.seq_len:
      raise ValueError(f"--length {args.length} is more than the autoregressive twin's context ({cfg.seq_len - 1})")
    if (args.sweep or args.race) and cfg.causal:
      raise ValueError(f"{args.ckpt} is an autoregressive twin: pass the diffusion model as --ckpt")
    if args.quality:  # the judge, and the held-out text of the data the model was trained on (the reference row)
      judge = load_twin(args.judge, keep, "judge") if args.judge else None
      ds = prepare.load(meta["args"]["data"], log=lambda *a: print(*a, file=sys.stderr))
    if args.race:
      twin = load_twin(args.race, keep, "race"); ctx = twin.cfg.seq_len
      if len(init) > ctx: raise ValueError(f"--race writes within both contexts: lower --length to {ctx - 1}")
  except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")
  print(describe(args.ckpt, meta), file=sys.stderr)
  if meta["step"] < 500:
    print(f"(after {meta['step']} steps a model writes word salad: train it longer for stories)", file=sys.stderr)
  return argparse.Namespace(model=model, keep=keep, meta=meta, init=init, first=first, judge=judge, twin=twin, ds=ds)

def score(args, s, runs) -> list[dict]:
  """--quality: figures of the samples, of held-out text and of the judge's own samples (at --temperature, --top-p)."""
  own = None
  if s.judge is not None and args.judge != args.ckpt:
    Tensor.manual_seed(args.seed)
    n = min(len(s.init) - s.first, s.judge.cfg.seq_len - 1)  # as long as the samples
    start = np.r_[vocab.eot(s.keep), np.full(n, s.judge.cfg.mask_id)].astype(np.int32)
    xs, _, nfe = [*reverse_process(s.judge, start, args)][-1]
    own = (xs.numpy()[:, 1:], {"temperature": args.temperature, "top_p": args.top_p, "nfe": nfe})
  return quality.report(runs, s.judge, s.keep, s.ds, own)

def sweep(args, model, init, first:int) -> list[tuple[np.ndarray, dict]]:
  """--sweep: the same prompt through each quality.SWEEP setting (sampler, temperature, top-p, steps, choice noise)."""
  runs = []
  for setting in quality.SWEEP:
    a = argparse.Namespace(**{**vars(args), **setting})
    Tensor.manual_seed(args.seed); t0 = time.perf_counter()
    for xs, _, nfe in reverse_process(model, init, a): pass
    runs.append((xs.numpy()[:, first:], {**setting, "nfe": nfe, "seconds": round(time.perf_counter() - t0, 2)}))
  return runs

def run(args, sides, init:np.ndarray, first:int, keep, stop:int|None):
  """Each side's reverse process (one side, or two in a race), recording the step (the NFE in a race) at which each
  position was revealed, animated as it goes with --visualize. Returns (side, tokens, revealed_at, NFE) per side,
  the frames' labels and the seconds taken."""
  cfg, gen, tty, race = sides[0][1].cfg, init == sides[0][1].cfg.mask_id, sys.stdout.isatty(), len(sides) > 1
  animate, runs, t0 = tty, [], time.perf_counter()
  if args.visualize and not race:
    print("compiling the sampler's kernels (once per shape; ~20 s on a CPU)...", file=sys.stderr, flush=True)
  for side, m in sides:
    Tensor.manual_seed(args.seed); labels = ["step 0  t = 1.000  0% revealed"]
    revealed_at = np.where(gen, 1 << 30, -1)[None].repeat(args.num_samples, 0)
    for k, (xs, s, nfe) in enumerate(reverse_process(m, init, args, stop), start=1):
      xs = xs.numpy()
      revealed_at[(revealed_at == 1 << 30) & (xs != cfg.mask_id)] = nfe if race else k
      block, j = divmod(k - 1, args.steps)
      labels.append((f"block {block + 1}  " if len(init) > cfg.seq_len else "") + f"step {j + 1}/{args.steps}  "
                    f"t = {s:.3f}  {round(100 * float((xs[:, gen] != cfg.mask_id).mean()) if gen.any() else 100, 1)}% "
                    f"revealed  NFE {nfe}")
      snapshot = (block == 0 and k in np.linspace(0, args.steps, 6).round()) or (block and s == 0)
      if args.visualize and not race and (animate or snapshot):
        animate = display.show(labels[-1], [("", xs[i], revealed_at[i], k) for i in range(len(xs))], first, gen, keep,
                               cfg.mask_id, animate, args.fps)
    runs.append((side, xs, revealed_at, nfe))
  if race:  # replayed side by side, one network evaluation per frame
    total = max(nfe for *_, nfe in runs)
    labels = [f"NFE {k}: " + " · ".join(f"{side} {min(k, nfe)}{' (done)' if k >= nfe else ''}"
                                        for side, _, _, nfe in runs) for k in range(total + 1)]
    for k in range(1, total + 1):
      if animate or k in np.linspace(0, total, 6).round():
        animate = display.show(labels[k], [(f"{side} ({nfe} NFE)", xs[i], ra[i], k) for side, xs, ra, nfe in runs
                                           for i in range(len(xs))], first, gen, keep, cfg.mask_id, animate, args.fps)
  return runs, labels, time.perf_counter() - t0

def main(argv=None):
  args = parse_args(argv)
  devices.choose()
  s = setup(args)
  cfg, gen, tty = s.model.cfg, s.init == s.model.cfg.mask_id, sys.stdout.isatty()
  if args.sweep:  # the quality table instead of one run; the judge's own samples, the reference row, at temperature 1
    runs = sweep(args, s.model, s.init, s.first)
    args.temperature, args.top_p = 1.0, 1.0
    return quality.plot(score(args, s, runs), args.sweep)

  if cfg.causal: args.steps = int(gen.sum())  # left to right: one step, and one network evaluation, per token
  args.steps = args.steps or -(-int(gen[:cfg.seq_len].sum()) // 4)
  sides = [("diffusion", s.model), ("autoregressive twin", s.twin)] if s.twin else [("", s.model)]
  runs, labels, wall = run(args, sides, s.init, s.first, s.keep,
                           None if args.keep_going or args.quality else vocab.eot(s.keep))
  _, xs, _, nfe = runs[0]

  # the texts up to their story's end, the page, the quality figures, a summary line
  ends = [[None if args.keep_going else vocab.story_end(x, ~gen, s.keep) for x in xs] for _, xs, _, _ in runs]
  if not args.visualize and not s.twin:
    for i, x in enumerate(xs):
      cut = ("" if ends[0][i] is not None or args.keep_going or not gen[-1]
             else f"\n[cut: no end of text within {len(s.init) - s.first} tokens]")
      text = vocab.decode(x[s.first:ends[0][i]], s.keep)
      print((display.printable(text) if tty else text) + cut + ("\n" + "-" * 40 if i < len(xs) - 1 else ""))
  if args.html:
    display.write_html(args.html, [(side, xs[i, s.first:], ra[i, s.first:], e[i] and e[i] - s.first)
                                   for (side, xs, ra, _), e in zip(runs, ends) for i in range(len(xs))], labels, s.keep)
    print(f"wrote {args.html}: open it in a browser", file=sys.stderr)
  if args.quality:
    extra = {"sampler": "autoregressive" if cfg.causal else args.sampler, "temperature": args.temperature,
             "top_p": args.top_p, "steps": args.steps, "choice_noise": args.choice_noise, "nfe": nfe,
             "seconds": round(wall, 2)}
    score(args, s, [(xs[:, s.first:], extra)])
  print(f"{args.num_samples} x {len(s.init) - s.first} tokens | "
        + " | ".join(f"{side + ': ' if side else ''}NFE {nfe}" for side, _, _, nfe in runs)
        + f" | {wall:.1f} s{' (with animation delays)' if args.visualize and tty else ''} | "
        f"{len(runs) * args.num_samples * gen.sum() / wall:,.0f} tokens/s", file=sys.stderr)

if __name__ == "__main__": main()
