"""Compact vocabularies: the K most frequent GPT-2 ids of the training split get compact ids 0..K-1 (most frequent
first) and every other id becomes <unk> = K; the model's MASK id is K+1. `keep` (keep[i] = GPT-2 id of compact id i)
is all a checkpoint must store to decode anywhere. keep=None stands for the full GPT-2 vocabulary, where ids are
GPT-2 ids and MASK is 50257."""
import codecs, itertools, re
import numpy as np
from data import DataError
from data.tokenizer import EOT, gpt2

UNK, MASK = "⁇", "░"  # how <unk> and ids past the vocabulary (MASK) decode: visible, and one character wide

def top_k(train_counts, K):
  """keep for a K-token vocabulary (None for K=0: full GPT-2). Ties go to the lower id, exactly as the PyTorch peer's
  np.argsort(-counts, kind="stable")[:K], so both projects map ids identically."""
  if K == 0: return None
  if not 0 < K <= len(train_counts):
    raise DataError(f"vocab size {K} is out of range: use 1..{len(train_counts)}, or 0 for all of GPT-2")
  return np.argsort(-np.asarray(train_counts, np.int64), kind="stable")[:K]

def n_tokens(keep):
  """Ids the data can hold: K kept ids + <unk>, or all of GPT-2."""
  return EOT + 1 if keep is None else len(keep) + 1

def eot(keep):
  """The id of <|endoftext|> in this vocabulary (<unk> if it was not kept)."""
  return int(to_compact([EOT], keep)[0])

def to_compact(gpt2_ids, keep):
  """GPT-2 ids -> compact int32 ids through a lookup table; ids outside keep become <unk>. Map a batch at a time:
  a whole TinyStories stream as int32 would take 2 GB."""
  ids = np.asarray(gpt2_ids)
  if keep is None: return ids.astype(np.int32)
  table = np.full(EOT + 1, len(keep), np.int32)
  table[keep] = np.arange(len(keep), dtype=np.int32)
  return table[ids]

def to_gpt2(compact_ids, keep):
  """Compact ids -> GPT-2 ids; <unk> and MASK have none, so they raise (decode shows them instead)."""
  ids = np.asarray(compact_ids).astype(np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= n_tokens(keep) - (keep is not None)):
    raise DataError(f"ids {ids.min()}..{ids.max()} include some with no GPT-2 token (<unk> or MASK): use decode() to "
                    "show them")
  return ids if keep is None else np.asarray(keep)[ids]

def decode(compact_ids, keep):
  """Text of compact ids: <unk> shows as ⁇ and any id past the vocabulary (MASK, padding) as ░, so partly denoised
  samples can be printed as they are. Runs of real tokens decode together, keeping multi-byte characters whole."""
  ids = np.asarray(compact_ids).reshape(-1).astype(np.int64)
  if ids.size and ids.min() < 0: raise DataError(f"cannot decode negative id {ids.min()}")
  tokens = EOT + 1 if keep is None else len(keep)
  kind = (ids >= tokens).astype(int) + (ids >= n_tokens(keep))  # 0: token, 1: <unk>, 2: past the vocabulary
  out = []
  for k, run in itertools.groupby(zip(kind, ids), key=lambda x: x[0]):
    run = [int(i) for _, i in run]
    out.append(gpt2().decode(to_gpt2(run, keep).tolist()) if k == 0 else (UNK if k == 1 else MASK) * len(run))
  return "".join(out)

def token_texts(compact_ids, keep) -> list[str]:
  """The text of each token, such that the texts join to decode(ids): a character that GPT-2 splits over several tokens
  (curly quotes, emoji, accents) belongs whole to the token that completes it, the ones before it show nothing, where
  decoding each token alone would show U+FFFD for each part."""
  out, utf8 = [], codecs.getincrementaldecoder("utf-8")("replace")
  for i in np.asarray(compact_ids).reshape(-1):
    if i >= (EOT + 1 if keep is None else len(keep)):
      out.append(utf8.decode(b"", final=True) + decode([i], keep)); continue
    out.append(utf8.decode(gpt2().decode_single_token_bytes(int(to_gpt2([i], keep)[0]))))
  if out: out[-1] += utf8.decode(b"", final=True)
  return out

def encode(text, keep):
  """Compact ids of a prompt (plain text: a literal <|endoftext|> in it is text, not EOT)."""
  return to_compact(np.array(gpt2().encode_ordinary(text), np.int64), keep)

def story_end(ids, given, keep) -> int|None:
  """Where a generated story ends: the position of its first end of text after which nothing given (a prompt) follows;
  None if it has none (it was cut), or the vocabulary has no end of text."""
  if keep is not None and EOT not in keep: return None
  ends = np.flatnonzero((np.asarray(ids) == eot(keep)) & (np.arange(len(ids)) > max(np.flatnonzero(given), default=-1)))
  return int(ends[0]) if len(ends) else None

def unknown(text, keep) -> str|None:
  """The words of a prompt that hold tokens a compact vocabulary does not have (each becomes <unk>), quoted; None if
  there are none."""
  if keep is None or not text: return None
  ids, at, spans = gpt2().encode_ordinary(text), 0, []
  for i, c in zip(ids, to_compact(ids, keep)):  # each token's bytes follow the last one's in the UTF-8 text
    n = len(gpt2().decode_single_token_bytes(i))
    if c == len(keep): spans.append((at, at + n))
    at += n
  words = [w.group() for w in re.finditer(r"\S+", text) if any(a < len(text[:w.end()].encode()) and
           b > len(text[:w.start()].encode()) for a, b in spans)]
  return ", ".join(f"'{w}'" for w in words[:8]) + (f" and {len(words) - 8} more" if len(words) > 8 else "") or None
