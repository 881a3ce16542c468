"""Text -> one flat uint16 stream of GPT-2 ids per split (each story followed by EOT), in data/prepared/<name>/
{train,val}.bin + meta.json, read back with np.memmap. The stories, their order and their ids are exactly those of
the PyTorch peer's load_tokens, so both projects train on identical streams.

  python -m data.prepare --data sample|tinystories|FILE
"""
import argparse, codecs, contextlib, hashlib, http.client, json, lzma, os, re, sys, time, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from data import DataError, explain
from data.tokenizer import EOT, SHA256, gpt2

FORMAT = 2  # bump when the layout of the prepared files or the rules that make them change (2: BOM dropped, sha256)
HERE = os.path.dirname(os.path.abspath(__file__))
PREPARED, DOWNLOADS = os.path.join(HERE, "prepared"), os.path.join(HERE, "downloads")
SAMPLE = {"train": "tinystories/train.txt.xz", "val": "tinystories/valid.txt.xz"}  # relative to data/
URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
TINYSTORIES = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
SEP = "<|endoftext|>"
CHUNK = 8 << 20  # bytes of text read (and tokenized) at a time: bounds memory whatever the file size
HOLDOUT = 0.05   # share of a user file's token stream kept for validation

def progress(what, done, total, t0):
  """A self-overwriting stderr line, so long steps show they are alive without flooding logs."""
  rate = done / max(time.perf_counter() - t0, 1e-9)
  eta = int((total - done) / rate) if total and rate else 0
  left = f"{100 * done / total:5.1f}%  ETA {eta // 60}:{eta % 60:02d}" if total else ""
  sys.stderr.write(f"\r{what}: {done / 1e6:,.1f}/{(total or 0) / 1e6:,.1f} MB  {left}  {rate / 1e6:.1f} MB/s   ")

def atomic_write(path, data):
  """Whole-file writes via a temp file and os.replace: a crash leaves the old file or the new one, never half of one,
  and no temp file."""
  try:
    with open(tmp := f"{path}.{os.getpid()}.tmp", "wb") as f: f.write(data)
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError): os.remove(tmp)
    if isinstance(e, OSError): raise DataError(f"cannot write {path}: {explain(e)}") from None
    raise

def fetch(url, part, have, timeout):
  """Appends url's bytes from offset `have` to `part` and returns the full size the server reports (None if it
  doesn't)."""
  request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
  try: r = urllib.request.urlopen(request, timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code != 416: raise
    return int(e.headers.get("Content-Range", "/-1").split("/")[-1])  # nothing past `have`: complete if that's the size
  with r:
    if r.status == 206:  # the rest, as asked
      m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", r.headers.get("Content-Range", ""))
      if not m or int(m[1]) != have: raise DataError(f"{url} resumed at the wrong byte: delete {part} and run again")
      total = m[2]
    else: have, total = 0, r.headers.get("Content-Length")  # 200: the server ignored Range, start over
    with open(part, "ab" if have else "wb") as f:
      t0, total = time.perf_counter(), total and int(total)
      while block := r.read(1 << 20):
        f.write(block); have += len(block)
        progress("downloading " + os.path.basename(part)[:-5], have, total, t0)
      sys.stderr.write("\n")
  return total

def download(url, path, timeout=30):
  """url -> path via path.part, verified by size. An interrupted transfer resumes with an HTTP Range request: right away
  while each try gets more bytes, else on the next run."""
  part = path + ".part"
  while True:
    have, error = os.path.getsize(part) if os.path.exists(part) else 0, None
    try: total = fetch(url, part, have, timeout)
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
      total, error = None, getattr(e, "reason", None) or e
    size = os.path.getsize(part) if os.path.exists(part) else 0
    if error is None and size == (total or size): os.replace(part, path); return path
    if total is not None and size > total:
      os.remove(part); raise DataError(f"{part} was longer than {url} ({size} > {total} bytes); removed it: run again")
    if size <= have: raise DataError(f"cannot download {url} ({error or f'got {size} of {total} bytes'})")

def documents(path, keep_last, what=None):
  """Lists of raw stories from path, read a chunk at a time and cut only after a separator (the chunk grows until it
  holds one), so memory is bounded by the chunk size plus the longest story. With keep_last=False the text after the
  last separator is dropped: in TinyStories files it is a story cut off mid-sentence."""
  with open(path, "rb") as raw, (lzma.open(raw) if path.endswith(".xz") else raw) as f:
    rest, size, t0, total, at = b"", CHUNK, time.perf_counter(), os.path.getsize(path), [0, 1]  # where `rest` starts
    if (head := f.read(3)) != codecs.BOM_UTF8: rest = head  # a byte-order mark (Windows Notepad) is not text
    else: at[0] = 3
    while block := f.read(size):
      buf = rest + block
      cut = buf.rfind(SEP.encode(), max(0, len(rest) - len(SEP)))  # `rest` has no separator: look where one can end
      if cut < 0: rest, size = buf, 2 * size; continue
      cut += len(SEP)
      yield text(buf[:cut], path, at).split(SEP)[:-1]
      rest, size = buf[cut:], CHUNK
      if what: progress(what, raw.tell(), total, t0)
    if what: sys.stderr.write("\n")
    if keep_last: yield [text(rest, path, at)]

def text(raw, path, at=(0, 1)):
  """UTF-8 bytes -> str with universal newlines, as Python's text mode (the peer's open()) would read them. at: the
  byte offset and line where raw starts in the file, updated past it, for an error that says where."""
  try: out = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
  except UnicodeDecodeError as e:
    line = at[1] + raw.count(b"\n", 0, e.start)
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataError(f"{path} is not UTF-8 at byte {at[0] + e.start:,} (line {line:,}, column {column}: "
                    f"{raw[e.start:e.end]!r}), though UTF-8 before it: fix that line, saved as UTF-8, and run again"
                    if at[0] + e.start else f"{path} is not UTF-8 text: save it as UTF-8 (from Latin-1: iconv -f "
                    "latin1 -t utf-8 FILE > NEW)") from None
  if isinstance(at, list): at[0], at[1] = at[0] + len(raw), at[1] + raw.count(b"\n")
  return out

def unique(parts, seen):
  """The stripped, non-empty stories not seen before. `seen` holds 64-bit hashes, not stories, to stay small on 2 GB of
  text (a false duplicate has odds ~1e-7 on all of TinyStories)."""
  kept = []
  for s in map(str.strip, parts):
    if s and (h := hash(s)) not in seen: seen.add(h); kept.append(s)
  return kept

def encode(stories, pool):
  """encode_ordinary(story) + [EOT] for each story, concatenated. Joining the stories with the separator and encoding
  it as the special token gives exactly those ids, in one call per half-chunk on both cores (tiktoken releases the
  GIL). On 2 cores: 35 MB/s, vs 21 MB/s on one thread, 17 MB/s for per-story calls, 12 MB/s for
  encode_ordinary_batch(num_threads=2), and 37 MB/s for a 2-process pool, which is not worth its pickling and spawn."""
  halves = [h for h in (stories[:len(stories) // 2], stories[len(stories) // 2:]) if h]
  enc = gpt2()
  ids = pool.map(lambda h: enc.encode_to_numpy(SEP.join(h) + SEP, allowed_special={SEP}), halves)
  return np.concatenate([np.zeros(0, np.uint32), *ids]).astype(np.uint16)

def tokenize(paths, f, keep_last, pool, what):
  """Appends the stories of paths (in order, first occurrence only) to the open file f; returns the per-id counts."""
  seen, counts = set(), np.zeros(EOT + 1, np.int64)
  for path in paths:
    for parts in documents(path, keep_last, what):
      ids = encode(unique(parts, seen), pool)
      f.write(ids.tobytes()); counts += np.bincount(ids, minlength=EOT + 1)
  return counts

def hold_out(train, val, counts):
  """Moves the last HOLDOUT of the stream in file `train` to file `val` (cutting mid-document if need be, so the
  share is exact and a single long text, like a book, still gets a validation part); returns the train counts."""
  ids = np.memmap(train, np.uint16, "r")
  cut = len(ids) - max(1, round(len(ids) * HOLDOUT))
  with open(val, "wb") as f: f.write(ids[cut:].tobytes())
  counts = counts - np.bincount(ids[cut:], minlength=EOT + 1)
  del ids
  os.truncate(train, 2 * cut)
  return counts

def build(out, splits, keep_last, meta):
  """Tokenizes each split into out/<split>.bin and writes meta.json last, all via temp files; the old meta goes first,
  so a crash part-way leaves nothing that looks valid."""
  try:
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")): os.remove(os.path.join(out, "meta.json"))
  except OSError as e: raise DataError(f"cannot prepare {meta['name']} in {out}: {explain(e)}") from None
  # per process: two runs preparing the same data side by side write the same bytes, and each rename is atomic
  tmp = {split: os.path.join(out, f"{split}.bin.{os.getpid()}.tmp") for split in ("train", "val")}
  try:
    with ThreadPoolExecutor(2) as pool:
      for split, paths in splits.items():
        with open(tmp[split], "wb") as f: counts = tokenize(paths, f, keep_last, pool, f"tokenizing {split}")
        if split == "train": train_counts = counts
    if counts.sum() == 0: raise DataError(f"{paths[0]} contains no text: pass a file with some")
    if "val" not in splits: train_counts = hold_out(tmp["train"], tmp["val"], train_counts)
    for split in tmp: os.replace(tmp[split], os.path.join(out, f"{split}.bin"))
  except BaseException as e:  # a bad byte, a full disk, Ctrl-C: no temp file outlives it
    for path in tmp.values():
      with contextlib.suppress(OSError): os.remove(path)
    if isinstance(e, OSError): raise DataError(f"cannot prepare {meta['name']} in {out}: {explain(e)}") from None
    raise
  meta["tokens"] = {split: os.path.getsize(os.path.join(out, f"{split}.bin")) // 2 for split in tmp}
  meta["train_counts"] = {str(i): int(train_counts[i]) for i in np.flatnonzero(train_counts)}
  atomic_write(os.path.join(out, "meta.json"), json.dumps(meta).encode())
  return meta

def sha256(path) -> str:
  """The content hash of a source file: prepared files are reused only for the same bytes (~1 s a GB)."""
  with open(path, "rb") as f: return hashlib.file_digest(f, "sha256").hexdigest()

def check(out, sources):
  """(meta, None) if the prepared files in out can be used, else (None, why not). They are used only when everything
  they were made from still matches; sources=None skips that part (TinyStories downloads deleted after preparing)."""
  try:
    with open(os.path.join(out, "meta.json")) as f: meta = dict(json.load(f))
  except FileNotFoundError: return None, None
  except (OSError, ValueError, TypeError): return None, "meta.json is unreadable"
  if meta.get("format") != FORMAT: return None, f"format {meta.get('format')}, this code writes {FORMAT}"
  if meta.get("tokenizer_sha256") != SHA256: return None, "made with another tokenizer"
  if sources is not None and meta.get("sources") != sources: return None, "the source files changed"
  for split in ("train", "val"):
    path, want = os.path.join(out, f"{split}.bin"), 2 * meta.get("tokens", {}).get(split, -1)
    size = os.path.getsize(path) if os.path.exists(path) else -1
    if size != want or size <= 0: return None, f"{split}.bin has {size} bytes, meta.json says {want}"
  return meta, None

def content_key(meta) -> str:
  """What prepared data holds, in 16 hex digits: the same for the same source bytes and tokenizer, wherever they are."""
  sources = sorted((s["split"], s["sha256"]) for s in meta.get("sources") or [])
  return hashlib.sha256(json.dumps([sources, meta.get("tokenizer_sha256")]).encode()).hexdigest()[:16]

def where(source:str) -> str:
  """A --data value as a run records it: a file by its absolute path (found again from any working directory)."""
  return source if source in ("sample", "tinystories") else os.path.abspath(source)

def train_counts(meta):
  """Per-id token counts of the training split as a dense array (meta.json stores only the nonzero ones)."""
  counts = np.zeros(EOT + 1, np.int64)
  counts[[int(i) for i in meta["train_counts"]]] = list(meta["train_counts"].values())
  return counts

def dataset(source, explicit, root, log):
  """(name, {split: [paths]}, keep_last) of a source; TinyStories is downloaded here when missing, unless it was
  prepared before its downloads were deleted (then splits is None: use the prepared files as they are)."""
  if source == "sample": return "sample", {split: [os.path.join(HERE, p)] for split, p in SAMPLE.items()}, False
  if source == "tinystories":
    paths = {split: os.path.join(DOWNLOADS, name) for split, name in TINYSTORIES.items()}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing and check(os.path.join(root, "tinystories"), None)[0]: return "tinystories", None, False
    try:
      for path in missing:
        os.makedirs(DOWNLOADS, exist_ok=True); log(f"downloading {URL}{os.path.basename(path)} -> {path}")
        download(URL + os.path.basename(path), path)
    except DataError as e:
      if explicit:
        raise DataError(f"{e}: check the network and run again (a download resumes), or use --data sample") from None
      log(f"WARNING: {e}. FALLING BACK TO THE BUNDLED SAMPLE (a 4 MB excerpt, not TinyStories); --data tinystories "
          "makes this an error")
      return dataset("sample", explicit, root, log)
    return "tinystories", {split: [path] for split, path in paths.items()}, False
  if not os.path.isfile(source):
    raise DataError(f"{source} is not a file: use --data sample, tinystories or the path of a UTF-8 text file")
  name = re.sub(r"[^\w.-]", "_", os.path.splitext(os.path.basename(source))[0])
  path = os.path.abspath(source)
  return f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}", {"train": [path]}, True

def load(source, explicit=False, root=None, log=print):
  """{"name", "train", "val", "meta"} for source ("sample", "tinystories" or a text file's path), with train and val as
  uint16 memmaps, preparing them first when needed. explicit=True: the user asked for this source, so a failed
  TinyStories download is an error instead of a loud fallback to the sample."""
  root = root or PREPARED
  name, splits, keep_last = dataset(source, explicit, root, log)
  out = os.path.join(root, name)
  sources = splits and [{"split": split, "file": os.path.relpath(p, HERE) if p.startswith(HERE) else p,
                         "bytes": os.path.getsize(p), "sha256": sha256(p)}
                        for split, paths in splits.items() for p in paths]
  meta, stale = check(out, sources)
  if meta is None:
    log(f"{out}: {stale}; rebuilding" if stale else f"preparing {name} in {out}")
    meta = build(out, splits, keep_last, {"format": FORMAT, "name": name, "tokenizer_sha256": SHA256,
                                          "sources": sources,
                                          "holdout": None if "val" in splits else HOLDOUT})
  train, val = (np.memmap(os.path.join(out, f"{split}.bin"), np.uint16, "r") for split in ("train", "val"))
  return {"name": name, "train": train, "val": val, "meta": meta}

def bundle_sample(heads, out=os.path.join(HERE, "tinystories")):
  """Rebuilds the bundled sample from the TinyStories heads (../shared/data/tinystories) by the same rules as
  tokenizing, so the bundle is reproducible: python -c "from data.prepare import bundle_sample as b; b('HEADS')" """
  for split, files in (("train", ["v1_train_head.txt", "v2_train_head.txt"]), ("val", ["v1_valid_head.txt"])):
    seen = set()
    stories = [s for f in files for parts in documents(os.path.join(heads, f), keep_last=False)
               for s in unique(parts, seen)]
    raw = "".join(f"{s}\n{SEP}\n" for s in stories).encode()
    atomic_write(os.path.join(out, os.path.basename(SAMPLE[split])), lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))

def main():
  p = argparse.ArgumentParser(description="Tokenize a dataset into data/prepared/<name>/ (reused while still valid).")
  p.add_argument("--data", default="sample",
                 help="sample (bundled), tinystories (downloads 2.2 GB) or a UTF-8 text file")
  t0 = time.perf_counter()
  try: d = load(p.parse_args().data, explicit=True)
  except DataError as e: sys.exit(f"error: {e}")
  print(f"{d['name']}: {len(d['train']):,} train tokens, {len(d['val']):,} val tokens "
        f"({time.perf_counter() - t0:.1f} s)")

if __name__ == "__main__": main()
