"""Checkpoints: safetensors files holding the weights (and, for a run in progress, the optimizer's state), with the
network's config and the run's settings as JSON metadata. Written atomically; read back with one-line errors."""
import json, os
from dataclasses import asdict
from tinygrad import Device, Tensor, dtypes
from tinygrad.nn.state import safe_load, safe_load_metadata
from model import Config

SAFETENSORS_DTYPES = {dtypes.float32: "F32", dtypes.float16: "F16", dtypes.int32: "I32", dtypes.int64: "I64", dtypes.uint8: "U8"}

def save(path:str, tensors:dict[str, Tensor], meta:dict):
  """The safetensors layout (header length, JSON header, raw bytes) written from host copies, to a temp file that is then
  renamed: a crash mid-write leaves the previous checkpoint intact. Not tinygrad's safe_save: it builds the header with
  a CPU kernel, which needs clang, which GPU machines often lack."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  header, blobs, offset = {"__metadata__": {k: json.dumps(v) for k, v in meta.items()}}, [], 0
  for key, v in tensors.items():
    blobs.append(v.contiguous().realize().numpy().tobytes())
    header[key] = {"dtype": SAFETENSORS_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(blobs[-1])]}
    offset += len(blobs[-1])
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
  with open(tmp := path + ".tmp", "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head)
    for b in blobs: f.write(b)
    f.flush(); os.fsync(f.fileno())
  os.replace(tmp, path)

def load(path:str) -> tuple[dict[str, Tensor], dict]:
  """(tensors on the default device, metadata) of a checkpoint written by `save`."""
  if not os.path.exists(path): raise FileNotFoundError(f"no checkpoint at {path}: run `python train.py` first (or pass --ckpt)")
  try:
    meta = {k: json.loads(v) for k, v in safe_load_metadata(path)[2].get("__metadata__", {}).items()}
    tensors = {k: v.to(Device.DEFAULT).realize() for k, v in safe_load(path).items()}
  except Exception as e: raise ValueError(f"{path} is not a readable tinymdlm checkpoint ({type(e).__name__}): delete it or retrain") from e
  if "config" not in meta: raise ValueError(f"{path} has no model config: it was not written by train.py")
  return tensors, meta

def config(meta:dict) -> Config:
  """The network's Config from a checkpoint's metadata (checkpoints from before Config.n_tokens say vocab_size)."""
  saved = dict(meta["config"])
  if "vocab_size" in saved: saved["n_tokens"] = saved.pop("vocab_size")
  return Config(**saved)

def config_dict(cfg:Config) -> dict: return asdict(cfg)

def restore(targets:dict[str, Tensor], tensors:dict[str, Tensor], path:str):
  """Assigns tensors[name] to each target, checking that every one is there with the target's shape."""
  for key, v in targets.items():
    if key not in tensors or tensors[key].shape != v.shape:
      raise ValueError(f"{path} lacks {key} or has another shape: it was not written by this train.py")
    v.assign(tensors[key].cast(v.dtype)).realize()
