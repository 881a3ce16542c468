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
import argparse, json, math, re, sys, time
import numpy as np
from tinygrad import Tensor, dtypes
import diffusion
from data import DataError, prepare, vocab
from model import Denoiser, config_from, load_checkpoint, parameters, prefer_cpu_backend

MARKER = re.compile(r"\[MASK(?:\*(\d+))?\]")

def load(path:str) -> tuple[Denoiser, list|None, dict]:
  """The denoiser from a train.py checkpoint (its EMA weights when it has them), its vocabulary and the run's flags."""
  tensors, meta = load_checkpoint(path)
  model = Denoiser(config_from(meta))
  prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
  for k, v in parameters(model).items():
    if prefix + k not in tensors or tensors[prefix + k].shape != v.shape: raise ValueError(f"{path} lacks {prefix + k}: it was not written by train.py")
    v.assign(tensors[prefix + k]).realize()
  return model, (tensors["vocab.keep"].numpy().tolist() if "vocab.keep" in tensors else None), meta["args"]

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

# ***** showing the reverse process: tokens never change once revealed, so a run is its final tokens plus, for each
# position, the step that revealed it (-1: given by the prompt) *****

def frame_text(tokens, revealed_at, step:int, keep, mask_id:int, color:bool, end:int|None=None) -> str:
  """One sequence at one step: masks as dim ░, tokens revealed in this step highlighted, from the end of text on grey."""
  kind = np.where(revealed_at < 0, 0, np.where(revealed_at < step, 1, np.where(revealed_at == step, 2, 3)))  # given, old, new, masked
  kind = np.where((np.arange(len(tokens)) >= (len(tokens) if end is None else end)) & (kind != 3), 4, kind)  # shown, after the end
  out, start = [], 0
  for i in range(1, len(tokens) + 1):
    if i == len(tokens) or kind[i] != kind[start]:
      text = vocab.decode(tokens[start:i] if kind[start] != 3 else [mask_id] * (i - start), keep)
      style = {0: "\x1b[1m", 1: "", 2: "\x1b[1;32m", 3: "\x1b[2m", 4: "\x1b[90m"}[kind[start]]
      out.append(f"{style}{text}\x1b[0m" if color and style else text)
      start = i
  return "".join(out)

def write_html(path:str, runs, labels:list[str], keep):
  """A single page, no external assets: play/pause and a slider over the recorded frames. runs: (title, tokens,
  revealed_at, end) per text, revealed_at counted in frames."""
  data = {"labels": labels, "samples": [{"title": title, "tokens": [vocab.decode([i], keep) for i in tokens], "revealed_at": revealed_at.tolist(),
                                         "end": len(tokens) if end is None else end} for title, tokens, revealed_at, end in runs]}
  payload = json.dumps(data).replace("<", "\\u003c")  # inside <script> only "</script>" could break out
  page = f"""<!doctype html><meta charset="utf-8"><title>tinymdlm: denoising</title>
<style>body{{font:16px/1.5 Georgia,serif;max-width:46em;margin:2em auto}}pre{{white-space:pre-wrap}}.m{{color:#bbb}}.n{{background:#c8f7c5}}.g{{font-weight:bold}}.e{{color:#aaa}}</style>
<h3>tinymdlm: text condensing out of [MASK]s</h3>
<button id="play">pause</button> <input id="step" type="range" min="0" max="{len(labels) - 1}" value="0" style="width:60%"> <div id="info"></div>
<div id="out"></div>
<script id="data" type="application/json">{payload}</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent), S = document.getElementById("step");
const esc = s => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");
function show(k) {{
  S.value = k; document.getElementById("info").textContent = D.labels[k];
  document.getElementById("out").innerHTML = D.samples.map(s => (s.title ? `<h4>${{esc(s.title)}}</h4>` : "") + "<pre>" + s.tokens.map((w, i) => {{
    const r = s.revealed_at[i], c = r < 0 ? "g" : r > k ? "m" : i >= s.end ? "e" : r == k ? "n" : "";
    return r > k ? '<span class="m">░</span>' : c ? `<span class="${{c}}">${{esc(w)}}</span>` : esc(w);
  }}).join("") + "</pre>").join("");
}}
let playing = true, k = 0;
document.getElementById("play").onclick = e => {{ playing = !playing; e.target.textContent = playing ? "pause" : "play"; }};
S.oninput = () => show(k = +S.value);
setInterval(() => {{ if (playing) show(k = (k + 1) % D.labels.length); }}, 80);
show(0);
</script>
"""
  with open(path, "w", encoding="utf-8") as f: f.write(page)

def reverse_process(model, init:np.ndarray, args, stop:int|None=None):
  """The sampler for this checkpoint: the reverse diffusion from the masks in init (block by block past the context), or
  the autoregressive twin left to right; either stops early once every sample has written `stop` (an end of text)."""
  x, cfg = Tensor(np.tile(init, (args.num_samples, 1)).astype(np.int32)), model.cfg
  if cfg.causal: return diffusion.sample_ar(model, x, cfg.mask_id, args.temperature, args.top_p, stop)
  return diffusion.sample_blocks(model, x, cfg.mask_id, args.steps, cfg.seq_len, stop, first=int(init[0] != cfg.mask_id), schedule=args.schedule,
                                 method=args.sampler, cache=not cfg.time_cond and args.sampler == "ancestral", temperature=args.temperature, top_p=args.top_p)

# ***** sample quality: the field's figures for a set of texts, each as mean ± standard error over the texts *****

def ngrams(ids, n:int) -> np.ndarray:
  """One uint64 per n-gram of ids (each < 2^16): 4 tokens pack exactly into one, longer n-grams are hashed from their
  4-token parts (a false match has odds ~1e-13 per lookup)."""
  w, h = np.lib.stride_tricks.sliding_window_view(np.asarray(ids, np.uint64), n), np.uint64(0)
  for j in range(0, n, 4): h = h * np.uint64(0x9E3779B97F4A7C15) ^ (w[:, j:j + 4] << np.arange(0, 64, 16, dtype=np.uint64)[:min(4, n - j)]).sum(-1)
  return h

def entropy(ids) -> float:
  """Entropy of a text's own token frequencies (nats): repetitive text has little, and games generative perplexity."""
  p = np.unique(ids, return_counts=True)[1] / len(ids)
  return float(-(p * np.log(p)).sum())

def distinct(ids, n:int=4) -> float: return len(np.unique(ngrams(ids, n))) / (len(ids) - n + 1)  # 1 − repetition

def copied(ids, train_grams:np.ndarray, n:int=8) -> float:
  """The share of a text's n-grams that occur somewhere in the training split (train_grams: np.unique(ngrams(train, n)))."""
  return float(np.isin(ngrams(ids, n), train_grams).mean())

def judge_nll(judge, texts:np.ndarray, start:int) -> np.ndarray:
  """Each text's NLL per token under an autoregressive judge that reads it after `start` (an end of text)."""
  x = np.concatenate([np.full((len(texts), 1), start), texts], 1)[:, :judge.cfg.seq_len + 1]
  return diffusion.ar_nll(judge, Tensor(x.astype(np.int32))).numpy()

def quality(texts:np.ndarray, judge, start:int, train_grams:np.ndarray) -> dict:
  def mean_se(v): v = np.asarray(v, np.float64); return [round(float(v.mean()), 4), round(float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0, 4)]
  q = {"entropy": mean_se([entropy(t) for t in texts]), "distinct4": mean_se([distinct(t) for t in texts]),
       "copied8": mean_se([copied(t, train_grams) for t in texts])}
  if judge is not None:
    nll = mean_se(judge_nll(judge, texts, start))
    q |= {"judge_nll": nll, "gen_ppl": [round(math.exp(nll[0]), 2), round(math.exp(nll[0]) * nll[1], 2)]}  # delta method
  return q

def load_twin(path:str, keep, flag:str):
  """The autoregressive twin given as --judge or --race, on the diffusion model's vocabulary."""
  twin, twin_keep, _ = load(path)
  if not twin.cfg.causal: raise ValueError(f"--{flag} {path} is not an autoregressive twin: train one with `python train.py --causal`")
  if twin_keep != keep: raise ValueError(f"--{flag} {path} has another vocabulary than the diffusion model: train both on the same --data and --vocab-size")
  return twin

def report(args, model, keep, run_args, runs:list[tuple[np.ndarray, dict]], judge) -> list[dict]:
  """--quality: the figures of each run's samples, then the same for held-out text and for the judge's own samples."""
  ds = prepare.load(run_args["data"], explicit=True, log=lambda *a: print(*a, file=sys.stderr))
  grams = np.unique(ngrams(vocab.to_compact(ds["train"][:50_000_000], keep), 8))  # the first 50M tokens of very large data
  L, start, n = runs[0][0].shape[1], vocab.eot(keep), len(runs[0][0])
  rows = [("samples", *run) for run in runs] + [("validation text", vocab.to_compact(np.asarray(ds["val"][:n * L]), keep).reshape(-1, L), {})]
  if judge is not None and args.judge != args.ckpt:
    Tensor.manual_seed(args.seed)
    own, _, judge_nfe = [*reverse_process(judge, np.r_[start, np.full(judge.cfg.seq_len - 1, judge.cfg.mask_id)].astype(np.int32), args)][-1]
    rows.append(("judge's own samples", own.numpy()[:, 1:], {"temperature": args.temperature, "top_p": args.top_p, "nfe": judge_nfe}))
  out = []
  for name, texts, extra in rows:
    q = quality(texts, judge, start, grams)
    cols = [f"{k} {v[0]:.3f} ± {v[1]:.3f}" for k, v in q.items() if k != "judge_nll"]
    print(f"{name:>20} (n={len(texts)}){''.join(f' {k} {v}' for k, v in extra.items() if k in ('sampler', 'steps'))}: " + " | ".join(cols), file=sys.stderr)
    out.append({"rows": name, **extra, **q})
    print(json.dumps(out[-1]), flush=True)
  return out

SWEEP = ([(s, 1.0, 1.0, n) for n in (8, 16, 32, 64, 128, 256) for s in ("ancestral", "confidence")] + [("ancestral", 1.0, 1.0, 1024)] +
         [(s, T, p, n) for T, p in ((0.8, 1.0), (1.0, 0.9), (0.8, 0.9)) for n in (32, 128) for s in ("ancestral", "confidence")])

def sweep(args, model, init, first:int) -> list[tuple[np.ndarray, dict]]:
  """--quality --sweep: the same prompt through each (sampler, temperature, top-p, steps) of SWEEP, the quality table."""
  runs = []
  for sampler, temperature, top_p, steps in SWEEP:
    a = argparse.Namespace(**{**vars(args), "sampler": sampler, "temperature": temperature, "top_p": top_p, "steps": steps})
    Tensor.manual_seed(args.seed); t0 = time.perf_counter()
    for xs, _, nfe in reverse_process(model, init, a): pass
    runs.append((xs.numpy()[:, first:], {"sampler": sampler, "temperature": temperature, "top_p": top_p, "steps": steps, "nfe": nfe, "seconds": round(time.perf_counter() - t0, 2)}))
  return runs

def plot(rows:list[dict], svg_path:str):
  """Generative perplexity against network evaluations, one line per sampler setting (log-log), as an SVG."""
  series = {}
  for r in rows:
    if r["rows"] == "samples": series.setdefault(f"{r['sampler']} T={r['temperature']} p={r['top_p']}", []).append((r["nfe"], r["gen_ppl"][0]))
  pts = [p for s in series.values() for p in s]
  (W, H, m), (x0, x1), (y0, y1) = (640, 360, 48), (math.log(min(x for x, _ in pts)), math.log(max(x for x, _ in pts))), (math.log(min(y for _, y in pts)), math.log(max(y for _, y in pts)))
  X, Y = lambda x: m + (W - 2 * m - 160) * (math.log(x) - x0) / ((x1 - x0) or 1), lambda y: H - m - (H - 2 * m) * (math.log(y) - y0) / ((y1 - y0) or 1)
  svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
         f'<path d="M{m},{m}V{H - m}H{W - m - 160}" fill="none" stroke="#444"/><text x="{m}" y="{m - 8}">generative perplexity (log)</text>',
         f'<text x="{W - m - 160}" y="{H - m + 16}" text-anchor="end">network evaluations (log), {min(x for x, _ in pts)} to {max(x for x, _ in pts)}</text>',
         f'<text x="4" y="{Y(math.exp(y1)) + 4:.0f}">{math.exp(y1):.0f}</text><text x="4" y="{Y(math.exp(y0)) + 4:.0f}">{math.exp(y0):.0f}</text>']
  for i, (name, p) in enumerate(series.items()):
    color = ["#c33", "#36c", "#393", "#c93", "#939", "#399", "#666", "#960"][i % 8]
    svg += [f'<polyline points="{" ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in sorted(p))}" fill="none" stroke="{color}" stroke-width="2"/>',
            f'<text x="{W - m - 150}" y="{m + 16 * i}" fill="{color}">{name}</text>']
  with open(svg_path, "w") as f: f.write("\n".join(svg + ["</svg>"]))

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
  p.add_argument("--ckpt", default="out/ckpt.safetensors", help="a checkpoint written by train.py")
  p.add_argument("--num-samples", type=int, default=1)
  p.add_argument("--length", type=int, help="tokens per sample (default: the model's context, or the infilling template); "
                 "more than the context: written block by block, until every story has ended")
  p.add_argument("--steps", type=int, default=128, help="reverse-process steps")
  p.add_argument("--sampler", choices=["ancestral", "confidence"], default="ancestral",
                 help="ancestral is cached automatically when the model has no time conditioning")
  p.add_argument("--schedule", choices=diffusion.SCHEDULES, default="loglinear")
  # defaults from the quality table (BENCHMARKS.md): the lowest generative perplexity among the settings whose samples
  # are as varied as real text (token entropy, distinct 4-grams); the confidence sampler's lower perplexity comes from repeating itself
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--top-p", type=float, default=0.9)
  p.add_argument("--seed", type=int, default=0, help="same seed, same device: same text")
  p.add_argument("--prompt", default="", help="a prefix, or a template with [MASK] / [MASK*N] to fill in")
  p.add_argument("--visualize", action="store_true", help="animate the reverse process (plain snapshots when not a terminal)")
  p.add_argument("--fps", type=float, default=20)
  p.add_argument("--html", help="also write a self-contained HTML page replaying the denoising")
  p.add_argument("--quality", action="store_true", help="score the samples: generative perplexity under --judge, entropy, "
                 "distinct 4-grams, 8-grams copied from the training split; with held-out text as a reference row (JSON lines)")
  p.add_argument("--judge", help="an autoregressive twin's checkpoint (train.py --causal) to compute generative perplexity")
  p.add_argument("--sweep", metavar="SVG", help="with --quality: also each sampler, temperature, top-p and step count of the "
                 "quality table (sample.SWEEP), and plot generative perplexity against network evaluations into SVG")
  p.add_argument("--keep-going", action="store_true", help="show the text after a story's end of text, and write the whole --length")
  p.add_argument("--race", metavar="AR_CKPT", help="race the diffusion model against its autoregressive twin (train.py --causal): "
                 "both write side by side, one network evaluation per frame (with --html: also as a page)")
  args = p.parse_args(argv)
  prefer_cpu_backend()
  for name in ("num_samples", "steps", "fps"):
    if getattr(args, name) <= 0: p.error(f"--{name.replace('_', '-')} must be > 0")
  if args.length is not None and args.length <= 0: p.error("--length must be > 0")
  if args.temperature < 0 or not 0 < args.top_p <= 1: p.error("--temperature must be >= 0 and --top-p in (0, 1]")
  if args.sweep and not args.quality: p.error("--sweep needs --quality (and --judge for generative perplexity)")
  if args.race and (args.quality or MARKER.search(args.prompt)): p.error("--race takes a prefix --prompt (the left-to-right side cannot fill in), and no --quality")

  try:
    model, keep, run_args = load(args.ckpt)
    cfg, eot = model.cfg, vocab.eot(keep)
    # a model trained on story-aligned windows (and the twin) reads a story as what follows an end of text
    first = int(cfg.causal or bool(args.race) or run_args.get("windows", "random") != "random")
    init = template(args.prompt, keep, args.length, cfg.seq_len, cfg.mask_id, eot if first else None)
    if cfg.causal and len(init) > cfg.seq_len: raise ValueError(f"--length {args.length} is more than the autoregressive twin's context ({cfg.seq_len - 1})")
    if (args.sweep or args.race) and cfg.causal: raise ValueError(f"{args.ckpt} is an autoregressive twin: pass the diffusion model as --ckpt")
    judge = load_twin(args.judge, keep, "judge") if args.quality and args.judge else None  # said before any sampling
    twin = load_twin(args.race, keep, "race") if args.race else None
    if twin and len(init) > twin.cfg.seq_len: raise ValueError(f"--race writes within both contexts: lower --length to {twin.cfg.seq_len - 1}")
  except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")
  if args.sweep:  # the quality table instead of one run
    runs = sweep(args, model, init, first)
    args.temperature, args.top_p = 1.0, 1.0  # the judge's own samples, the reference row: its plain distribution
    try: return plot(report(args, model, keep, run_args, runs, judge), args.sweep)
    except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")

  gen, stop = init == cfg.mask_id, None if args.keep_going or args.quality else eot
  if cfg.causal: args.steps = int(gen.sum())  # left to right: one step, and one network evaluation, per token
  sides = [("diffusion", model), ("autoregressive twin", twin)] if twin else [("", model)]
  t0, tty, runs = time.perf_counter(), sys.stdout.isatty(), []
  for name, m in sides:
    Tensor.manual_seed(args.seed)
    revealed_at, labels = np.where(gen, 1 << 30, -1)[None].repeat(args.num_samples, 0), ["step 0  t = 1.000  0% revealed"]
    for k, (xs, s, nfe) in enumerate(reverse_process(m, init, args, stop), start=1):
      xs = xs.numpy()
      revealed_at[(revealed_at == 1 << 30) & (xs != cfg.mask_id)] = nfe if twin else k  # the race counts frames in NFE
      block, j = divmod(k - 1, args.steps)
      labels.append((f"block {block + 1}  " if len(init) > cfg.seq_len else "") + f"step {j + 1}/{args.steps}  t = {s:.3f}  "
                    f"{round(100 * float((xs[:, gen] != cfg.mask_id).mean()) if gen.any() else 100, 1)}% revealed  NFE {nfe}")
      if args.visualize and not twin and (tty or (block == 0 and k in np.linspace(0, args.steps, 6).round()) or (block and s == 0)):
        show(labels[-1], [("", xs[i], revealed_at[i], k) for i in range(len(xs))], first, gen, keep, cfg.mask_id, tty, args.fps)
    runs.append((name, xs, revealed_at, nfe))
  wall = time.perf_counter() - t0
  ends = [[None if args.keep_going else vocab.story_end(x, ~gen, keep) for x in xs] for _, xs, _, _ in runs]
  if twin:
    total = max(nfe for *_, nfe in runs)
    labels = [f"NFE {k}: " + " · ".join(f"{name} {min(k, nfe)}{' (done)' if k >= nfe else ''}" for name, _, _, nfe in runs) for k in range(total + 1)]
    for k in range(1, total + 1):
      if tty or k in np.linspace(0, total, 6).round():
        show(labels[k], [(f"{name} ({nfe} NFE)", xs[i], ra[i], k) for name, xs, ra, nfe in runs for i in range(len(xs))], first, gen, keep, cfg.mask_id, tty, args.fps)
  elif not args.visualize:
    for i, x in enumerate(xs):
      cut = "" if ends[0][i] is not None or args.keep_going or not gen[-1] else f"\n[cut: no end of text within {len(init) - first} tokens]"
      print(vocab.decode(x[first:ends[0][i]], keep) + cut + ("\n" + "-" * 40 if i < len(xs) - 1 else ""))
  if args.html: write_html(args.html, [(name, xs[i, first:], ra[i, first:], e[i] and e[i] - first) for (name, xs, ra, _), e in zip(runs, ends)
                                       for i in range(len(xs))], labels, keep)
  if args.quality:
    extra = {"sampler": "autoregressive" if cfg.causal else args.sampler, "temperature": args.temperature, "top_p": args.top_p, "steps": args.steps, "nfe": nfe, "seconds": round(wall, 2)}
    try: report(args, model, keep, run_args, [(xs[:, first:], extra)], judge)
    except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")
  print(f"{args.num_samples} x {len(init) - first} tokens | " + " | ".join(f"{name + ': ' if name else ''}NFE {nfe}" for name, _, _, nfe in runs) +
        f" | {wall:.1f} s{' (with animation delays)' if args.visualize and tty else ''} | {len(runs) * args.num_samples * gen.sum() / wall:,.0f} tokens/s", file=sys.stderr)

def show(label:str, texts, first:int, gen, keep, mask_id:int, tty:bool, fps:float):
  """One frame of --visualize or --race: in a terminal redrawn in place, else a plain snapshot. texts: (title, tokens,
  revealed_at, step) per text."""
  body = "\n\n".join((title + "\n" if title else "") + frame_text(x[first:], ra[first:], k, keep, mask_id, tty, (e := vocab.story_end(x, ~gen, keep)) and e - first)
                     for title, x, ra, k in texts)
  print(("\x1b[H\x1b[J" if tty else "") + label + "\n" + body + ("\n" if tty else "\n" + "-" * 40), flush=True)
  if tty: time.sleep(1 / fps)

if __name__ == "__main__": main()
