"""The denoiser: a bidirectional transformer with adaLN-Zero time conditioning (a DiT) that reads a
partly masked sequence x_t and returns logits for the clean tokens x_0 at every position.
Also the Config and checkpoint save/load, so that everything about the network lives in one file."""
import argparse, ctypes, json, math, os, shutil
from dataclasses import asdict, dataclass
from tinygrad import Context, Device, Tensor, dtypes, nn
from tinygrad.dtype import to_dtype
from tinygrad.helpers import DEV, TRAINING
from tinygrad.function import function
from tinygrad.nn.state import get_state_dict, safe_load, safe_load_metadata
from tinygrad.uop.ops import UOp

@dataclass
class Config:
  vocab_size: int = 8193   # real tokens (the compact vocabulary with <unk>); the MASK id is vocab_size
  seq_len: int = 128
  dim: int = 128
  n_layers: int = 4
  n_heads: int = 4
  time_cond: bool = True   # off: the network sees only x_t (MDLM: the mask pattern already tells the noise level)
  causal: bool = False     # the autoregressive twin: each position attends only to itself and the positions before it

  @property
  def mask_id(self) -> int: return self.vocab_size
  @property
  def padded_vocab(self) -> int: return (self.vocab_size + 1 + 63) // 64 * 64  # tokens + MASK, rounded up for fast matmuls

PRESETS = {  # named sizes of the network and its batch, shared by train.py and bench.py (train.py adds its schedule)
  "tiny":  dict(dim=32, n_layers=2, n_heads=2, seq_len=32, vocab_size=512, batch_size=8, dtype="float32"),    # seconds: tests
  "small": dict(dim=128, n_layers=4, n_heads=4, seq_len=128, vocab_size=8192, batch_size=16, dtype="float32"),  # a CPU
  "base":  dict(dim=512, n_layers=8, n_heads=8, seq_len=256, vocab_size=8192, batch_size=64, dtype="bfloat16"), # one GPU
}

def positive(kind):
  def parse(s):
    v = kind(s)
    if v <= 0: raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v
  return parse

def add_size_flags(p:argparse.ArgumentParser):
  """The flags that override a preset's network and batch; left out, they stay None for the preset to fill."""
  p.add_argument("--preset", choices=PRESETS, help="default: small on CPU, base on a GPU")
  for name in ("dim", "n_layers", "n_heads", "seq_len", "batch_size"): p.add_argument("--" + name.replace("_", "-"), type=positive(int))
  p.add_argument("--vocab-size", type=int, help="keep the K most frequent training tokens (+ <unk>); 0: all of GPT-2")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype; weights and optimizer stay float32")
  p.add_argument("--no-time-cond", dest="time_cond", action="store_false", default=None, help="the denoiser ignores t (enables the cached sampler)")
  p.add_argument("--devices", type=positive(int), help="train data-parallel on N devices of the backend (default: all; 2 on a CPU)")

def check_size(args):
  if args.vocab_size < 0: raise ValueError(f"--vocab-size must be >= 0, got {args.vocab_size}")
  if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
    raise ValueError(f"--dim {args.dim} must be a multiple of --n-heads {args.n_heads}, with an even head size")
  if getattr(args, "devices", None) and args.batch_size % args.devices:
    raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}")
  return args

def rmsnorm(x:Tensor, eps=1e-6) -> Tensor: return x * (x.float().square().mean(-1, keepdim=True) + eps).rsqrt().cast(x.dtype)

def modulate(x:Tensor, shift:Tensor, scale:Tensor) -> Tensor: return (rmsnorm(x) * (1 + scale) + shift).contiguous()

# Speed notes: the .contiguous() calls in this file are where tinygrad stores an intermediate instead of recomputing it
# inside every kernel that reads it (e.g. GELU inside the down-projection and its gradient); together with stored(),
# embed() and tied_head() they make the CPU train step ~5x faster than the plain formulation (BENCHMARKS.md).

def rope_tables(seq_len:int, head_dim:int) -> tuple[Tensor, Tensor]:
  # angle(p, i) = p · 10000^(-2i/head_dim), for the half-split rotation below
  angle = Tensor.arange(seq_len).float().unsqueeze(1) * (10000 ** (-Tensor.arange(0, head_dim, 2).float() / head_dim)).unsqueeze(0)
  return stored(angle.cos()).is_param_(False), stored(angle.sin()).is_param_(False)

def stored(x:Tensor) -> Tensor:
  """Compute x once into a buffer. Tensors built from arange have no device, so .contiguous() leaves them lazy and
  every kernel that reads them recomputes them (sin/cos/pow in software, inside the attention backward)."""
  return Tensor.empty(*x.shape, dtype=x.dtype).assign(x).realize()

def rope(x:Tensor, cos:Tensor, sin:Tensor) -> Tensor:
  # rotate each pair (x1_i, x2_i) by its angle: [x1·cos − x2·sin, x2·cos + x1·sin]
  x1, x2 = x.chunk(2, dim=-1)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)

def embed(table:Tensor, ids:Tensor, dtype=None, atomic:bool|None=None) -> Tensor:
  """table[ids] in `dtype`, with a backward that scales. Plain indexing's backward is a one-hot reduction over the whole
  vocabulary for every token, on ordinary cores (324 G operations a `base` step: more than the output head's matmul).
  On CPU and AMD, tinygrad's atomic scatter-add (nn.Embedding with USE_ATOMICS) adds each token's gradient into its row;
  elsewhere (CUDA, NV, METAL, CL, NULL), when training, the backward is a matmul with the one-hot matrix, written once
  in the forward pass so that the matmul reads it as a buffer and runs on tensor cores."""
  dtype = dtype or table.dtype
  if atomic is None: atomic = table.device.split(":")[0] in ("CPU", "AMD")  # the devices with tinygrad's atomic add
  if atomic:
    emb = nn.Embedding.__new__(nn.Embedding)
    emb.weight = table
    with Context(USE_ATOMICS=1): return emb(ids).cast(dtype)
  if not TRAINING: return table.cast(dtype)[ids]
  onehot = Tensor.arange(table.shape[0]).to(table.device).unsqueeze(1) == ids.flatten().unsqueeze(0)  # (vocab, tokens)
  return _onehot_embed(table.cast(dtype), ids, onehot.cast(dtype).contiguous())

def _onehot_embed_grad(g:UOp, call:UOp) -> tuple[UOp, None, None]:
  # ∂L/∂table = onehot(ids)ᵀ · g, summed in float32
  table, onehot = call.src[1], Tensor(call.src[3])
  # contiguous: else it fuses with the tied head's weight gradient into one two-reduction kernel that has no tensor cores
  return onehot.matmul(Tensor(g).reshape(-1, table.shape[1]), dtype=dtypes.float32).cast(table.dtype).contiguous().uop, None, None

@function(grad_fxn=_onehot_embed_grad)
def _onehot_embed(table:Tensor, ids:Tensor, onehot:Tensor) -> Tensor: return table[ids]

def _by_rows(w:Tensor, f, dim:int) -> Tensor:
  """f(w), computed as f(first 2^k rows of w) joined with f(the other rows) along dim: the same numbers, but tinygrad's CPU
  heuristic tiles an axis of 8256 = 3·2752 by 3 rather than 4, which makes the vocabulary matmuls ~2x slower. CPU only: on a
  GPU the join is one more copy of the B·T·V logits."""
  n = 1 << (w.shape[0].bit_length() - 1)
  return f(w) if n == w.shape[0] or not str(w.device).startswith("CPU") else f(w[:n]).contiguous().cat(f(w[n:]).contiguous(), dim=dim)

def _tied_head_grad(g:UOp, call:UOp) -> tuple[UOp, UOp]:
  # d/dh = g·W and d/dW = gᵀ·h, with gᵀ written out once: read in place, gᵀ's stride over tokens makes that matmul ~4x slower
  h, w = call.src[1:]
  g = g.contiguous()
  gT, h = g.reshape(-1, g.shape[-1]).T.contiguous(), h.reshape(-1, h.shape[-1])
  return g @ w, _by_rows(gT, lambda rows: rows @ h, dim=0)

@function(grad_fxn=_tied_head_grad)
def tied_head(h:Tensor, w:Tensor) -> Tensor: return _by_rows(w, lambda rows: h @ rows.T, dim=-1)  # logits = h·Wᵀ

class Linear(nn.Linear):
  """A linear layer that computes in its input's dtype: float32 master weights, bfloat16/float16 matmuls."""
  def __call__(self, x:Tensor) -> Tensor:
    return x.linear(self.weight.cast(x.dtype).T, None if self.bias is None else self.bias.cast(x.dtype))

def zero_linear(d_in:int, d_out:int) -> Linear:
  """adaLN-Zero: modulation starts at zero, so every block is the identity at initialisation."""
  lin = Linear(d_in, d_out)
  lin.weight, lin.bias = Tensor.zeros(d_out, d_in).contiguous(), Tensor.zeros(d_out).contiguous()
  return lin

class Block:
  def __init__(self, dim:int, n_heads:int):
    self.n_heads = n_heads
    self.qkv, self.proj = Linear(dim, 3 * dim, bias=False), Linear(dim, dim, bias=False)
    self.up, self.down = Linear(dim, 4 * dim, bias=False), Linear(4 * dim, dim, bias=False)
    self.ada = zero_linear(dim, 6 * dim)

  def __call__(self, x:Tensor, c:Tensor, cos:Tensor, sin:Tensor, mask:Tensor|None=None) -> Tensor:
    B, T, D = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c.silu()).unsqueeze(1).chunk(6, dim=-1)
    q, k, v = [y.reshape(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
               for y in self.qkv(modulate(x, shift1, scale1)).chunk(3, dim=-1)]
    q, k = rope(q, cos, sin).contiguous(), rope(k, cos, sin).contiguous()
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # softmax in float32, matmuls (and their grads) in x's dtype
    attn = (scores if mask is None else scores + mask).softmax(-1).cast(x.dtype).contiguous() @ v  # MDLM: bidirectional, mask None
    x = x + gate1 * self.proj(attn.transpose(1, 2).reshape(B, T, D))            # x + gate·f(rmsnorm(x)·(1+scale) + shift)
    return x + gate2 * self.down(self.up(modulate(x, shift2, scale2)).gelu().contiguous())  # tinygrad's gelu is the tanh form

def time_features(t:Tensor, n:int=256) -> Tensor:
  # sinusoidal features of 1000·t: [cos(1000·t·f_i), sin(1000·t·f_i)], f_i = 10000^(-i/(n/2))
  freqs = (-math.log(10000) * Tensor.arange(n // 2).float() / (n // 2)).exp()
  a = 1000 * t.float().unsqueeze(1) * freqs.unsqueeze(0)
  return a.cos().cat(a.sin(), dim=1)

class Denoiser:
  def __init__(self, cfg:Config, dtype:str="float32"):
    self.cfg, self.dtype = cfg, to_dtype(dtype)
    self.tok_emb = Tensor.normal(cfg.padded_vocab, cfg.dim, std=0.02).contiguous()
    self.t_in, self.t_out = Linear(256, cfg.dim), Linear(cfg.dim, cfg.dim)
    self.blocks = [Block(cfg.dim, cfg.n_heads) for _ in range(cfg.n_layers)]
    self.ada_final = zero_linear(cfg.dim, 2 * cfg.dim)
    self._rope = rope_tables(cfg.seq_len, cfg.dim // cfg.n_heads)  # underscore: a buffer, not a parameter
    if cfg.causal: self._causal = stored(Tensor.full((cfg.seq_len, cfg.seq_len), -math.inf).triu(1)).is_param_(False)  # −∞: the future
    # SUBS: MASK and padding ids get −∞, so p_θ(x_0 = MASK | x_t) = 0
    self._subs = (Tensor.arange(cfg.padded_vocab) >= cfg.vocab_size).where(-math.inf, 0.0).contiguous().is_param_(False)
    Tensor.realize(*get_state_dict(self).values())  # now: left lazy, the draws would depend on what else is drawn first

  def __call__(self, x:Tensor, t:Tensor) -> Tensor:
    """x: (B, T) token ids with MASK where masked; t: (B,) noise levels. Returns (B, T, padded_vocab) logits."""
    T = x.shape[1]
    if not self.cfg.time_cond or self.cfg.causal: t = t.zeros_like()
    c = self.t_out(self.t_in(time_features(t)).silu()).cast(self.dtype)
    h = embed(self.tok_emb, x, self.dtype)
    cos, sin = self._rope[0][:T], self._rope[1][:T]
    mask = self._causal[:T, :T] if self.cfg.causal else None
    for block in self.blocks: h = block(h, c, cos, sin, mask)
    shift, scale = self.ada_final(c.silu()).unsqueeze(1).chunk(2, dim=-1)
    return tied_head(modulate(h, shift, scale), self.tok_emb.cast(self.dtype)).float() + self._subs  # head tied to the embedding

def is_cpu(device:str|None=None) -> bool:
  """The CPU backend, or an OpenCL driver that runs on the CPU (PoCL, Intel's CPU runtime): GPU-style kernels on the
  same cores, so a CPU's preset (`small`, float32), not a GPU's."""
  device = device or Device.DEFAULT
  if device.split(":")[0] == "CL":
    from tinygrad.runtime.autogen import opencl as cl
    kind = ctypes.c_uint64()
    cl.clGetDeviceInfo(Device[device].cl_dev, cl.CL_DEVICE_TYPE, 8, ctypes.byref(kind), None)
    return bool(kind.value & cl.CL_DEVICE_TYPE_CPU)
  return device.split(":")[0] == "CPU"

def prefer_cpu_backend():
  """With DEV unset, tinygrad picks an OpenCL driver over its CPU backend even when the driver runs on the CPU (PoCL,
  Intel's CPU runtime): take the CPU backend then, so that installing such a driver changes nothing (two devices, the
  atomic embedding backward). DEV=CL still selects it."""
  if not DEV.device and Device.DEFAULT.startswith("CL") and is_cpu() and shutil.which(os.environ.get("CC", "clang")):
    DEV.value = os.environ["DEV"] = "CPU"  # the environment too, for child processes, as tinygrad does

def device_name(device:str|None=None) -> str:
  d = Device[device := device or Device.DEFAULT]
  name = (getattr(d, "device_name", None) or d.renderer.target.arch.split(",")[0]) + (", a CPU" if device.startswith("CL") and is_cpu(device) else "")
  return f"{device} ({name})" if name else device

def supported_dtype(dtype:str, device:str|None=None) -> str:
  """`dtype` where the backend computes in it, else the next one down: bfloat16 → float16 → float32 (CUDA's bfloat16
  needs sm_80+, Metal's Apple6+, the CPU's a clang with __bf16: asked of tinygrad, then tried on one number)."""
  device, order = device or Device.DEFAULT, ["bfloat16", "float16", "float32"]
  def computes(d:str) -> bool:
    if to_dtype(d) not in Device[device].renderer.supported_dtypes(): return False
    if device.startswith("NULL"): return True  # NULL compiles and runs nothing
    err, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # a compiler that fails prints the kernel
    try: return Tensor([1.5], device=device).cast(d).contiguous().float().item() == 1.5
    except Exception: return False
    finally: os.dup2(err, 2); os.close(err); os.close(null)
  return next((d for d in order[order.index(dtype):-1] if computes(d)), "float32")

def devices(batch_size:int, n:int|None=None) -> list[str]:
  """Where the train step runs: n devices of the default backend, each with an equal slice of the batch. Left out: two
  on a CPU with two or more cores (tinygrad runs each CPU kernel in the calling thread, so a second CPU device, driven
  from a second thread, nearly doubles the speed; two is what has been measured), else all of the backend's devices."""
  backend = Device.DEFAULT.split(":")[0]
  if n is None:
    n = min(2, os.cpu_count() or 1) if backend == "CPU" else Device[Device.DEFAULT].count()
    while batch_size % n: n -= 1
  return [Device.DEFAULT] + [f"{backend}:{i}" for i in range(1, n)]

def replicas(model:Denoiser, devices:list[str]) -> list[tuple[Denoiser, list[Tensor]]]:
  """(copy, its parameters) for `model` and one more copy on each further device, for diffusion.train_step, which keeps
  the copies' weights equal to the first's."""
  copies = [model]
  for device in devices[1:]:
    copies.append(Denoiser(model.cfg, model.dtype))
    for v in get_state_dict(copies[-1]).values(): v.replace(v.to(device).realize())
  return [(m, list(parameters(m).values())) for m in copies]

def parameters(model:Denoiser) -> dict[str, Tensor]:
  return {k: v for k, v in get_state_dict(model).items() if not k.startswith("_")}

def n_params(model:Denoiser) -> int: return sum(v.numel() for v in parameters(model).values())

# ***** checkpoints: safetensors with the config and driver state as JSON metadata *****

SAFETENSORS_DTYPES = {dtypes.float32: "F32", dtypes.float16: "F16", dtypes.int32: "I32", dtypes.int64: "I64", dtypes.uint8: "U8"}

def save_checkpoint(path:str, tensors:dict[str, Tensor], meta:dict):
  """The safetensors layout (header length, JSON header, raw bytes) written from host copies, to a temp file that is then
  renamed: a crash mid-write leaves the previous checkpoint intact. Not tinygrad's safe_save: it builds the header with
  a CPU kernel, which needs clang, which GPU machines often lack."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  header, blobs, offset = {"__metadata__": {k: json.dumps(v) for k, v in meta.items()}}, [], 0
  for name, v in tensors.items():
    blobs.append(v.contiguous().realize().numpy().tobytes())
    header[name] = {"dtype": SAFETENSORS_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(blobs[-1])]}
    offset += len(blobs[-1])
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
  with open(tmp := path + ".tmp", "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head)
    for b in blobs: f.write(b)
    f.flush(); os.fsync(f.fileno())
  os.replace(tmp, path)

def load_checkpoint(path:str) -> tuple[dict[str, Tensor], dict]:
  if not os.path.exists(path): raise FileNotFoundError(f"no checkpoint at {path}: run `python train.py` first (or pass --ckpt)")
  try:
    meta = {k: json.loads(v) for k, v in safe_load_metadata(path)[2].get("__metadata__", {}).items()}
    tensors = {k: v.to(Device.DEFAULT).realize() for k, v in safe_load(path).items()}
  except Exception as e: raise ValueError(f"{path} is not a readable tinymdlm checkpoint ({type(e).__name__}): delete it or retrain") from e
  if "config" not in meta: raise ValueError(f"{path} has no model config: it was not written by train.py")
  return tensors, meta

def config_from(meta:dict) -> Config: return Config(**meta["config"])
def config_dict(cfg:Config) -> dict: return asdict(cfg)
