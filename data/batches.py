"""Model inputs from a token stream: stories are packed back to back, so a window may span a story boundary (EOT)."""
import numpy as np
from data import DataError

def windows_fit(tokens, seq_len):
  """Raise if the stream can't fill one window: a smaller seq_len or more text is needed."""
  if len(tokens) < seq_len:
    raise DataError(f"the token stream has {len(tokens)} tokens, fewer than one window of {seq_len}: lower seq_len or use more text")

def train_batch(tokens, batch_size, seq_len, rng):
  """(batch_size, seq_len) int32 windows starting uniformly in [0, len - seq_len]; the same rng state gives the same batch."""
  windows_fit(tokens, seq_len)
  starts = rng.integers(0, len(tokens) - seq_len + 1, batch_size)
  return np.asarray(tokens[starts[:, None] + np.arange(seq_len)], np.int32)

def val_windows(tokens, seq_len, max_windows=None):
  """(N, seq_len) int32 non-overlapping windows from the start: the same every evaluation, so losses compare across runs."""
  windows_fit(tokens, seq_len)
  n = len(tokens) // seq_len if max_windows is None else min(len(tokens) // seq_len, max_windows)
  return np.asarray(tokens[:n * seq_len], np.int32).reshape(n, seq_len)
