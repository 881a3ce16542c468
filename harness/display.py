"""Showing runs and samples: a training run's line of progress and its learning curve, the reverse process as
terminal frames and as a self-contained HTML page, and line plots as SVG (the learning curve, the quality plot)."""
import json, math, os, re, shutil, sys, time, unicodedata
import numpy as np
from data import vocab

# control characters a token can hold (GPT-2 has a token for each byte) as the symbols for them: a backspace or an
# escape written as is would edit the terminal's screen instead of showing the text
VISIBLE = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421} | \
          {c: 0xFFFD for c in range(0x80, 0xA0)}

def printable(text:str) -> str: return text.translate(VISIBLE)

def rows_needed(text:str, columns:int) -> int:
  """Terminal rows that text takes in a window `columns` wide (escape sequences take none, wide characters two)."""
  plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
  width = lambda line: sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in line)
  return sum(max(1, -(-width(line) // columns)) for line in plain.split("\n"))

# what a position is in a frame, and its style in a terminal: given by the prompt, revealed before, revealed in this
# frame, masked, masked again in this frame (a remasking sampler), after the story's end
GIVEN, OLD, NEW, MASKED, REMASKED, AFTER = range(6)
STYLE = {GIVEN: "\x1b[1m", OLD: "", NEW: "\x1b[1;32m", MASKED: "\x1b[2m", REMASKED: "\x1b[31m", AFTER: "\x1b[90m"}

def kinds(now, before, given, mask_id:int, end:int|None) -> np.ndarray:
  """Each position's kind in a frame, from its tokens now and in the frame before."""
  masked = now == mask_id
  k = np.where(given, GIVEN, np.where(masked, np.where(before != mask_id, REMASKED, MASKED),
                                      np.where(before == mask_id, NEW, OLD)))
  return np.where((np.arange(len(now)) >= (len(now) if end is None else end)) & ~masked, AFTER, k)

def frame_text(now, before, given, keep, mask_id:int, color:bool, end:int|None=None) -> str:
  """One sequence in one frame: masks as dim ░ (red where masked again), tokens revealed in this frame highlighted, the
  prompt bold, from the end of text on grey."""
  kind, out, start = kinds(now, before, given, mask_id, end), [], 0
  for i in range(1, len(now) + 1):
    if i == len(now) or kind[i] != kind[start]:
      text = printable(vocab.decode(now[start:i] if kind[start] not in (MASKED, REMASKED) else [mask_id] * (i - start),
                                    keep))
      out.append(f"{STYLE[kind[start]]}{text}\x1b[0m" if color and STYLE[kind[start]] else text)
      start = i
  return "".join(out)

def show(label:str, texts, first:int, gen, keep, mask_id:int, animate:bool, fps:float) -> bool:
  """One frame of --visualize or --race: animated (redrawn in place in a terminal) or a plain snapshot. texts: (title,
  states now (N, L), states in the frame before) per side; tokens from `first` on are shown, each up to the end of its
  story. Returns whether the next frame can be animated: False once a frame is taller than the window (it would scroll
  and leave old frames behind), and the frame is then printed as a snapshot."""
  body = "\n\n".join((title + "\n" if title else "") + frame_text(x[first:], b[first:], ~gen[first:], keep, mask_id,
                       animate, (e := vocab.story_end(x, ~gen, keep)) and e - first)
                       for title, xs, before in texts for x, b in zip(xs, before))
  size = shutil.get_terminal_size()
  if animate and rows_needed(label + "\n" + body, size.columns) >= size.lines:
    print(f"(the samples are taller than this {size.lines}-line window: snapshots instead of an animation)", flush=True)
    animate = False
  print(("\x1b[H\x1b[J" if animate else "") + label + "\n" + body + ("\n" if animate else "\n" + "-" * 40), flush=True)
  if animate: time.sleep(1 / fps)
  return animate

def by_evaluation(recorded:list) -> tuple[list, list[str]]:
  """A race's sides (name, states (frames, N, L), NFE after each frame) as frames of one network evaluation each: a
  side's state after k of them (its last once done), and the frames' labels."""
  total = max(nfes[-1] for *_, nfes in recorded)
  frames = [(side, xs[[max(i for i, n in enumerate(nfes) if n <= k) for k in range(total + 1)]],
             [min(k, nfes[-1]) for k in range(total + 1)]) for side, xs, nfes in recorded]
  labels = [f"NFE {k}: " + " · ".join(f"{side} {min(k, nfes[-1])}{' (done)' * (k >= nfes[-1])}"
                                       for side, _, nfes in recorded) for k in range(total + 1)]
  return frames, labels

def check_writable(path:str|None):
  """Raises ValueError, before any sampling, where a page or a plot cannot be written to `path`."""
  if not path: return
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path): raise ValueError(f"{path} is a directory: name a file in it")
  if not os.path.isdir(folder): raise ValueError(f"cannot write {path}: the directory {folder} does not exist")
  if not os.access(folder, os.W_OK): raise ValueError(f"cannot write {path}: {folder} is not writable")

def write_html(path:str, samples, labels:list[str], first:int, given, keep, mask_id:int):
  """A single page, no external assets: play/pause and a slider over the recorded frames, with a legend. samples:
  (title, states (frames, L), end) per text; each frame is stored as the positions that changed from the one before."""
  data = {"labels": labels, "samples": []}
  for title, frames, end in samples:
    frames = frames[:, first:]
    diffs = [[[int(i), None if f[i] == mask_id else text] for i, text in enumerate(vocab.token_texts(f, keep))
              if k == 0 or f[i] != frames[k - 1][i]] for k, f in enumerate(frames)]
    data["samples"].append({"title": title, "frames": diffs, "given": given[first:].tolist(),
                            "end": len(frames[0]) if end is None else end - first})
  payload = json.dumps(data).replace("<", "\\u003c")  # inside <script> only "</script>" could break out
  text = PAGE.replace("LAST", str(len(labels) - 1)).replace("PAYLOAD", payload)
  try:
    with open(path, "w", encoding="utf-8") as f: f.write(text)
  except OSError as e: raise ValueError(f"cannot write {path}: {e.strerror}") from None

PAGE = """<!doctype html><meta charset="utf-8"><title>tinymdlm: denoising</title>
<style>body{font:16px/1.5 Georgia,serif;max-width:46em;margin:2em auto}pre{white-space:pre-wrap;overflow-wrap:anywhere}
.m{color:#bbb}.r{color:#c33}.n{background:#c8f7c5}.g{font-weight:bold}.e{color:#aaa}
.legend span{margin-right:1em}</style>
<h3>tinymdlm: text condensing out of [MASK]s</h3>
<button id="play">pause</button> <input id="step" type="range" min="0" max="LAST" value="0" style="width:60%">
<div id="info"></div>
<div class="legend"><span class="m">░ masked</span><span class="n">revealed in this step</span>
<span class="r">░ masked again</span><span class="g">given (the prompt)</span>
<span class="e">after the story's end</span></div>
<div id="out"></div>
<script id="data" type="application/json">PAYLOAD</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent), S = document.getElementById("step");
const esc = s => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");
for (const s of D.samples) {  // each frame's text per position, from the changes
  s.states = []; let cur = [];
  for (const diff of s.frames) { cur = cur.slice(); for (const [i, t] of diff) cur[i] = t; s.states.push(cur); }
}
function show(k) {
  S.value = k; document.getElementById("info").textContent = D.labels[k];
  document.getElementById("out").innerHTML = D.samples.map(s => {
    const last = s.states.length - 1, now = s.states[Math.min(k, last)];
    const before = s.states[Math.max(0, Math.min(k, last) - 1)];
    return (s.title ? `<h4>${esc(s.title)}</h4>` : "") + "<pre>" + now.map((w, i) => {
      if (w === null) return `<span class="${before[i] !== null && k > 0 ? "r" : "m"}">░</span>`;
      const c = s.given[i] ? "g" : i >= s.end ? "e" : before[i] === null && k > 0 ? "n" : "";
      return c ? `<span class="${c}">${esc(w)}</span>` : esc(w);
    }).join("") + "</pre>";
  }).join("");
}
let playing = true, k = 0;
const button = document.getElementById("play");
button.onclick = () => {
  playing = !playing; if (playing && k == D.labels.length - 1) k = 0;
  button.textContent = playing ? "pause" : "play";
};
S.oninput = () => show(k = +S.value);
setInterval(() => {  // plays once, then rests on the finished story
  if (!playing) return;
  if (k == D.labels.length - 1) { playing = false; button.textContent = "play"; return; }
  show(++k);
}, 80);
show(0);
</script>
"""

COLORS = ["#c33", "#36c", "#393", "#c93", "#939", "#399", "#666", "#960"]

def line_plot(path:str, lines:list[tuple[str, list[tuple[float, float]], str, float]], x_label:str, y_label:str,
              log:bool=False, dots:bool=False):
  """An SVG of polylines (no plotting library): lines are (name, [(x, y), ...], colour, stroke width), drawn over a
  shared scale (log-log with log=True), a dot at each point with dots=True, the names as a legend on the right."""
  pts = [p for _, line, _, _ in lines for p in line]
  f = math.log if log else (lambda v: v)
  (x0, x1) = f(min(x for x, _ in pts)), f(max(x for x, _ in pts))
  (y0, y1) = f(min(y for _, y in pts)), f(max(y for _, y in pts))
  W, H, m, legend = 640, 360, 48, 160
  X = lambda x: m + (W - 2 * m - legend) * (f(x) - x0) / ((x1 - x0) or 1)
  Y = lambda y: H - m - (H - 2 * m) * (f(y) - y0) / ((y1 - y0) or 1)
  lo, hi = min(y for _, y in pts), max(y for _, y in pts)
  svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<path d="M{m},{m}V{H - m}H{W - m - legend}" fill="none" stroke="#444"/>',
         f'<text x="{m}" y="{m - 8}">{y_label}</text>',
         f'<text x="{W - m - legend}" y="{H - m + 16}" text-anchor="end">{x_label}</text>',
         f'<text x="4" y="{Y(hi) + 4:.0f}">{hi:.3g}</text><text x="4" y="{Y(lo) + 4:.0f}">{lo:.3g}</text>']
  for i, (label, line, color, width) in enumerate(lines):
    svg += [f'<polyline points="{" ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in sorted(line))}" fill="none" '
            f'stroke="{color}" stroke-width="{width}"/>',
            f'<text x="{W - m - legend + 10}" y="{m + 16 * i}" fill="{color}">{label}</text>']
    svg += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{color}"/>' for x, y in line if dots]
  with open(path, "w") as f_out: f_out.write("\n".join(svg + ["</svg>"]))


class Progress:
  """A training run's line of progress (redrawn in place in a terminal, cut to its width; every 10th step in a log) and
  the log row of each step. Speed and ETA only once measured: a process's first two steps compile kernels."""
  def __init__(self, steps:int, tokens_per_step:int, meta:dict|None):
    self.steps, self.per_step, self.tty = steps, tokens_per_step, sys.stdout.isatty()
    self.tokens, self.elapsed = (meta["tokens"], meta["elapsed_s"]) if meta else (0, 0.0)
    self.done, self.timed_tokens, self.timed_s = 0, 0, 0.0  # steps of this process, and those timed

  @property
  def compiling(self) -> bool: return self.done < 2

  def step(self, step:int, loss:float, lr:float, dt:float) -> dict:
    self.done, self.tokens, self.elapsed = self.done + 1, self.tokens + self.per_step, self.elapsed + dt
    if self.done > 2: self.timed_tokens, self.timed_s = self.timed_tokens + self.per_step, self.timed_s + dt
    tok_s = self.timed_tokens / self.timed_s if self.timed_s else 0.0
    eta = (self.steps - step) * self.per_step / tok_s if tok_s else 0
    speed = f"{tok_s:,.0f} tok/s | ETA {eta // 60:.0f}m{eta % 60:02.0f}s" if tok_s else \
            f"compiling: {dt:.0f} s (speed and ETA from step {step - self.done + 3})"
    line = f"step {step}/{self.steps} | loss {loss:.4f} | lr {lr:.2e} | {speed}"
    if self.tty: print("\r" + line[:shutil.get_terminal_size().columns - 1] + "\x1b[K", end="", flush=True)
    elif step % 10 == 0 or self.done <= 3: print(line, flush=True)
    return {"step": step, "tokens": self.tokens, "train_loss": round(loss, 4), "val_nelbo": None, "val_nelbo_se": None,
            "val_ppl": None, "eval_s": None, "lr": lr, "tok_per_s": round(tok_s, 1),
            "elapsed_s": round(self.elapsed, 2)}

  def say(self, text:str, transient:bool=False):
    """A line of its own (in a terminal, over the progress line); transient: replaced by the next one."""
    if not self.tty: return print(text, flush=True)
    print("\r\x1b[K" + text, end="" if transient else "\n", flush=True)

def validation(row:dict, causal:bool) -> str:
  v, se, ppl = row["val_nelbo"], row["val_nelbo_se"], row["val_ppl"]
  return f"step {row['step']}: val " + (f"NLL {v:.4f} nats/token, perplexity {ppl:.2f}" if causal else
                                         f"NELBO {v:.4f} ± {se:.4f} nats/token, perplexity <= {ppl:.2f}") + \
         f" ({row['eval_s']:.0f} s)"

def learning_curve(log_path:str, svg_path:str):
  """log.jsonl as an SVG: training loss, smoothed, and validation NELBO in nats/token by step."""
  rows = [json.loads(line) for line in open(log_path)]
  train, val, avg = [], [(r["step"], r["val_nelbo"]) for r in rows if r["val_nelbo"] is not None], rows[0]["train_loss"]
  for r in rows: avg = 0.95 * avg + 0.05 * r["train_loss"]; train.append((r["step"], avg))
  line_plot(svg_path, [("train loss (smoothed)", train, "#999", 1), ("validation NELBO", val, "#c33", 2)],
            f"step {rows[-1]['step']}", "nats/token")
