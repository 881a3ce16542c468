"""Generate text with a trained masked diffusion LM, and watch it condense out of masks.

  python sample.py --visualize                          # animate the reverse process in the terminal
  python sample.py --prompt "Once upon a time" --num-samples 3
  python sample.py --prompt "Tom had a [MASK*3] dog. [MASK*20] The end."   # infilling
  python sample.py --html story.html                    # a self-contained page that replays the denoising
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

def template(prompt:str, keep, length:int|None, context:int, mask_id:int) -> np.ndarray:
  """Token ids with mask_id where text is to be generated. `[MASK]` is one token to fill, `[MASK*N]` N tokens; text
  outside the markers is kept verbatim. Without markers the prompt is a prefix and the rest, up to length, is generated."""
  if "[MASK" in MARKER.sub("", prompt): raise ValueError("malformed marker in --prompt: write [MASK] or [MASK*N] with N >= 1")
  pieces, pos = [], 0
  for m in MARKER.finditer(prompt):
    n = int(m.group(1) or 1)
    if n < 1: raise ValueError("malformed marker in --prompt: [MASK*N] needs N >= 1")
    pieces += [vocab.encode(prompt[pos:m.start()], keep), np.full(n, mask_id)]
    pos = m.end()
  ids = np.concatenate(pieces + [vocab.encode(prompt[pos:], keep)]).astype(np.int32)
  length = length or (len(ids) if pieces else context)
  if len(ids) > min(length, context):
    raise ValueError(f"the prompt is {len(ids)} tokens, more than {'--length ' + str(length) if length < context else 'the model context'} "
                     f"({min(length, context)}): shorten it" + (" or raise --length" if length < context else ""))
  return np.concatenate([ids, np.full(length - len(ids), mask_id, np.int32)])

# ***** showing the reverse process: tokens never change once revealed, so a run is its final tokens plus, for each
# position, the step that revealed it (-1: given by the prompt) *****

def frame_text(tokens, revealed_at, step:int, keep, mask_id:int, color:bool) -> str:
  """One sequence at one step: masks as dim ░, tokens revealed in this step highlighted."""
  kind = np.where(revealed_at < 0, 0, np.where(revealed_at < step, 1, np.where(revealed_at == step, 2, 3)))  # given, old, new, masked
  out, start = [], 0
  for i in range(1, len(tokens) + 1):
    if i == len(tokens) or kind[i] != kind[start]:
      text = vocab.decode(tokens[start:i] if kind[start] != 3 else [mask_id] * (i - start), keep)
      style = {0: "\x1b[1m", 1: "", 2: "\x1b[1;32m", 3: "\x1b[2m"}[kind[start]]
      out.append(f"{style}{text}\x1b[0m" if color and style else text)
      start = i
  return "".join(out)

def write_html(path:str, runs, frames, keep, mask_id:int):
  """A single page, no external assets: play/pause and a step slider over the recorded steps."""
  data = {"frames": frames, "samples": [{"tokens": [vocab.decode([i], keep) for i in tokens], "revealed_at": revealed_at.tolist()}
                                        for tokens, revealed_at in runs]}
  payload = json.dumps(data).replace("<", "\\u003c")  # inside <script> only "</script>" could break out
  page = f"""<!doctype html><meta charset="utf-8"><title>tinymdlm: denoising</title>
<style>body{{font:16px/1.5 Georgia,serif;max-width:46em;margin:2em auto}}pre{{white-space:pre-wrap}}.m{{color:#bbb}}.n{{background:#c8f7c5}}.g{{font-weight:bold}}</style>
<h3>tinymdlm: text condensing out of [MASK]s</h3>
<button id="play">pause</button> <input id="step" type="range" min="0" max="{len(frames) - 1}" value="0" style="width:60%"> <span id="info"></span>
<div id="out"></div>
<script id="data" type="application/json">{payload}</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent), S = document.getElementById("step");
const esc = s => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");
function show(k) {{
  S.value = k; const f = D.frames[k];
  document.getElementById("info").textContent = `step ${{k}}/${{D.frames.length - 1}}  t = ${{f.t.toFixed(3)}}  ${{f.revealed}}% revealed`;
  document.getElementById("out").innerHTML = D.samples.map(s => "<pre>" + s.tokens.map((w, i) => {{
    const r = s.revealed_at[i];
    return r < 0 ? `<span class="g">${{esc(w)}}</span>` : r > k ? '<span class="m">░</span>' : r == k ? `<span class="n">${{esc(w)}}</span>` : esc(w);
  }}).join("") + "</pre>").join("");
}}
let playing = true, k = 0;
document.getElementById("play").onclick = e => {{ playing = !playing; e.target.textContent = playing ? "pause" : "play"; }};
S.oninput = () => show(k = +S.value);
setInterval(() => {{ if (playing) show(k = (k + 1) % D.frames.length); }}, 80);
show(0);
</script>
"""
  with open(path, "w", encoding="utf-8") as f: f.write(page)

def reverse_process(model, init:np.ndarray, args):
  """The sampler for this checkpoint: the reverse diffusion from the masks in init, or the autoregressive twin left to right."""
  x, cfg = Tensor(np.tile(init, (args.num_samples, 1)).astype(np.int32)), model.cfg
  if cfg.causal: return diffusion.sample_ar(model, x, cfg.mask_id, args.temperature, args.top_p)
  return diffusion.sample(model, x, cfg.mask_id, args.steps, args.schedule, args.sampler, cache=not cfg.time_cond and args.sampler == "ancestral",
                          temperature=args.temperature, top_p=args.top_p)

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

def load_judge(args, keep):
  judge, judge_keep, _ = load(args.judge) if args.judge else (None, keep, None)
  if judge is not None and not judge.cfg.causal: raise ValueError(f"--judge {args.judge} is not an autoregressive twin: train one with `python train.py --causal`")
  if judge_keep != keep: raise ValueError(f"--judge {args.judge} has another vocabulary than {args.ckpt}: train both on the same --data and --vocab-size")
  return judge

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

def sweep(args, model, init) -> list[tuple[np.ndarray, dict]]:
  """--quality --sweep: the same prompt through each (sampler, temperature, top-p, steps) of SWEEP, the quality table."""
  runs = []
  for sampler, temperature, top_p, steps in SWEEP:
    a = argparse.Namespace(**{**vars(args), "sampler": sampler, "temperature": temperature, "top_p": top_p, "steps": steps})
    Tensor.manual_seed(args.seed); t0 = time.perf_counter()
    for xs, _, nfe in reverse_process(model, init, a): pass
    runs.append((xs.numpy(), {"sampler": sampler, "temperature": temperature, "top_p": top_p, "steps": steps, "nfe": nfe, "seconds": round(time.perf_counter() - t0, 2)}))
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
  p.add_argument("--length", type=int, help="tokens per sample (default: the model's context, or the infilling template)")
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
  args = p.parse_args(argv)
  prefer_cpu_backend()
  for name in ("num_samples", "steps", "fps"):
    if getattr(args, name) <= 0: p.error(f"--{name.replace('_', '-')} must be > 0")
  if args.length is not None and args.length <= 0: p.error("--length must be > 0")
  if args.temperature < 0 or not 0 < args.top_p <= 1: p.error("--temperature must be >= 0 and --top-p in (0, 1]")
  if args.sweep and not args.quality: p.error("--sweep needs --quality (and --judge for generative perplexity)")

  try:
    model, keep, run_args = load(args.ckpt)
    cfg = model.cfg
    if args.length and args.length > cfg.seq_len: raise ValueError(f"--length {args.length} is more than the model context ({cfg.seq_len})")
    init = template(args.prompt, keep, args.length, cfg.seq_len, cfg.mask_id)
    if args.sweep and cfg.causal: raise ValueError(f"--sweep compares diffusion samplers: {args.ckpt} is an autoregressive twin (pass it as --judge)")
    judge = load_judge(args, keep) if args.quality else None  # a bad --judge is said before any sampling
  except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")
  if args.sweep:  # the quality table instead of one run
    runs = sweep(args, model, init)
    args.temperature, args.top_p = 1.0, 1.0  # the judge's own samples, the reference row: its plain distribution
    try: return plot(report(args, model, keep, run_args, runs, judge), args.sweep)
    except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")

  Tensor.manual_seed(args.seed)
  skip = int(cfg.causal and init[0] == cfg.mask_id)
  if skip: init[0] = vocab.eot(keep)  # the autoregressive twin starts after an end of text, as a story does (not shown)
  gen = init == cfg.mask_id
  if cfg.causal: args.steps = int(gen.sum())  # left to right: one step, and one network evaluation, per token
  revealed_at = np.where(gen, args.steps + 1, -1)[None].repeat(args.num_samples, 0)
  frames, steps = [{"t": 1.0, "revealed": 0}], reverse_process(model, init, args)
  tty, t0, nfe = sys.stdout.isatty(), time.perf_counter(), 0
  snapshots = set(np.linspace(0, args.steps, 6).round().astype(int).tolist())
  for k, (xs, s, nfe) in enumerate(steps, start=1):
    xs = xs.numpy()
    revealed_at[(revealed_at > args.steps) & (xs != cfg.mask_id)] = k
    frames.append({"t": s, "revealed": round(100 * float((xs[:, gen] != cfg.mask_id).mean()) if gen.any() else 100, 1)})
    if args.visualize and (tty or k in snapshots):
      head = f"step {k}/{args.steps}  t = {s:.3f}  {frames[-1]['revealed']}% revealed  NFE {nfe}"
      body = "\n\n".join(frame_text(xs[i, skip:], revealed_at[i, skip:], k, keep, cfg.mask_id, tty) for i in range(len(xs)))
      print(("\x1b[H\x1b[J" if tty else "") + head + "\n" + body + ("\n" if tty else "\n" + "-" * 40), flush=True)
      if tty: time.sleep(1 / args.fps)
  wall = time.perf_counter() - t0
  if not args.visualize:
    for i in range(len(xs)): print(vocab.decode(xs[i, skip:], keep) + ("\n" + "-" * 40 if i < len(xs) - 1 else ""))
  if args.html: write_html(args.html, list(zip(xs[:, skip:], revealed_at[:, skip:])), frames, keep, cfg.mask_id)
  if args.quality:
    extra = {"sampler": "autoregressive" if cfg.causal else args.sampler, "temperature": args.temperature, "top_p": args.top_p, "steps": args.steps, "nfe": nfe, "seconds": round(wall, 2)}
    try: report(args, model, keep, run_args, [(xs[:, skip:], extra)], judge)
    except (DataError, ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")
  print(f"{args.num_samples} x {len(init)} tokens | {args.steps} steps | NFE {nfe} | {wall:.1f} s"
        f"{' (with animation delays)' if args.visualize and tty else ''} | {args.num_samples * gen.sum() / wall:,.0f} tokens/s", file=sys.stderr)

if __name__ == "__main__": main()
