"""The run directory (--out): ckpt.safetensors, the weights and (for a run in progress) the optimizer's state, with the
network's config and the run's settings as JSON metadata; log.jsonl, one JSON line per step; a lock while a run writes
there. Everything is written through a temp file that is renamed or removed, so that a crash, a full disk or Ctrl-C at
any moment leaves the last good state readable and no temp file behind. Also the shipped models (models/)."""
import contextlib, json, os, shutil
from dataclasses import asdict
import numpy as np
from tinygrad import Tensor, dtypes
from data import explain
from model import Config, parameters

FORMAT = 1  # of the checkpoint's metadata; a checkpoint from before it existed is format 1
DTYPES = {dtypes.float32: ("F32", np.float32), dtypes.float16: ("F16", np.float16), dtypes.int32: ("I32", np.int32),
          dtypes.int64: ("I64", np.int64), dtypes.uint8: ("U8", np.uint8)}
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
SHIPPED = {"mdlm": os.path.join(MODELS, "mdlm.safetensors"), "twin": os.path.join(MODELS, "twin.safetensors")}

def write_atomically(path:str, chunks):
  """The byte strings of `chunks` as the file at path, all or nothing: written to a temp file, synced, renamed over
  path. Anything that stops it (a full disk, a read-only place, Ctrl-C) removes the temp file; an OSError becomes a
  ValueError with one line that says what happened and what to do."""
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "wb") as f:
      for chunk in chunks: f.write(chunk)
      f.flush(); os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError): os.remove(tmp)
    if isinstance(e, OSError): raise ValueError(f"cannot write {path}: {explain(e)}") from None
    raise

def save(path:str, tensors:dict[str, Tensor], meta:dict):
  """The safetensors layout (header length, JSON header, raw bytes) from host copies, written atomically. Not tinygrad's
  safe_save: it builds the header with a CPU kernel, which needs clang, which GPU machines often lack."""
  header, blobs, offset = {"__metadata__": {k: json.dumps(v) for k, v in {"format": FORMAT, **meta}.items()}}, [], 0
  for key, v in tensors.items():
    blobs.append(v.contiguous().realize().numpy().tobytes())
    header[key] = {"dtype": DTYPES[v.dtype][0], "shape": list(v.shape),
                   "data_offsets": [offset, offset + len(blobs[-1])]}
    offset += len(blobs[-1])
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
  write_atomically(path, [len(head).to_bytes(8, "little") + head, *blobs])

def load(path:str, missing:str="run `python train.py` first, or pass --ckpt") -> tuple[dict[str, Tensor], dict]:
  """(tensors on the default device, metadata) of a checkpoint written by `save`. Raises ValueError or
  FileNotFoundError with one line that says which it is: no file (`missing` says what to do), a directory, not a
  safetensors file, not a tinymdlm checkpoint, or one written by a newer version."""
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory: pass the checkpoint in it, {os.path.join(path, 'ckpt.safetensors')}")
  if not os.path.exists(path): raise FileNotFoundError(f"no checkpoint at {path}: {missing}")
  names = {name: dt for name, dt in DTYPES.values()}
  try:
    raw = np.memmap(path, np.uint8, "r")
    n = int(raw[:8].view(np.uint64)[0]) if len(raw) >= 8 else -1
    header = json.loads(raw[8:8 + n].tobytes()) if 0 < n <= len(raw) - 8 else None
    meta = {k: json.loads(v) for k, v in header.pop("__metadata__", {}).items()}
    arrays = {k: raw[8 + n + h["data_offsets"][0]:8 + n + h["data_offsets"][1]].view(names[h["dtype"]])
                 .reshape(h["shape"]) for k, h in header.items()}
  except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
    raise ValueError(f"{path} is not a checkpoint (not a safetensors file with tensors this project writes)") from None
  if "config" not in meta:
    raise ValueError(f"{path} is a safetensors file but not a tinymdlm checkpoint (no model config in it)")
  if meta.get("format", 1) > FORMAT:
    raise ValueError(f"{path} was written by a newer tinymdlm (checkpoint format {meta['format']}, this one reads "
                     f"{FORMAT}): update")
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
    if key not in tensors:
      raise ValueError(f"{path} has no {key}: it was written by another version of tinymdlm, or another script")
    if tensors[key].shape != v.shape:
      raise ValueError(f"{path} holds {key} of shape {tensors[key].shape}, not {v.shape}: written by another version "
                       "of tinymdlm")
  Tensor.realize(*[v.assign(tensors[key].cast(v.dtype)) for key, v in targets.items()])

def step_on_disk(path:str) -> int|None:
  """The step of the checkpoint at path, or None if there is none (or it cannot be read)."""
  try: return load(path)[1]["step"]
  except (ValueError, FileNotFoundError): return None

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
  write_atomically(path, [(json.dumps(r) + "\n").encode() for r in rows])

def repair_log(path:str, step:int) -> str|None:
  """Keeps exactly the steps a checkpoint of `step` holds in its log: lines past it (steps the checkpoint lost) and a
  line cut by a crash are dropped. Returns what was dropped, in words, or None if nothing was."""
  rows, bad = read_log(path) if os.path.exists(path) else ([], 0)
  kept = [r for r in rows if r.get("step", float("inf")) <= step]
  write_log(path, kept)
  if not bad and len(kept) == len(rows) and len(kept) >= step: return None
  return (f"{path}: kept steps {kept[0]['step'] if kept else '-'}..{kept[-1]['step'] if kept else '-'} of the "
          f"checkpoint's {step}" + (f", dropped {bad} damaged line(s)" if bad else "") +
          (f", dropped {len(rows) - len(kept)} line(s) past the checkpoint" if len(kept) < len(rows) else ""))

def set_aside(path:str) -> str|None:
  """Renames a file that a new run would otherwise mix with (the log of a run that never wrote a checkpoint) to the
  first free path.N; returns the new name, or None if there was no file."""
  if not os.path.exists(path): return None
  n = next(i for i in range(1, 10**6) if not os.path.exists(f"{path}.{i}"))
  os.replace(path, f"{path}.{n}")
  return f"{path}.{n}"

def check_space(out:str, nbytes:int, resuming:bool):
  """A run keeps one checkpoint of nbytes and writes the next beside it before the rename: refuse to start where the
  disk has no room for that (one more for a run that has none yet)."""
  need, free = nbytes * (1 if resuming else 2) + (1 << 20), shutil.disk_usage(out).free
  if free < need:
    raise ValueError(f"{out} has {free / 1e6:.1f} MB free, and a run there needs {need / 1e6:.1f} MB for its "
                     "checkpoints: free some space, or choose another --out")

_locks: dict[str, object] = {}  # run directory -> its lock file, held by this process until it ends

def lock(out:str):
  """Takes out/lock for as long as this process lives, or raises if another process holds it (two runs writing one
  checkpoint and log would each overwrite the other's). The OS releases it when the process ends, however it ends.
  Creating it checks, before any work, that out is a directory this process can write in."""
  if (key := os.path.realpath(out)) in _locks: return
  try:
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, "lock"), "a+")
  except OSError as e: raise ValueError(f"cannot use --out {out}: {explain(e)}") from None
  try: import fcntl
  except ImportError: return  # Windows: no lock
  try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    raise ValueError(f"another train.py is writing to {out}: wait for it to finish, or use another --out") from None
  _locks[key] = f

# ***** a training run's directory: what train.py starts, resumes and saves

def open_run(out:str, resume:bool) -> tuple[dict|None, dict|None]:
  """Takes the run directory (lock) and returns the checkpoint to resume: (tensors, meta), or (None, None) for a fresh
  run, whose directory must hold no checkpoint; a log left there by a run that never wrote one is set aside."""
  lock(out)
  ckpt, log = os.path.join(out, "ckpt.safetensors"), os.path.join(out, "log.jsonl")
  if resume: return load(ckpt, f"nothing to resume in {out}: start without --resume")
  if os.path.exists(ckpt): raise ValueError(f"{ckpt} already exists: pass --resume to continue it, or --out DIR for a "
                                            "new run")
  if old := set_aside(log): print(f"{log} was left by a run that wrote no checkpoint: moved to {old}")
  return None, None

def state(model, ema, opt, keep) -> dict[str, Tensor]:
  """Everything a checkpoint holds to resume exactly: weights, the average, Adam's moments, the vocabulary."""
  tensors = {f"model.{k}": v for k, v in parameters(model).items()}
  if ema: tensors.update({f"ema.{k}": v for k, v in parameters(ema).items()})
  tensors.update({f"opt.m.{i}": m for i, m in enumerate(opt.m)} | {f"opt.v.{i}": v for i, v in enumerate(opt.v)})
  tensors.update({"opt.b1_t": opt.b1_t, "opt.b2_t": opt.b2_t})
  if keep is not None: tensors["vocab.keep"] = Tensor(np.asarray(keep, np.int32))
  return tensors

def resume(out:str, meta:dict, tensors:dict, targets:dict[str, Tensor], rng:np.random.Generator):
  """Where the run stopped: its state into `targets`, its data generator, and its log cut to the checkpoint's steps."""
  restore(targets, tensors, os.path.join(out, "ckpt.safetensors"))
  rng.bit_generator.state = meta["rng"]
  if dropped := repair_log(os.path.join(out, "log.jsonl"), meta["step"]): print(dropped)

def check_resumable(meta:dict, args, keep, data_key:str, arch:tuple) -> list[str]:
  """A checkpoint continues only the run that wrote it: the same architecture, preset, data, vocabulary and random
  state. Every other setting given at --resume is applied: returns them, as '--lr 0.0005 (was 0.001)'."""
  saved, out = meta["args"], args.out
  for k in arch + ("preset",):
    if getattr(args, k) != saved.get(k, getattr(args, k)):
      flag = "--" + "no-" * (getattr(args, k) is False) + k.replace("_", "-")  # a switch turned off: --no-x
      raise ValueError(f"the checkpoint in {out} has {k}={saved[k]}, but you asked for {getattr(args, k)}: drop "
                       f"{flag} to resume it, or use another --out for a new run")
  if meta.get("data_key", data_key) != data_key:
    raise ValueError(f"the run in {out} trained on data {saved['data']} with content {meta['data_key']}, but "
                     f"{args.data} now holds {data_key}: restore that data, or use another --out for a new run")
  if meta["vocab_keep"] != (None if keep is None else [int(i) for i in keep]):
    raise ValueError(f"the checkpoint in {out} was trained on a different vocabulary (data {saved['data']!r}): resume "
                     "with the same --data, or use another --out")
  changed = [k for k in sorted(args.explicit) if k in saved and getattr(args, k) != saved[k] and k != "data"]
  if "seed" in changed:
    raise ValueError("--seed does nothing at --resume (the random state continues from the checkpoint): drop it")
  if "ema" in changed and (args.ema > 0) != (saved["ema"] > 0):
    raise ValueError(f"the run in {out} was trained {'with' if saved['ema'] > 0 else 'without'} a weight average: "
                     "--ema can change its decay at --resume, not turn it on or off")
  return [f"--{k.replace('_', '-')} {getattr(args, k)} (was {saved[k]})" for k in changed]

def nan_message(loss:float, step:int, out:str, first_save:int) -> str:
  """What a run that diverged says: where it broke, what is on disk, what to try."""
  ckpt = os.path.join(out, "ckpt.safetensors")
  saved = step_on_disk(ckpt)
  on_disk = f"{ckpt} holds step {saved}, the last good checkpoint" if saved else \
            f"no checkpoint was written yet (the first comes at step {first_save})"
  return f"the loss became {loss} at step {step}; {on_disk}: lower --lr or raise --warmup, and " + \
         ("--resume" if saved else "start again")

# ***** a trained model, for sampling

def load_model(path:str, missing:str="run `python train.py` first, or pass --ckpt"):
  """(the denoiser of a checkpoint, with its weight average when it has one; its vocabulary; its metadata)."""
  from model import Denoiser
  tensors, meta = load(path, missing)
  model = Denoiser(config(meta))
  prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
  restore({prefix + k: v for k, v in parameters(model).items()}, tensors, path)
  meta["averaged"] = prefix == "ema." or bool(meta.get("averaged"))
  return model, (tensors["vocab.keep"].numpy().tolist() if "vocab.keep" in tensors else None), meta

def default_checkpoint(path:str|None, user:str="out/ckpt.safetensors") -> tuple[str, str]:
  """The checkpoint to sample from, and why that one: the one asked for, else the user's own run, else the shipped."""
  if path: return path, ""
  if os.path.exists(user): return user, "your own run (pass --ckpt to choose)"
  return SHIPPED["mdlm"], f"the model shipped in models/ (you have no {user} yet)"

def describe(path:str, meta:dict) -> str:
  """What a checkpoint is, in one line: preset, step, its validation figure, averaged weights or not."""
  run, val = meta["args"], meta.get("val") or {}
  kind = "autoregressive twin" if run.get("causal") else "MDLM"
  figure = (f"val {'NLL' if run.get('causal') else 'NELBO'} {val['nelbo']:.3f} at step {val['step']}" if val
            else "no evaluation yet")
  return (f"{path}: {kind}, preset {run.get('preset')}, step {meta['step']} of {run.get('steps')}, {figure}, "
          f"{'averaged (EMA) weights' if meta['averaged'] else 'raw weights'}, data {run.get('data')}")

def load_twin(path:str|None, keep, flag:str):
  """The autoregressive twin given as --judge or --race (the shipped one when none is named), on the diffusion model's
  vocabulary."""
  how = "train one with `python train.py --causal --out out/twin` (the same --data and --vocab-size as the model) " \
        f"and pass --{flag} out/twin/ckpt.safetensors"
  twin, twin_keep, _ = load_model(path or SHIPPED["twin"], how)
  if not twin.cfg.causal: raise ValueError(f"--{flag} {path} is not an autoregressive twin: {how}")
  if twin_keep != keep:
    raise ValueError(f"--{flag} {path or SHIPPED['twin']} has another vocabulary than the diffusion model: {how}")
  return twin

def ship(src:str, dest:str):
  """A run's checkpoint as a model to ship: its weight average (else its weights) in float16, its vocabulary and the
  run's settings, without the optimizer's state: a quarter of the size. python -m harness.rundir SRC DEST"""
  tensors, meta = load(src)
  prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
  out = {"model." + k[len(prefix):]: v.cast(dtypes.float16) for k, v in tensors.items() if k.startswith(prefix)}
  if "vocab.keep" in tensors: out["vocab.keep"] = tensors["vocab.keep"]
  keys = ("config", "step", "tokens", "elapsed_s", "val", "vocab_keep", "data_key", "args")
  save(dest, out, {k: meta[k] for k in keys if k in meta} | {"averaged": prefix == "ema."})

if __name__ == "__main__":
  import sys
  if len(sys.argv) != 3: sys.exit("usage: python -m harness.rundir RUN/ckpt.safetensors models/NAME.safetensors")
  try: ship(*sys.argv[1:])
  except (ValueError, FileNotFoundError) as e: sys.exit(f"error: {e}")
