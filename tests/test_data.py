"""data/: tokenizer, preparation, compact vocabulary, batches and the resumable download, all offline (loopback only)."""
import hashlib, http.server, json, os, shutil, socket, subprocess, sys, threading
import numpy as np, pytest
from data import DataError, batches, prepare, vocab
from data.tokenizer import EOT, RANKS, encoding, gpt2

def peer_tokens(paths):
  """The PyTorch peer's load_tokens (bench/torch_mdlm.py), verbatim: the definition our streams must match."""
  seen, ids = set(), []
  for path in paths:
    parts = open(path, encoding="utf-8").read().split("<|endoftext|>")
    if parts[-1].strip(): parts = parts[:-1]  # no closing separator: the last story is cut off
    for s in (p.strip() for p in parts):
      if s and s not in seen:
        seen.add(s); ids += gpt2().encode_ordinary(s) + [EOT]
  return np.array(ids, dtype=np.uint16)

# Raw TinyStories-like heads: V1 style, V2 style (blank lines, trailing spaces, CRLF), a story in both, a cut-off tail.
HEADS = {
  "v1_train_head.txt": "One day, a girl named Lily found a needle.\nShe was happy.\n<|endoftext|>\nTom had a red ball. "
                       "He liked it — a lot! 🎈\n<|endoftext|>\nA mom and a boy liked jazz.\n<|endoftext|>\nOnce upon a time there was a cut",
  "v2_train_head.txt": "\nA mom and a boy liked jazz.  \n\n<|endoftext|>\n\nBen saw a vase.  \r\nIt was big.  \n\n<|endoftext|>\n"
                       "\n\n<|endoftext|>\nOne day, a girl named Lily found a needle.\nShe was happy.\n<|endoftext|>\nMax ran",
  "v1_valid_head.txt": "Spot saw a car.\n\nIt was shiny.\n<|endoftext|>\nKitty drank water.\n<|endoftext|>\n",
}

@pytest.fixture
def heads(tmp_path):
  d = tmp_path / "heads"; d.mkdir()
  for name, text in HEADS.items(): (d / name).write_bytes(text.encode())
  return d

def logger():
  lines = []
  return lines, lines.append

def test_tokenizer_exact_ids_and_round_trip():
  enc = gpt2()
  assert enc.encode_ordinary("Once upon a time") == [7454, 2402, 257, 640]
  assert enc.n_vocab == 50257 and enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
  text = "Lily's café — naïve 🎈 déjà vu\n\n  x"
  assert enc.decode(enc.encode_ordinary(text)) == text

def test_corrupt_or_missing_ranks_file_is_detected(tmp_path):
  good = tmp_path / "gpt2.tiktoken"; shutil.copy(RANKS, good)
  assert encoding(str(good)).encode_ordinary("Once upon a time") == [7454, 2402, 257, 640]
  raw = bytearray(good.read_bytes()); raw[1000] ^= 1; good.write_bytes(bytes(raw))
  with pytest.raises(DataError, match="corrupt.*git checkout data/gpt2.tiktoken"): encoding(str(good))
  with pytest.raises(DataError, match="missing.*git checkout data/gpt2.tiktoken"): encoding(str(tmp_path / "nope"))

def test_bundle_and_tinystories_streams_match_the_peer(heads, tmp_path, monkeypatch):
  """Strip, dedup across files, cut-off tail dropped, CRLF read as LF; tiny chunks force cuts and chunk growth."""
  monkeypatch.setattr(prepare, "CHUNK", 16)
  want_train = peer_tokens([heads / "v1_train_head.txt", heads / "v2_train_head.txt"])
  want_val = peer_tokens([heads / "v1_valid_head.txt"])
  assert (want_train == EOT).sum() == 4 and (want_val == EOT).sum() == 2  # the fixture exercises every rule
  bundle = tmp_path / "bundle"; bundle.mkdir()
  prepare.bundle_sample(str(heads), out=str(bundle))
  monkeypatch.setattr(prepare, "SAMPLE", {"train": str(bundle / "train.txt.xz"), "val": str(bundle / "valid.txt.xz")})
  d = prepare.load("sample", root=str(tmp_path / "prepared"), log=lambda s: None)
  assert np.array_equal(d["train"], want_train) and np.array_equal(d["val"], want_val)
  assert np.array_equal(prepare.train_counts(d["meta"]), np.bincount(want_train, minlength=EOT + 1))
  # the same rules straight from raw files, as for the TinyStories download
  downloads = tmp_path / "downloads"; downloads.mkdir()
  (downloads / prepare.TINYSTORIES["train"]).write_bytes(HEADS["v2_train_head.txt"].encode())
  (downloads / prepare.TINYSTORIES["val"]).write_bytes(HEADS["v1_valid_head.txt"].encode())
  monkeypatch.setattr(prepare, "DOWNLOADS", str(downloads))
  d = prepare.load("tinystories", explicit=True, root=str(tmp_path / "prepared"), log=lambda s: None)
  assert d["name"] == "tinystories" and np.array_equal(d["train"], peer_tokens([downloads / prepare.TINYSTORIES["train"]]))
  # prepared before the downloads were deleted: reused as is, no network needed
  monkeypatch.setattr(prepare, "URL", f"http://127.0.0.1:{closed_port()}/")
  shutil.rmtree(downloads)
  again = prepare.load("tinystories", explicit=True, root=str(tmp_path / "prepared"), log=lambda s: None)
  assert np.array_equal(again["train"], d["train"])

def test_chunked_reading_cuts_only_at_separators(heads, monkeypatch):
  """Every chunk size, so separators fall across every chunk boundary, including the file's last one."""
  for name in HEADS:
    raw = (heads / name).read_text().split("<|endoftext|>")
    for chunk in range(1, 40):
      monkeypatch.setattr(prepare, "CHUNK", chunk)
      assert [p for parts in prepare.documents(str(heads / name), keep_last=True) for p in parts] == raw
      assert [p for parts in prepare.documents(str(heads / name), keep_last=False) for p in parts] == raw[:-1]

def test_bundled_sample_is_the_peers_stream(tmp_path):
  """Pinned from the peer's load_tokens on the raw heads (v1+v2 train, v1 valid) when the bundle was made."""
  lines, log = logger()
  d = prepare.load("sample", root=str(tmp_path), log=log)
  assert (len(d["train"]), len(d["val"])) == (849318, 194230) and d["meta"]["tokens"] == {"train": 849318, "val": 194230}
  assert (d["train"] == EOT).sum() == 4042 and (d["val"] == EOT).sum() == 1000 and d["train"][-1] == EOT
  assert hashlib.sha256(d["train"].tobytes()).hexdigest() == "42dd4626bbd70c8d344ca9d6cfac27d6b6b036e136f42eba320029d374ef5c53"
  assert hashlib.sha256(d["val"].tobytes()).hexdigest() == "260ed7849e03f7813bffe4c74473cddb3b0a5a8f570f422a02f606eb097ddb9c"
  assert np.array_equal(prepare.train_counts(d["meta"]), np.bincount(d["train"], minlength=EOT + 1))

def test_reuse_and_rebuild_of_stale_prepared_files(tmp_path):
  root = str(tmp_path)
  first = np.array(prepare.load("sample", root=root, log=lambda s: None)["train"])
  lines, log = logger()
  prepare.load("sample", root=root, log=log)
  assert lines == []  # still valid: reused silently
  out = tmp_path / "sample"
  for damage, why in [(lambda: os.truncate(out / "train.bin", 2 * len(first) - 2), "train.bin has"),
                      (lambda: os.remove(out / "val.bin"), "val.bin has"),
                      (lambda: edit_meta(out, tokenizer_sha256="0" * 64), "another tokenizer"),
                      (lambda: edit_meta(out, format=0), "format 0"),
                      (lambda: edit_meta(out, sources=[]), "source files changed"),
                      (lambda: (out / "meta.json").write_text("{"), "unreadable")]:
    damage()
    lines, log = logger()
    d = prepare.load("sample", root=root, log=log)
    assert len(lines) == 1 and why in lines[0] and "rebuilding" in lines[0]
    assert np.array_equal(d["train"], first) and prepare.check(str(out), d["meta"]["sources"])[0] is not None

def edit_meta(out, **changes):
  meta = json.loads((out / "meta.json").read_text()); meta.update(changes)
  (out / "meta.json").write_text(json.dumps(meta))

def test_user_file_documents_and_holdout(tmp_path):
  docs = [f"Chapter {i}. " + "The fox ran over the hill and sat down. " * (i + 3) for i in range(30)]
  path = tmp_path / "book.txt"
  path.write_text("\n<|endoftext|>\n".join(docs) + "\n\n")  # no separator after the last document: kept, not cut off
  d = prepare.load(str(path), root=str(tmp_path / "prepared"), log=lambda s: None)
  want = np.concatenate([gpt2().encode_ordinary(s.strip()) + [EOT] for s in docs]).astype(np.uint16)
  n_val = round(len(want) * 0.05)
  assert len(d["val"]) == n_val and np.array_equal(np.concatenate([d["train"], d["val"]]), want)
  assert np.array_equal(prepare.train_counts(d["meta"]), np.bincount(want[:-n_val], minlength=EOT + 1))
  assert d["name"].startswith("book-")
  # no separators: one document, like a book, not one per paragraph
  path.write_text("First paragraph.\n\nSecond one, longer than the first.\n\n" * 20)
  d = prepare.load(str(path), root=str(tmp_path / "prepared"), log=lambda s: None)
  want = gpt2().encode_ordinary(path.read_text().strip()) + [EOT]
  assert list(np.concatenate([d["train"], d["val"]])) == want and (d["train"] == EOT).sum() == 0

@pytest.mark.parametrize("content, why", [(b"", "no text"), (b" \n\n ", "no text"), (b"caf\xe9 au lait", "not UTF-8"), (None, "not a file")])
def test_bad_user_files_give_one_line_errors(tmp_path, content, why):
  path = tmp_path / "mine.txt"
  if content is not None: path.write_bytes(content)
  with pytest.raises(DataError, match=why) as e: prepare.load(str(path), root=str(tmp_path), log=lambda s: None)
  assert "\n" not in str(e.value)

def test_cli_error_is_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "data.prepare", "--data", str(tmp_path / "missing.txt")],
                     capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "not a file" in r.stderr

def test_train_batch_and_val_windows_are_slices_of_the_stream():
  tokens = np.arange(1000, dtype=np.uint16) * 7 % 50257
  x = batches.train_batch(tokens, 64, 16, np.random.default_rng(3))
  starts = np.random.default_rng(3).integers(0, 1000 - 16 + 1, 64)
  assert x.dtype == np.int32 and all(np.array_equal(row, tokens[s:s + 16]) for row, s in zip(x, starts))
  assert np.array_equal(x, batches.train_batch(tokens, 64, 16, np.random.default_rng(3)))
  assert not np.array_equal(x, batches.train_batch(tokens, 64, 16, np.random.default_rng(4)))
  firsts = {int(r[0]) for r in batches.train_batch(tokens[:20], 400, 16, np.random.default_rng(0))}
  assert firsts == set(int(t) for t in tokens[:5])  # every start in [0, len - T], the last one included
  v = batches.val_windows(tokens, 100)
  assert v.shape == (10, 100) and np.array_equal(v.reshape(-1), tokens) and len(batches.val_windows(tokens, 30, 4)) == 4
  assert np.array_equal(batches.val_windows(tokens, 30, 4)[3], tokens[90:120])
  with pytest.raises(DataError, match="fewer than one window"): batches.train_batch(tokens[:15], 2, 16, np.random.default_rng(0))
  with pytest.raises(DataError, match="fewer than one window"): batches.val_windows(tokens[:15], 16)

def story_stream(n_stories=300, seed=0) -> np.ndarray:
  """Stories of 5..39 random tokens (never EOT), each followed by EOT, packed as data.prepare packs them."""
  rng = np.random.default_rng(seed)
  return np.concatenate([np.r_[rng.integers(0, EOT, n), EOT] for n in rng.integers(5, 40, n_stories)]).astype(np.uint16)

def test_story_windows_start_after_an_end_of_text_and_repeat_per_seed():
  tokens, T = story_stream(), 16
  starts = batches.story_starts(tokens, T)
  assert starts.tolist() == [i for i in range(len(tokens) - T + 1) if tokens[i] == EOT]  # every EOT with a window after it
  x = batches.train_batch(tokens, 2000, T, np.random.default_rng(1), "stories", starts)
  slices = {tuple(tokens[i:i + T]) for i in range(len(tokens) - T + 1)}
  openings = {tuple(tokens[i:i + T]) for i in starts}  # EOT, then a story from its first token
  aligned = np.array([tuple(w) in openings for w in x])
  assert all(tuple(w) in slices for w in x) and abs(aligned.mean() - batches.ALIGNED) < 4 * np.sqrt(0.25 / 2000)
  assert (x[aligned, 0] == EOT).all() and (x[aligned, 1] != EOT).all()
  assert np.array_equal(x, batches.train_batch(tokens, 2000, T, np.random.default_rng(1), "stories", starts))
  assert not np.array_equal(x, batches.train_batch(tokens, 2000, T, np.random.default_rng(2), "stories", starts))
  with pytest.raises(DataError, match="--windows random"): batches.train_batch(tokens, 4, T, np.random.default_rng(1), "stories", starts[:0])

def test_padded_windows_hold_end_of_text_after_a_story_ends():
  tokens, T = story_stream(), 48
  starts = batches.story_starts(tokens, T)
  x = batches.train_batch(tokens, 500, T, np.random.default_rng(3), "stories", starts)
  p = batches.train_batch(tokens, 500, T, np.random.default_rng(3), "padded", starts)  # the same windows, padded
  for row, padded in zip(x, p):
    ends = [i for i in range(1, T) if row[i] == EOT]
    cut = ends[0] if ends else T
    assert np.array_equal(padded[:cut], row[:cut]) and (padded[cut:] == EOT).all()
  assert (p == EOT).mean() > (x == EOT).mean()

def test_windows_of_a_prepared_memmap(tmp_path):
  d = prepare.load("sample", root=str(tmp_path), log=lambda s: None)
  assert isinstance(d["train"], np.memmap) and d["train"].dtype == np.uint16
  stream = np.fromfile(tmp_path / "sample" / "train.bin", np.uint16)
  x = batches.train_batch(d["train"], 8, 128, np.random.default_rng(0))
  starts = np.random.default_rng(0).integers(0, len(stream) - 128 + 1, 8)
  assert all(np.array_equal(row, stream[s:s + 128]) for row, s in zip(x, starts))
  assert vocab.decode(batches.val_windows(d["val"], 4, 1)[0], None) == "Spot. Spot saw"

def test_top_k_matches_the_peers_argsort():
  counts = np.array([5, 3, 5, 0, 3, 9, 0, 3])
  keep = vocab.top_k(counts, 5)
  assert list(keep) == [5, 0, 2, 1, 4]  # ties go to the lower id
  assert np.array_equal(keep, np.argsort(-counts, kind="stable")[:5])
  rng = np.random.default_rng(0)
  big = rng.integers(0, 20, EOT + 1)  # many ties
  assert np.array_equal(vocab.top_k(big, 8192), np.argsort(-big, kind="stable")[:8192])
  assert vocab.top_k(counts, 0) is None and vocab.n_tokens(None) == 50257 and vocab.n_tokens(keep) == 6
  with pytest.raises(DataError, match="out of range"): vocab.top_k(counts, 9)

def test_compact_mapping_round_trips_and_unk():
  keep = np.array([7454, 2402, 257, 640, EOT])
  ids = np.array([640, 7454, 999, EOT, 257, 2402, 12])
  c = vocab.to_compact(ids, keep)
  assert list(c) == [3, 0, 5, 4, 2, 1, 5] and c.dtype == np.int32
  kept = c != 5
  assert np.array_equal(vocab.to_gpt2(c[kept], keep), ids[kept])
  with pytest.raises(DataError, match="no GPT-2 token"): vocab.to_gpt2(c, keep)
  assert list(vocab.encode("Once upon a time", keep)) == [0, 1, 2, 3]
  assert list(vocab.encode("Once upon a dog", keep)) == [0, 1, 2, 5]
  assert vocab.decode([0, 1, 5, 2, 6, 6, 3, 4], keep) == "Once upon⁇ a░░ time<|endoftext|>"  # 6 = MASK = K+1
  assert vocab.decode([7454, 50257, 640], None) == "Once░ time"  # full GPT-2: 50257 is MASK
  assert np.array_equal(vocab.to_compact(ids, None), ids) and vocab.decode(vocab.encode("naïve 🎈", None), None) == "naïve 🎈"

def test_sample_val_coverage_at_8192(tmp_path):
  d = prepare.load("sample", root=str(tmp_path), log=lambda s: None)
  keep = vocab.top_k(prepare.train_counts(d["meta"]), 8192)
  coverage = (vocab.to_compact(d["val"], keep) < 8192).mean()
  print(f"val tokens kept by K=8192: {coverage:.4%}")
  assert coverage >= 0.995
  kept, head = set(keep.tolist()), d["val"][:300].tolist()
  want = "".join(gpt2().decode([t]) if t in kept else "⁇" for t in head)
  assert "R⁇." in want and vocab.decode(vocab.to_compact(head, keep), keep) == want  # "Roxy" is rare: R + <unk>

def closed_port():
  s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
  return port

@pytest.fixture
def server():
  """A loopback HTTP server serving BODY with Range support. Per path: /cut drops the connection after CUT bytes on
  its first request; /liar announces 100 bytes more than it has. Records each request's Range header."""
  state = {"ranges": [], "body": bytes(range(256)) * 4000, "cut": 300_000}
  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
      body, rng = state["body"], self.headers.get("Range")
      state["ranges"].append(rng)
      total = len(body) + (100 if self.path == "/liar" else 0)
      start = int(rng[6:-1]) if rng else 0
      self.send_response(206 if rng else 200)
      if rng: self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
      self.send_header("Content-Length", str(total - start)); self.end_headers()
      first_cut = self.path == "/cut" and len(state["ranges"]) == 1
      self.wfile.write(body[start:state["cut"]] if first_cut else body[start:])
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
  state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
  yield state
  httpd.shutdown(); httpd.server_close()

def test_download_resumes_after_a_dropped_connection(server, tmp_path):
  dest = str(tmp_path / "file.txt")
  assert prepare.download(server["url"] + "/cut", dest) == dest
  assert open(dest, "rb").read() == server["body"] and not os.path.exists(dest + ".part")
  assert server["ranges"] == [None, f"bytes={server['cut']}-"]

def test_download_resumes_a_part_file_from_an_earlier_run(server, tmp_path):
  dest = str(tmp_path / "file.txt")
  with open(dest + ".part", "wb") as f: f.write(server["body"][:12345])
  prepare.download(server["url"] + "/whole", dest)
  assert open(dest, "rb").read() == server["body"] and server["ranges"] == ["bytes=12345-"]

def test_download_size_mismatch_keeps_the_part_and_fails(server, tmp_path):
  dest = str(tmp_path / "file.txt")
  with pytest.raises(DataError, match=f"got {len(server['body'])} of {len(server['body']) + 100} bytes"):
    prepare.download(server["url"] + "/liar", dest)
  assert not os.path.exists(dest) and os.path.getsize(dest + ".part") == len(server["body"])

def test_offline_tinystories_falls_back_loudly_unless_explicit(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "URL", f"http://127.0.0.1:{closed_port()}/")
  monkeypatch.setattr(prepare, "DOWNLOADS", str(tmp_path / "downloads"))
  lines, log = logger()
  d = prepare.load("tinystories", explicit=False, root=str(tmp_path / "prepared"), log=log)
  assert d["name"] == "sample" and len(d["train"]) == 849318
  assert any("cannot download" in l and "FALLING BACK TO THE BUNDLED SAMPLE" in l for l in lines)
  with pytest.raises(DataError, match="cannot download.*or use --data sample") as e:
    prepare.load("tinystories", explicit=True, root=str(tmp_path / "prepared"), log=lambda s: None)
  assert "\n" not in str(e.value)

def test_a_byte_order_mark_is_not_text(tmp_path):
  """Windows Notepad starts UTF-8 files with a BOM: the stream must be that of the same file without it."""
  text = "Tom had a red ball.\n<|endoftext|>\nSam had a cat.\n" * 30
  (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
  (tmp_path / "plain.txt").write_bytes(text.encode())
  a, b = (prepare.load(str(tmp_path / f), root=str(tmp_path / "prepared"), log=lambda s: None) for f in ("bom.txt", "plain.txt"))
  assert np.array_equal(np.concatenate([a["train"], a["val"]]), np.concatenate([b["train"], b["val"]]))
  assert vocab.decode(a["train"][:3], None) == "Tom had a"

def test_prepared_data_is_rebuilt_when_the_file_changed_at_the_same_size(tmp_path):
  path = tmp_path / "mine.txt"
  path.write_text("Tom had a red ball. " * 200)
  first = prepare.load(str(path), root=str(tmp_path / "prepared"), log=lambda s: None)["train"][:3].tolist()
  path.write_text("Sam had a tan ball. " * 200)  # the same number of bytes
  lines, log = logger()
  again = prepare.load(str(path), root=str(tmp_path / "prepared"), log=log)["train"][:3].tolist()
  assert vocab.decode(first, None) == "Tom had a" and vocab.decode(again, None) == "Sam had a"
  assert len(lines) == 1 and "the source files changed" in lines[0]
