"""Generate text with a trained masked diffusion LM, and watch it condense out of masks.

  python sample.py --visualize                          # animate the reverse process in the terminal
  python sample.py --prompt "Once upon a time" --num-samples 3
  python sample.py --prompt "Tom had a [MASK*3] dog. [MASK*20] The end."   # infilling
  python sample.py --html story.html                    # a self-contained page that replays the denoising
  python sample.py --length 512                         # past the context: block by block, until the story ends
  python sample.py --race --html race.html              # against its autoregressive twin, side by side
  python sample.py --quality --num-samples 32           # generative perplexity under the twin, entropy, copying

Without --ckpt: out/ckpt.safetensors if you trained one, else the model shipped in models/ (and its twin for --race and
--quality). A checkpoint of the autoregressive twin (train.py --causal) samples left to right."""
import argparse, re, sys, time
import numpy as np
from tinygrad import Tensor
import diffusion
from data import DataError, batches, prepare, vocab
from harness import cli, devices, display, quality, rundir
from harness.cli import number, positive

MARKER = re.compile(r"\[MASK(?:\*(\d+))?\]")

def template(prompt:str, keep, length:int|None, context:int, mask_id:int, start:int|None=None) -> np.ndarray:
  """Token ids with mask_id where text is to be generated: `[MASK]` one token, `[MASK*N]` N; other text kept verbatim.
  Without markers the prompt is a prefix and the rest, up to length, is generated. start: a token put first (the end of
  text a story follows), not counted in length. The prompt must fit a context; the length, up to 100 contexts."""
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
  options = {k: getattr(args, k) for k in diffusion.SAMPLERS[args.sampler].options}
  return diffusion.sample_blocks(model, x, cfg.mask_id, args.steps, cfg.seq_len, stop, int(init[0] != cfg.mask_id),
                                 schedule=args.schedule, method=args.sampler, temperature=args.temperature,
                                 top_p=args.top_p, cache=not cfg.time_cond and args.sampler == "ancestral", **options)

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__[__doc__.index("\n"):])
  p.add_argument("--ckpt", help="a checkpoint written by train.py; default: out/ckpt.safetensors, else models/")
  p.add_argument("--num-samples", type=positive(), default=1, help="default 1")
  p.add_argument("--length", type=positive(), help="tokens a sample (in blocks past the context); default: a context")
  p.add_argument("--steps", type=positive(), help="network evaluations a block (a cap if adaptive); default: tokens/4")
  p.add_argument("--sampler", choices=diffusion.SAMPLERS, default="confidence", help="default confidence")
  for name, entry in diffusion.SAMPLERS.items():
    for option, default in entry.options.items():
      p.add_argument("--" + option.replace("_", "-"), type=number(float, 0), default=default,
                     help=f"the {name} sampler's {option} (diffusion.py:{name}); default {default}")
  p.add_argument("--schedule", choices=diffusion.SCHEDULES, help="default: the one the model was trained with")
  p.add_argument("--temperature", type=number(float, 0), default=1.0, help="default 1; 0: greedy")
  p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="in (0, 1]; default 1: off")
  p.add_argument("--seed", type=number(int, 0), default=0, help="same seed, same device: same text; default 0")
  p.add_argument("--prompt", default="", help="a prefix, or a template with [MASK] / [MASK*N] to fill in")
  p.add_argument("--visualize", action="store_true", help="animate the reverse process (snapshots off a terminal)")
  p.add_argument("--fps", type=positive(float), default=20, help="frames per second of the animation; default 20")
  p.add_argument("--html", help="also write a self-contained HTML page replaying the denoising")
  p.add_argument("--quality", action="store_true", help="score the samples (harness/quality.py) beside held-out text")
  p.add_argument("--judge", help="the autoregressive twin that scores --quality; default: the shipped twin")
  p.add_argument("--sweep", metavar="SVG", help="with --quality: the quality table (quality.SWEEP), plotted into SVG")
  p.add_argument("--keep-going", action="store_true", help="show the text after a story's end, write all of --length")
  p.add_argument("--race", nargs="?", const="", metavar="AR_CKPT", help="race the twin (default: the shipped one)")
  args = p.parse_args(argv)
  if args.quality and args.length is not None and args.length < 8:
    p.error("--quality needs --length 8 or more (it counts 8-grams copied from the training data)")
  if args.sweep and not args.quality: p.error("--sweep needs --quality")
  if args.race is not None and (args.quality or MARKER.search(args.prompt)):
    p.error("--race takes a prefix --prompt (the left-to-right side cannot fill in), and no --quality")
  return args

def setup(args) -> argparse.Namespace:
  """All checked before sampling, with one-line errors: the model, its vocabulary and run (meta), the template to fill
  (init; a story's EOT first when first = 1), where the page goes, the judge and its data for --quality, the twin."""
  path, why = rundir.default_checkpoint(args.ckpt)
  try:
    model, keep, meta = rundir.load_model(path)
    cfg, judge, twin, ds = model.cfg, None, None, None
    args.schedule = args.schedule or meta["args"].get("schedule", "loglinear")  # the one it was trained with
    first = int(args.race is not None or batches.reads_after_eot(meta["args"]))  # a story follows an end of text
    init = template(args.prompt, keep, args.length, cfg.seq_len, cfg.mask_id, vocab.eot(keep) if first else None)
    if cfg.causal and len(init) > cfg.seq_len:
      raise ValueError(f"--length {args.length} is more than the autoregressive twin's context ({cfg.seq_len - 1})")
    if (args.sweep or args.race is not None) and cfg.causal:
      raise ValueError(f"{path} is an autoregressive twin: pass the diffusion model as --ckpt")
    for out in (args.html, args.sweep): display.check_writable(out)
    devices.check_memory_to_sample(args.num_samples, len(init), cfg, args.steps)
    if args.quality:  # the judge, and the held-out text of the data the model was trained on (the reference row)
      judge = rundir.load_twin(args.judge, keep, "judge")
      ds = prepare.load(meta["args"]["data"], log=lambda *a: print(*a, file=sys.stderr))
    if args.race is not None and len(init) > (twin := rundir.load_twin(args.race or None, keep, "race")).cfg.seq_len:
      raise ValueError(f"--race writes within both contexts: lower --length to {twin.cfg.seq_len - 1}")
  except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")
  print(rundir.describe(path, meta) + (f"; {why}" if why else ""), file=sys.stderr)
  if meta["step"] < 500: print(f"(after {meta['step']} steps a model writes word salad)", file=sys.stderr)
  if unknown := vocab.unknown(args.prompt, keep):
    print(f"note: the model's vocabulary has no {unknown}: the prompt holds <unk> (⁇) there", file=sys.stderr)
  return argparse.Namespace(model=model, keep=keep, meta=meta, init=init, first=first, judge=judge, twin=twin, ds=ds)

def run(args, sides, s, stop:int|None) -> tuple[list, list[str], float]:
  """Each side's reverse process, every state recorded (a frame per step, animated with --visualize); a race is replayed
  a frame per network evaluation. Returns per side (name, states (frames, N, L), NFE after each), labels, seconds."""
  cfg, gen, race, t0 = s.model.cfg, s.init == s.model.cfg.mask_id, len(sides) > 1, time.perf_counter()
  animate, recorded = sys.stdout.isatty(), []
  for side, m in sides:
    Tensor.manual_seed(args.seed)
    states, nfes, labels, block, j = [np.tile(s.init, (args.num_samples, 1))], [0], ["t = 1.000  0% revealed"], 0, 0
    for xs, t, nfe in reverse_process(m, s.init, args, stop):
      states.append(xs.numpy()); nfes.append(nfe)
      block, j = (block + 1, 1) if j and t > prev else (block, j + 1)  # t starts again at 1 in each block
      prev, revealed = t, round(100 * float((states[-1][:, gen] != cfg.mask_id).mean()), 1) if gen.any() else 100
      labels.append(f"block {block + 1}  " * (len(s.init) > cfg.seq_len) + f"step {j}/{args.steps}  t = {t:.3f}  "
                    f"{revealed}% revealed  NFE {nfe}")
      if args.visualize and not race and (animate or (block == 0 and j in np.linspace(0, args.steps, 6).round()) or
                                          t == 0):
        animate = display.show(labels[-1], [("", states[-1], states[-2])], s.first, gen, s.keep, cfg.mask_id, animate,
                               args.fps)
    recorded.append((side, np.stack(states), nfes))
  if race:  # replayed side by side, one network evaluation per frame: each side's state after that many
    recorded, labels = display.by_evaluation(recorded)
    for k in range(1, len(labels)):
      if animate or k in np.linspace(0, len(labels) - 1, 6).round():
        animate = display.show(labels[k], [(f"{side} ({n[-1]} NFE)", xs[k], xs[k - 1]) for side, xs, n in recorded],
                               s.first, gen, s.keep, cfg.mask_id, animate, args.fps)
  return recorded, labels, time.perf_counter() - t0

def main(argv=None):
  cli.plain_output()
  args = parse_args(argv)
  devices.choose()
  try: sample(args, setup(args))
  except KeyboardInterrupt: cli.interrupted("sampling stopped")
  except MemoryError as e: sys.exit(f"error: {cli.why(e)}")

def sample(args, s):  # one run of the reverse process (or the quality table); the texts, the page, the figures
  cfg, gen, tty = s.model.cfg, s.init == s.model.cfg.mask_id, sys.stdout.isatty()
  args.steps = int(gen.sum()) if cfg.causal else args.steps or -(-int(gen[:cfg.seq_len].sum()) // 4)  # twin: per token
  if args.sweep: return quality.sweep(args, s, reverse_process)  # the quality table instead of one run
  sides = [("diffusion", s.model), ("autoregressive twin", s.twin)] if s.twin else [("", s.model)]
  print(f"sampling {args.num_samples} x {len(s.init) - s.first} tokens" + " on both sides" * bool(s.twin) +
        " (the sampler's kernels compile first: ~20 s on a CPU)...", file=sys.stderr, flush=True)
  runs, labels, wall = run(args, sides, s, None if args.keep_going or args.quality else vocab.eot(s.keep))
  final = runs[0][1][-1]
  ends = [[None if args.keep_going else vocab.story_end(x, ~gen, s.keep) for x in xs[-1]] for _, xs, _ in runs]
  if not args.visualize and not s.twin:
    for i, x in enumerate(final):
      cut = f"\n[cut: no end of text within {len(s.init) - s.first} tokens]" * bool(ends[0][i] is None and
                                                                                      not args.keep_going and gen[-1])
      text = vocab.decode(x[s.first:ends[0][i]], s.keep)
      print((display.printable(text) if tty else text) + cut + ("\n" + "-" * 40 if i < len(final) - 1 else ""))
  if args.html:
    display.write_html(args.html, [(side, xs[:, i], e[i]) for (side, xs, _), e in zip(runs, ends)
                                   for i in range(args.num_samples)], labels, s.first, ~gen, s.keep, cfg.mask_id)
    print(f"wrote {args.html}: open it in a browser", file=sys.stderr)
  if args.quality: quality.score(args, s, runs[0], wall)
  print(f"{args.num_samples} x {len(s.init) - s.first} tokens | " + " | ".join(f"{side + ': ' if side else ''}NFE "
        f"{nfes[-1]}" for side, _, nfes in runs) + f" | {wall:.1f} s" + " (with animation delays)" * (args.visualize
        and tty) + f" | {len(runs) * args.num_samples * gen.sum() / wall:,.0f} tokens/s", file=sys.stderr)

if __name__ == "__main__": main()
