"""Showing runs and samples: the reverse process as terminal frames and as a self-contained HTML page, and line plots
as SVG (the learning curve, the quality plot). Tokens never change once revealed, so a sampled text is shown as its
final tokens plus, for each position, the step that revealed it (revealed_at; -1: given by the prompt)."""
import json, math, re, shutil, time, unicodedata
import numpy as np
from data import vocab

# control characters a token can hold (GPT-2 has a token for each byte) as the symbols for them: a backspace or an
# escape written as is would edit the terminal's screen instead of showing the text
VISIBLE = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421} | {c: 0xFFFD for c in range(0x80, 0xA0)}

def printable(text:str) -> str: return text.translate(VISIBLE)

def rows_needed(text:str, columns:int) -> int:
  """Terminal rows that text takes in a window `columns` wide (escape sequences take none, wide characters two)."""
  plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
  width = lambda line: sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in line)
  return sum(max(1, -(-width(line) // columns)) for line in plain.split("\n"))

def frame_text(tokens, revealed_at, step:int, keep, mask_id:int, color:bool, end:int|None=None) -> str:
  """One sequence at one step: masks as dim ░, tokens revealed in this step highlighted, from the end of text on grey."""
  kind = np.where(revealed_at < 0, 0, np.where(revealed_at < step, 1, np.where(revealed_at == step, 2, 3)))  # given, old, new, masked
  kind = np.where((np.arange(len(tokens)) >= (len(tokens) if end is None else end)) & (kind != 3), 4, kind)  # after the end
  out, start = [], 0
  for i in range(1, len(tokens) + 1):
    if i == len(tokens) or kind[i] != kind[start]:
      text = printable(vocab.decode(tokens[start:i] if kind[start] != 3 else [mask_id] * (i - start), keep))
      style = {0: "\x1b[1m", 1: "", 2: "\x1b[1;32m", 3: "\x1b[2m", 4: "\x1b[90m"}[kind[start]]
      out.append(f"{style}{text}\x1b[0m" if color and style else text)
      start = i
  return "".join(out)

def show(label:str, texts, first:int, gen, keep, mask_id:int, animate:bool, fps:float) -> bool:
  """One frame of --visualize or --race: animated (redrawn in place in a terminal) or a plain snapshot. texts: (title,
  tokens, revealed_at, step) per text; tokens from `first` on are shown, each up to the end of its story. Returns
  whether the next frame can be animated: False once a frame is taller than the window (it would scroll and leave
  old frames behind), and the frame is then printed as a snapshot."""
  body = "\n\n".join((title + "\n" if title else "") + frame_text(x[first:], ra[first:], k, keep, mask_id, animate,
                                                                 (e := vocab.story_end(x, ~gen, keep)) and e - first)
                     for title, x, ra, k in texts)
  size = shutil.get_terminal_size()
  if animate and rows_needed(label + "\n" + body, size.columns) >= size.lines:
    print(f"(the samples are taller than this {size.lines}-line window: snapshots instead of an animation)", flush=True)
    animate = False
  print(("\x1b[H\x1b[J" if animate else "") + label + "\n" + body + ("\n" if animate else "\n" + "-" * 40), flush=True)
  if animate: time.sleep(1 / fps)
  return animate

def write_html(path:str, runs, labels:list[str], keep):
  """A single page, no external assets: play/pause and a slider over the recorded frames. runs: (title, tokens,
  revealed_at, end) per text, revealed_at counted in frames."""
  data = {"labels": labels, "samples": [{"title": title, "tokens": vocab.token_texts(tokens, keep),
                                         "revealed_at": revealed_at.tolist(), "end": len(tokens) if end is None else end}
                                        for title, tokens, revealed_at, end in runs]}
  payload = json.dumps(data).replace("<", "\\u003c")  # inside <script> only "</script>" could break out
  page = f"""<!doctype html><meta charset="utf-8"><title>tinymdlm: denoising</title>
<style>body{{font:16px/1.5 Georgia,serif;max-width:46em;margin:2em auto}}pre{{white-space:pre-wrap;overflow-wrap:anywhere}}.m{{color:#bbb}}
.n{{background:#c8f7c5}}.g{{font-weight:bold}}.e{{color:#aaa}}</style>
<h3>tinymdlm: text condensing out of [MASK]s</h3>
<button id="play">pause</button> <input id="step" type="range" min="0" max="{len(labels) - 1}" value="0" style="width:60%">
<div id="info"></div>
<div id="out"></div>
<script id="data" type="application/json">{payload}</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent), S = document.getElementById("step");
const esc = s => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");
function show(k) {{
  S.value = k; document.getElementById("info").textContent = D.labels[k];
  document.getElementById("out").innerHTML = D.samples.map(s => (s.title ? `<h4>${{esc(s.title)}}</h4>` : "") + "<pre>" +
    s.tokens.map((w, i) => {{
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

COLORS = ["#c33", "#36c", "#393", "#c93", "#939", "#399", "#666", "#960"]

def line_plot(path:str, lines:list[tuple[str, list[tuple[float, float]], str, float]], x_label:str, y_label:str,
              log:bool=False):
  """An SVG of polylines (no plotting library): lines are (name, [(x, y), ...], colour, stroke width), drawn over a
  shared scale (log-log with log=True), the names as a legend on the right."""
  pts = [p for _, line, _, _ in lines for p in line]
  f = math.log if log else (lambda v: v)
  (x0, x1), (y0, y1) = (f(min(x for x, _ in pts)), f(max(x for x, _ in pts))), (f(min(y for _, y in pts)), f(max(y for _, y in pts)))
  W, H, m, legend = 640, 360, 48, 160
  X = lambda x: m + (W - 2 * m - legend) * (f(x) - x0) / ((x1 - x0) or 1)
  Y = lambda y: H - m - (H - 2 * m) * (f(y) - y0) / ((y1 - y0) or 1)
  lo, hi = min(y for _, y in pts), max(y for _, y in pts)
  svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/><path d="M{m},{m}V{H - m}H{W - m - legend}" fill="none" stroke="#444"/>',
         f'<text x="{m}" y="{m - 8}">{y_label}</text><text x="{W - m - legend}" y="{H - m + 16}" text-anchor="end">{x_label}</text>',
         f'<text x="4" y="{Y(hi) + 4:.0f}">{hi:.3g}</text><text x="4" y="{Y(lo) + 4:.0f}">{lo:.3g}</text>']
  for i, (label, line, color, width) in enumerate(lines):
    svg += [f'<polyline points="{" ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in sorted(line))}" fill="none" '
            f'stroke="{color}" stroke-width="{width}"/>', f'<text x="{W - m - legend + 10}" y="{m + 16 * i}" fill="{color}">{label}</text>']
  with open(path, "w") as f_out: f_out.write("\n".join(svg + ["</svg>"]))
