"""The run directory (--out): ckpt.safetensors, the weights and (for a run in progress) the optimizer's state, with the
network's config and the run's settings as JSON metadata; log.jsonl, one JSON line per step; a lock while a run
writes there. Everything is written so that a crash at any moment leaves the last good state readable."""
import json, os
from dataclasses import asdict
import numpy as np
from tinygrad import Tensor, dtypes
from model import Config

FORMAT = 1  # of the checkpoint's metadata; a checkpoint from before it existed is format 1
DTYPES = {dtypes.float32: ("F32", np.float32), dtypes.float16: ("F16", np.float16), dtypes.int32: ("I32", np.int32),
          dtypes.int64: ("I64", np.int64), dtypes.uint8: ("U8", np.uint8)}

def save(path:str, tensors:dict[str, Tensor], meta:dict):
  """The safetensors layout (header length, JSON header, raw bytes) written from host copies, to a temp file that is then
  renamed: a crash mid-write leaves the previous checkpoint intact. Not tinygrad's safe_save: it builds the header with
  a CPU kernel, which needs clang, which GPU machines often lack."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  header, blobs, offset = {"__metadata__": {k: json.dumps(v) for k, v in {"format": FORMAT, **meta}.items()}}, [], 0
  for key, v in tensors.items():
    blobs.append(v.contiguous().realize().numpy().tobytes())
    header[key] = {"dtype": DTYPES[v.dtype][0], "shape": list(v.shape), "data_offsets": [offset, offset + len(blobs[-1])]}
    offset += len(blobs[-1])
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
  with open(tmp := path + ".tmp", "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head)
    for b in blobs: f.write(b)
    f.flush(); os.fsync(f.fileno())
  os.replace(tmp, path)

def load(path:str, missing:str="run `python train.py` first, or pass --ckpt") -> tuple[dict[str, Tensor], dict]:
  """(tensors on the default device, metadata) of a checkpoint written by `save`. Raises ValueError or
  FileNotFoundError with one line that says which it is: no file (`missing` says what to do), a directory, not a
  safetensors file, not a tinymdlm checkpoint, or one written by a newer version."""
  if os.path.isdir(path): raise ValueError(f"{path} is a directory: pass the checkpoint in it, {os.path.join(path, 'ckpt.safetensors')}")
  if not os.path.exists(path): raise FileNotFoundError(f"no checkpoint at {path}: {missing}")
  names = {name: dt for name, dt in DTYPES.values()}
  try:
    raw = np.memmap(path, np.uint8, "r")
    n = int(raw[:8].view(np.uint64)[0]) if len(raw) >= 8 else -1
    header = json.loads(raw[8:8 + n].tobytes()) if 0 < n <= len(raw) - 8 else None
    meta = {k: json.loads(v) for k, v in header.pop("__metadata__", {}).items()}
    arrays = {k: raw[8 + n + h["data_offsets"][0]:8 + n + h["data_offsets"][1]].view(names[h["dtype"]]).reshape(h["shape"])
              for k, h in header.items()}
  except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
    raise ValueError(f"{path} is not a checkpoint (not a safetensors file with tensors this project writes)") from None
  if "config" not in meta: raise ValueError(f"{path} is a safetensors file but not a tinymdlm checkpoint (no model config in it)")
  if meta.get("format", 1) > FORMAT:
    raise ValueError(f"{path} was written by a newer tinymdlm (checkpoint format {meta['format']}, this one reads {FORMAT}): update")
  return {k: Tensor(np.array(a)) for k, a in arrays.items()}, meta  # a copy: CUDA cannot copy from read-only memory

def config(meta:dict) -> Config:
  """The network's Config from a checkpoint's metadata (checkpoints from before Config.n_tokens say vocab_size)."""
  saved = dict(meta["config"])
  if "vocab_size" in saved: saved["n_tokens"] = saved.pop("vocab_size")
  return Config(**saved)

def config_dict(cfg:Config) -> dict: return asdict(cfg)

def restore(targets:dict[str, Tensor], tensors:dict[str, Tensor], path:str):
  """Assigns tensors[name] to each target, checking first that every one is there with the target's shape."""
  for key, v in targets.items():
    if key not in tensors: raise ValueError(f"{path} has no {key}: it was written by another version of tinymdlm, or another script")
    if tensors[key].shape != v.shape:
      raise ValueError(f"{path} holds {key} of shape {tensors[key].shape}, not {v.shape}: written by another version of tinymdlm")
  Tensor.realize(*[v.assign(tensors[key].cast(v.dtype)) for key, v in targets.items()])

def read_log(path:str) -> tuple[list[dict], int]:
  """The rows of a log.jsonl and how many lines could not be read (a line cut short by a crash)."""
  rows, bad = [], 0
  with open(path) as f:
    for line in f:
      try: rows.append(json.loads(line))
      except ValueError: bad += 1
  return rows, bad

def write_log(path:str, rows:list[dict]):
  """log.jsonl as exactly these rows, replaced atomically."""
  with open(path + ".tmp", "w") as f: f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(path + ".tmp", path)

def set_aside(path:str) -> str|None:
  """Renames a file that a new run would otherwise mix with (the log of a run that never wrote a checkpoint) to the first
  free path.N; returns the new name, or None if there was no file."""
  if not os.path.exists(path): return None
  n = next(i for i in range(1, 10**6) if not os.path.exists(f"{path}.{i}"))
  os.replace(path, f"{path}.{n}")
  return f"{path}.{n}"

_locks: dict[str, object] = {}  # run directory -> its lock file, held by this process until it ends

def lock(out:str):
  """Takes out/lock for as long as this process lives, or raises if another process holds it (two runs writing one
  checkpoint and log would each overwrite the other's). The OS releases it when the process ends, however it ends."""
  os.makedirs(out, exist_ok=True)
  try: import fcntl
  except ImportError: return  # Windows: no lock
  if (key := os.path.realpath(out)) in _locks: return
  f = open(os.path.join(out, "lock"), "a+")
  try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError: raise ValueError(f"another train.py is writing to {out}: wait for it to finish, or use another --out") from None
  _locks[key] = f
