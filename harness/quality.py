"""Sample quality, as the field measures it, for a set of texts, each figure a mean ± standard error over the texts:
generative perplexity under an autoregressive judge, the entropy of each text's own token frequencies, the share of
distinct 4-grams and of 8-grams copied from the training split. `sample.py --quality` prints them (`score`);
`--sweep` runs the quality table (SWEEP) and plots it."""
import argparse, json, math, sys, time
import numpy as np
from tinygrad import Tensor
import diffusion
from data import vocab
from harness.display import COLORS, line_plot

def ngrams(ids, n:int) -> np.ndarray:
  """One uint64 per n-gram of ids (each < 2^16): 4 tokens pack exactly into one, longer n-grams are hashed from their
  4-token parts (a false match has odds ~1e-13 per lookup)."""
  w, h = np.lib.stride_tricks.sliding_window_view(np.asarray(ids, np.uint64), n), np.uint64(0)
  for j in range(0, n, 4):
    shifts = np.arange(0, 64, 16, dtype=np.uint64)[:min(4, n - j)]
    h = h * np.uint64(0x9E3779B97F4A7C15) ^ (w[:, j:j + 4] << shifts).sum(-1)
  return h

def entropy(ids) -> float:
  """Entropy of a text's own token frequencies (nats): repetitive text has little, and games generative perplexity."""
  p = np.unique(ids, return_counts=True)[1] / len(ids)
  return float(-(p * np.log(p)).sum())

def distinct(ids, n:int=4) -> float: return len(np.unique(ngrams(ids, n))) / (len(ids) - n + 1)  # 1 − repetition

def copied(ids, train_grams:np.ndarray, n:int=8) -> float:
  """The share of a text's n-grams that occur somewhere in the training split (train_grams:
  np.unique(ngrams(train, n)), sorted: looked up by bisection, not sorted again for each text as np.isin would)."""
  grams = ngrams(ids, n)
  if len(train_grams) == 0: return 0.0  # nothing to copy from
  return float((train_grams[np.searchsorted(train_grams, grams).clip(0, len(train_grams) - 1)] == grams).mean())

def judge_nll(judge, texts:np.ndarray, start:int) -> np.ndarray:
  """Each text's NLL per token under an autoregressive judge that reads it after `start` (an end of text)."""
  x = np.concatenate([np.full((len(texts), 1), start), texts], 1)[:, :judge.cfg.seq_len + 1]
  return diffusion.ar_nll(judge, Tensor(x.astype(np.int32))).numpy()

def mean_se(v) -> list[float]:
  v = np.asarray(v, np.float64)
  return [round(float(v.mean()), 4), round(float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0, 4)]

def quality(texts:np.ndarray, judge, start:int, train_grams:np.ndarray) -> dict:
  """The figures of texts (N, L), each [mean, standard error]; generative perplexity only with a judge."""
  q = {"entropy": mean_se([entropy(t) for t in texts]), "distinct4": mean_se([distinct(t) for t in texts]),
       "copied8": mean_se([copied(t, train_grams) for t in texts])}
  if judge is not None:
    nll = mean_se(judge_nll(judge, texts, start))
    q |= {"judge_nll": nll, "gen_ppl": [round(math.exp(nll[0]), 2), round(math.exp(nll[0]) * nll[1], 2)]}  # delta
  return q

def report(runs:list[tuple[np.ndarray, dict]], judge, keep, ds:dict, own:tuple|None=None) -> list[dict]:
  """The figures of each run's samples (texts (N, L), their settings), then of as many windows of held-out text and, if
  given, of the judge's own samples: a line each on stderr for people, a JSON line each on stdout for scripts."""
  grams = np.unique(ngrams(vocab.to_compact(ds["train"][:50_000_000], keep), 8))  # the first 50M tokens of large data
  L, start, n = runs[0][0].shape[1], vocab.eot(keep), len(runs[0][0])
  held_out = vocab.to_compact(np.asarray(ds["val"][:n * L]), keep).reshape(-1, L)
  rows = [("samples", *run) for run in runs] + [("validation text", held_out, {})]
  if own is not None: rows.append(("judge's own samples", *own))
  scored = [(name, texts, extra, quality(texts, judge, start, grams)) for name, texts, extra in rows]
  text = scored[len(runs)][3]  # held-out text: each figure of the others is also given as a ratio to its
  out = []
  for name, texts, extra, q in scored:
    ratios = {k: round(v[0] / text[k][0], 3) for k, v in q.items() if text[k][0]} if name != "validation text" else {}
    cols = [f"{k} {v[0]:.3f} ± {v[1]:.3f}" + (f" ({ratios[k]:.2f}x text)" if k in ratios else "")
            for k, v in q.items() if k != "judge_nll"]
    settings = "".join(f" {k} {v}" for k, v in extra.items() if k not in ("seconds",))
    print(f"{name:>20} (n={len(texts)}){settings}: " + " | ".join(cols), file=sys.stderr)
    out.append({"rows": name, **extra, **q, "vs_text": ratios})
    print(json.dumps(out[-1]), flush=True)
  return out

def settings(args) -> dict:
  """The sampler settings of a run, as the table lists them."""
  return {"sampler": args.sampler, "steps": args.steps, "temperature": args.temperature, "top_p": args.top_p,
          **{k: getattr(args, k) for k in diffusion.SAMPLERS[args.sampler].options}}

def nfe_per_sample(states:np.ndarray, nfes:list[int], mask_id:int) -> float:
  """The network evaluations each sample needed: those until it had no mask left (an adaptive sampler stops early for
  some), averaged over the samples; states (frames, N, L), nfes the NFE after each frame."""
  done = (states == mask_id).any(-1).argmin(0)  # the first frame without a mask, per sample
  return float(np.mean([nfes[k] if not (states[k, i] == mask_id).any() else nfes[-1] for i, k in enumerate(done)]))

def score(args, s, run:tuple, seconds:float) -> list[dict]:
  """--quality: the figures of a run's final samples (run: side, states, NFE after each, as sample.py records them), of
  as much held-out text, and of the judge's own samples (at --temperature, --top-p)."""
  _, states, nfes = run
  print(f"scoring {len(states[-1])} samples under the judge, with its own and held-out text for reference...",
        file=sys.stderr, flush=True)
  extra = {"nfe": nfes[-1], "nfe_per_sample": nfe_per_sample(states, nfes, s.model.cfg.mask_id), "seconds": seconds}
  Tensor.manual_seed(args.seed)
  n = min(len(s.init) - s.first, s.judge.cfg.seq_len - 1)  # as long as the samples
  start = np.tile(np.r_[vocab.eot(s.keep), np.full(n, s.judge.cfg.mask_id)].astype(np.int32), (args.num_samples, 1))
  *_, (xs, _, nfe) = diffusion.sample_ar(s.judge, Tensor(start), s.judge.cfg.mask_id, args.temperature, args.top_p)
  own = (xs.numpy()[:, 1:], {"temperature": args.temperature, "top_p": args.top_p, "nfe": nfe})
  return report([(states[-1][:, s.first:], settings(args) | extra)], s.judge, s.keep, s.ds, own)

def setting(sampler:str, steps:int, temperature:float=1.0, top_p:float=1.0, **options) -> dict:
  return dict(sampler=sampler, steps=steps, temperature=temperature, top_p=top_p, **options)

SWEEP = ([setting("ancestral", n) for n in (32, 128)] + [setting("ancestral", n, 0.8, 0.9) for n in (16, 32, 128)] +
         [setting("confidence", n, choice_noise=c) for c in (0.0, 2.0, 4.0) for n in (16, 32)] +
         [setting("confidence", 32, choice_noise=c) for c in (1.0, 3.0)] +
         [setting("threshold", 128, tau=tau) for tau in (0.3, 0.5, 0.7, 0.9)] +
         [setting("threshold", 128, 0.8, 0.9, tau=tau) for tau in (0.5, 0.7)] +
         [setting("remdm", n, eta=0.02, t_on=0.55, t_off=0.05) for n in (32, 128)] +
         [setting("remdm", n, 0.8, 0.9, eta=0.02, t_on=0.55, t_off=0.05) for n in (32, 128)])

def sweep(args, s, reverse_process) -> list[dict]:
  """--sweep: the same prompt through each SWEEP setting, scored, and plotted into args.sweep."""
  runs = []
  for i, setting in enumerate(SWEEP):
    print(f"setting {i + 1}/{len(SWEEP)}: " + ", ".join(f"{k} {v}" for k, v in setting.items()), file=sys.stderr,
          flush=True)  # a cell takes up to minutes on a CPU
    a = argparse.Namespace(**{**vars(args), **setting})
    Tensor.manual_seed(args.seed); t0 = time.perf_counter()
    states, nfes = [np.tile(s.init, (args.num_samples, 1))], [0]
    for xs, _, nfe in reverse_process(s.model, s.init, a): states.append(xs.numpy()); nfes.append(nfe)
    states = np.stack(states)
    runs.append((states[-1][:, s.first:], {**setting, "nfe": nfes[-1], "seconds": round(time.perf_counter() - t0, 2),
                                            "nfe_per_sample": nfe_per_sample(states, nfes, s.model.cfg.mask_id)}))
  args.temperature, args.top_p = 1.0, 1.0  # the judge's own samples, the reference row, at temperature 1
  rows = report(runs, s.judge, s.keep, s.ds, None)
  plot(rows, args.sweep)
  return rows

def plot(rows:list[dict], svg_path:str):
  """Generative perplexity against network evaluations per sample, one line per sampler setting (an adaptive sampler's
  across its option), a dot per cell (log-log), as an SVG."""
  series = {}
  for r in rows:
    if r["rows"] == "samples":
      entry = diffusion.SAMPLERS[r["sampler"]]  # an adaptive sampler's option sets its NFE: one line across its values
      options = "".join(f" {k}={r[k]:g}" for k in entry.options if k in r and not entry.adaptive)
      series.setdefault(f"{r['sampler']} T={r['temperature']} p={r['top_p']}{options}", []).append(
        (r.get("nfe_per_sample", r["nfe"]), r["gen_ppl"][0]))
  lines = [(name, pts, COLORS[i % len(COLORS)], 2) for i, (name, pts) in enumerate(series.items())]
  line_plot(svg_path, lines, "network evaluations per sample (log)", "generative perplexity (log)", log=True, dots=True)
