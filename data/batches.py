"""Model inputs from a token stream. Stories are packed back to back, each followed by EOT. Training windows either
start anywhere ("random": a window may open mid-sentence) or, half of them, at a story: the EOT that ends the previous
story at position 0 and the story from position 1, so that a sampler that puts EOT first is asking for a story from its
beginning (the other half still start anywhere: most stories are longer than a small model's context, and their middles
and ends, which blockwise generation continues from, would otherwise never be seen). "padded": after a story's EOT the
window holds EOT to its end instead of the next story (a lower validation NELBO, but a model trained so reads EOT as
"EOT follows" and ends many samples at their first token; BENCHMARKS.md)."""
import numpy as np
from data import DataError
from data.tokenizer import EOT

WINDOWS = ("stories", "padded", "random")
ALIGNED = 0.5  # the share of story-aligned windows, where windows != "random"

def windows_of(run_args:dict) -> str:
  """The windows a run trained on, from its saved settings (runs from before --windows drew them anywhere)."""
  return run_args.get("windows") or "random"

def reads_after_eot(run_args:dict) -> bool:
  """Whether a model reads a story as what follows an end of text, so that sampling puts one first: it was trained on
  story-aligned windows, or it is the autoregressive twin (its windows run on from an EOT as often as anything else)."""
  return bool(run_args.get("causal")) or windows_of(run_args) != "random"

def windows_fit(tokens, seq_len):
  """Raise if the stream can't fill one window: a smaller seq_len or more text is needed."""
  if len(tokens) < seq_len:
    raise DataError(f"the token stream has {len(tokens)} tokens, fewer than one window of {seq_len}: lower seq_len or "
                    "use more text")

def check_enough(ds, train_window:int, val_window:int, data:str, preset:str):
  """The data must fill a training window and a validation window: else say how much text that is."""
  if len(ds["train"]) < train_window or len(ds["val"]) < val_window:
    total = 20 * train_window  # a file of one's own: its last 5% is held out for validation
    raise DataError(f"--data {data} gives {len(ds['train']):,} training and {len(ds['val']):,} validation tokens, too "
                    f"few for windows of {train_window} tokens (preset {preset}): give it at least {total:,} tokens, "
                    f"about {total * 4 // 1000 + 1} KB of English text, or lower --seq-len")

def story_starts(tokens, seq_len:int, eot:int=EOT) -> np.ndarray:
  """Positions of the EOTs that open a story and a whole window (one pass over the stream: keep the result)."""
  ends = np.flatnonzero(np.asarray(tokens) == eot)
  return ends[ends + seq_len <= len(tokens)]

def windows(tokens, seq_len:int, kind:str, batch_size:int, fixed:bool) -> tuple[str, np.ndarray|None]:
  """The kind of windows a run trains on and its story starts: "random" instead of story-aligned ones for one long
  text (a book) with too few stories to align windows with, unless the kind was asked for or a run continues."""
  stories = None if kind == "random" else story_starts(tokens, seq_len)
  return ("random", None) if stories is not None and len(stories) < batch_size and not fixed else (kind, stories)

def train_batch(tokens, batch_size, seq_len, rng, windows:str="random", stories:np.ndarray|None=None, eot:int=EOT):
  """(batch_size, seq_len) int32 windows; the same rng state gives the same batch. windows: one of WINDOWS; `stories`
  (from story_starts) is needed unless it is "random"."""
  windows_fit(tokens, seq_len)
  starts = rng.integers(0, len(tokens) - seq_len + 1, batch_size)  # uniform in [0, len - seq_len]
  if windows != "random":
    if stories is None or len(stories) == 0:
      raise DataError("no story fits a window: use --windows random, or data with <|endoftext|> between texts")
    starts = np.where(rng.random(batch_size) < ALIGNED, stories[rng.integers(0, len(stories), batch_size)], starts)
  x = np.asarray(tokens[starts[:, None] + np.arange(seq_len)], np.int32)
  if windows == "padded":
    # at or after the first EOT past position 0
    ended = np.cumsum(np.c_[np.zeros((batch_size, 1), bool), x[:, 1:] == eot], 1) > 0
    x = np.where(ended, eot, x)
  return x

def val_windows(tokens, seq_len, max_windows=None):
  """(N, seq_len) int32 non-overlapping windows from the start: the same every evaluation, so losses compare across
  runs."""
  windows_fit(tokens, seq_len)
  n = len(tokens) // seq_len if max_windows is None else min(len(tokens) // seq_len, max_windows)
  return np.asarray(tokens[:n * seq_len], np.int32).reshape(n, seq_len)
