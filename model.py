"""The denoiser: a bidirectional transformer with adaLN-Zero time conditioning (a DiT, Peebles & Xie 2023) that reads a
partly masked sequence x_t and returns logits for the clean tokens x_0 at every position. Read bottom-up: the
config, the pieces of a block, the block, the denoiser; then the speed devices, each beside the formula it computes."""
import functools, math, operator
from dataclasses import dataclass
from tinygrad import Context, Tensor, dtypes, nn
from tinygrad.dtype import to_dtype
from tinygrad.function import function
from tinygrad.helpers import TRAINING
from tinygrad.nn.state import get_state_dict
from tinygrad.uop.ops import UOp

@dataclass
class Config:
  n_tokens: int = 8193   # token ids 0..n_tokens-1: the K kept by --vocab-size K, and <unk>; the MASK id is n_tokens
  seq_len: int = 128
  dim: int = 128
  n_layers: int = 4
  n_heads: int = 4
  time_cond: bool = True   # off: the network sees only x_t (MDLM: the mask pattern already tells the noise level)
  causal: bool = False     # the autoregressive twin: each position attends only to itself and the positions before it

  @property
  def mask_id(self) -> int: return self.n_tokens
  @property
  def padded_vocab(self) -> int: return (self.n_tokens + 1 + 63) // 64 * 64  # tokens + MASK, rounded up (fast matmuls)

def rmsnorm(x:Tensor, eps=1e-6) -> Tensor:
  return x * (x.float().square().mean(-1, keepdim=True) + eps).rsqrt().cast(x.dtype)

def modulate(x:Tensor, shift:Tensor, scale:Tensor) -> Tensor: return (rmsnorm(x) * (1 + scale) + shift).contiguous()

def rope_tables(seq_len:int, head_dim:int) -> tuple[Tensor, Tensor]:
  # angle(p, i) = p · 10000^(-2i/head_dim), for the half-split rotation below
  freqs = 10000 ** (-Tensor.arange(0, head_dim, 2).float() / head_dim)
  angle = Tensor.arange(seq_len).float().unsqueeze(1) * freqs.unsqueeze(0)  # (seq_len, head_dim/2)
  return stored(angle.cos()).is_param_(False), stored(angle.sin()).is_param_(False)

def rope(x:Tensor, cos:Tensor, sin:Tensor) -> Tensor:
  # rotate each pair (x1_i, x2_i) by its angle: [x1·cos − x2·sin, x2·cos + x1·sin]
  x1, x2 = x.chunk(2, dim=-1)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)

class Linear(nn.Linear):
  """A linear layer that computes in its input's dtype: float32 master weights, bfloat16/float16 matmuls."""
  def __call__(self, x:Tensor) -> Tensor:
    if self.bias is None: return linear(x, self.weight.cast(x.dtype))  # its weight gradient: see the speed devices
    return x.linear(self.weight.cast(x.dtype).T, self.bias.cast(x.dtype))

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

  def __call__(self, x:Tensor, c:Tensor, cos:Tensor, sin:Tensor, attn_bias:Tensor|None=None) -> Tensor:
    """x: (B, T, D); c: (B, D), the time embedding; attn_bias: (T, T) added to the attention scores (−∞ hides a key),
    None for MDLM's bidirectional attention."""
    B, T, D = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c.silu()).unsqueeze(1).chunk(6, dim=-1)  # each (B, 1, D)
    q, k, v = [y.reshape(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, D/H)
               for y in self.qkv(modulate(x, shift1, scale1)).chunk(3, dim=-1)]
    q, k = rope(q, cos, sin).contiguous(), rope(k, cos, sin).contiguous()
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, T, T), float32 for the softmax
    attn = (scores if attn_bias is None else scores + attn_bias).softmax(-1).cast(x.dtype).contiguous() @ v
    x = x + gate1 * self.proj(attn.transpose(1, 2).reshape(B, T, D))          # x + gate·f(rmsnorm(x)·(1+scale) + shift)
    return x + gate2 * self.down(self.up(modulate(x, shift2, scale2)).gelu().contiguous())  # tinygrad's gelu: tanh form

def time_features(t:Tensor, n:int=256) -> Tensor:
  # sinusoidal features of 1000·t: [cos(1000·t·f_i), sin(1000·t·f_i)], f_i = 10000^(-i/(n/2))
  freqs = (-math.log(10000) * Tensor.arange(n // 2).float() / (n // 2)).exp()
  a = 1000 * t.float().unsqueeze(1) * freqs.unsqueeze(0)  # (B, n/2)
  return a.cos().cat(a.sin(), dim=1)

class Denoiser:
  def __init__(self, cfg:Config, dtype:str="float32"):
    self.cfg, self.dtype = cfg, to_dtype(dtype)
    self.tok_emb = Tensor.normal(cfg.padded_vocab, cfg.dim, std=0.02).contiguous()
    self.t_in, self.t_out = Linear(256, cfg.dim), Linear(cfg.dim, cfg.dim)
    self.blocks = [Block(cfg.dim, cfg.n_heads) for _ in range(cfg.n_layers)]
    self.ada_final = zero_linear(cfg.dim, 2 * cfg.dim)
    self._rope = rope_tables(cfg.seq_len, cfg.dim // cfg.n_heads)  # underscore: a buffer, not a parameter
    if cfg.causal:  # −∞ above the diagonal: no position sees the ones after it
      self._causal = stored(Tensor.full((cfg.seq_len, cfg.seq_len), -math.inf).triu(1)).is_param_(False)
    # SUBS: MASK and padding ids get −∞, so p_θ(x_0 = MASK | x_t) = 0
    self._subs = (Tensor.arange(cfg.padded_vocab) >= cfg.n_tokens).where(-math.inf, 0.0).contiguous().is_param_(False)
    Tensor.realize(*get_state_dict(self).values())  # now: left lazy, the draws would depend on what else is drawn first

  def __call__(self, x:Tensor, t:Tensor) -> Tensor:
    """x: (B, T) token ids with MASK where masked; t: (B,) noise levels. Returns (B, T, padded_vocab) logits."""
    T = x.shape[1]
    if not self.cfg.time_cond or self.cfg.causal: t = t.zeros_like()
    c = self.t_out(self.t_in(time_features(t)).silu()).cast(self.dtype)  # (B, D)
    h = embed(self.tok_emb, x, self.dtype)
    cos, sin = self._rope[0][:T], self._rope[1][:T]
    attn_bias = self._causal[:T, :T] if self.cfg.causal else None
    for block in self.blocks: h = block(h, c, cos, sin, attn_bias)
    shift, scale = self.ada_final(c.silu()).unsqueeze(1).chunk(2, dim=-1)
    return tied_head(modulate(h, shift, scale), self.tok_emb.cast(self.dtype)).float() + self._subs  # head = embedding

def parameters(model:Denoiser) -> dict[str, Tensor]:
  return {k: v for k, v in get_state_dict(model).items() if not k.startswith("_")}

def n_params(model:Denoiser) -> int: return sum(v.numel() for v in parameters(model).values())

# ***** speed devices: each computes the plain formula in its docstring, faster on the backend it names
# (tests/test_model.py checks each against that formula, values and gradients). The .contiguous() calls above are of
# the same kind: tinygrad stores the intermediate instead of recomputing it inside every kernel that reads it (GELU
# inside the down-projection and its gradient, say). Together they make the CPU train step ~5x faster (BENCHMARKS.md).

def stored(x:Tensor) -> Tensor:
  """x, computed once into a buffer. Tensors built from arange have no device, so .contiguous() leaves them lazy and
  every kernel that reads them recomputes them (sin/cos/pow in software, in the attention backward). All backends."""
  return Tensor.empty(*x.shape, dtype=x.dtype).assign(x).realize()

def embed(table:Tensor, ids:Tensor, dtype=None, atomic:bool|None=None) -> Tensor:
  """table[ids] in `dtype`, with a backward that scales. Plain indexing's backward is a one-hot reduction over the whole
  vocabulary for every token, on ordinary cores (324 G operations a `base` step: more than the output head's matmul).
  CPU and AMD (atomic): tinygrad's atomic scatter-add (nn.Embedding with USE_ATOMICS) adds each token's gradient into
  its row. Elsewhere (CUDA, NV, METAL, CL, NULL), when training: the backward is a matmul with the one-hot matrix,
  written once in the forward pass so that the matmul reads it as a buffer and runs on tensor cores."""
  dtype = dtype or table.dtype
  if atomic is None: atomic = table.device.split(":")[0] in ("CPU", "AMD")  # the devices with tinygrad's atomic add
  if atomic:
    emb = nn.Embedding.__new__(nn.Embedding)  # an nn.Embedding around our table, without allocating one of its own
    emb.weight = table
    with Context(USE_ATOMICS=1): return emb(ids).cast(dtype)
  if not TRAINING: return table.cast(dtype)[ids]
  onehot = Tensor.arange(table.shape[0]).to(table.device).unsqueeze(1) == ids.flatten().unsqueeze(0)  # (vocab, tokens)
  return _onehot_embed(table.cast(dtype), ids, onehot.cast(dtype).contiguous())

def _onehot_embed_grad(g:UOp, call:UOp) -> tuple[UOp, None, None]:
  # call.src[1:] are _onehot_embed's arguments: table (vocab, D), ids, onehot (vocab, tokens); g: (B, T, D)
  # ∂L/∂table = onehot · g, summed in float32; ids and onehot get no gradient
  table, onehot = call.src[1], Tensor(call.src[3])
  # contiguous: else it fuses with the tied head's weight gradient into one two-reduction kernel without tensor cores
  grad = onehot.matmul(Tensor(g).reshape(-1, table.shape[1]), dtype=dtypes.float32)  # (vocab, D)
  return grad.cast(table.dtype).contiguous().uop, None, None

@function(grad_fxn=_onehot_embed_grad)
def _onehot_embed(table:Tensor, ids:Tensor, onehot:Tensor) -> Tensor: return table[ids]

def _by_rows(w:Tensor, f, dim:int) -> Tensor:
  """f(w), computed as f(first 2^k rows of w) joined with f(the other rows) along dim: the same numbers, but tinygrad's
  CPU heuristic tiles an axis of 8256 = 3·2752 by 3 rather than 4, which makes the vocabulary matmuls ~2x slower. CPU
  only: on a GPU the join is one more copy of the B·T·V logits."""
  n = 1 << (w.shape[0].bit_length() - 1)
  if n == w.shape[0] or not str(w.device).startswith("CPU"): return f(w)
  return f(w[:n]).contiguous().cat(f(w[n:]).contiguous(), dim=dim)

SPLIT_ROWS = 1024  # W's rows per chunk in _split_k: one CPU's `small` step 2.66 s (512), 2.44-2.53 (1024), 2.63 (2048)

def _split_k(g:UOp, w:UOp) -> UOp:
  """g·W (g: (..., V), W: (V, D)) as a sum over chunks of W's rows: each chunk stays in a core's cache while all of g's
  rows pass it. CPU only: in one piece the `small` head's input gradient took 860 ms, a quarter of the step."""
  if not str(w.device).startswith("CPU") or w.shape[0] <= SPLIT_ROWS: return g @ w
  return functools.reduce(operator.add, [(g[..., i:i + SPLIT_ROWS] @ w[i:i + SPLIT_ROWS]).contiguous()
                                       for i in range(0, w.shape[0], SPLIT_ROWS)])

def _linear_grad(g:UOp, call:UOp) -> tuple[UOp, UOp]:
  # call.src[1:] are linear's arguments: x (..., in) and w (out, in); g = ∂L/∂y (..., out)
  # ∂L/∂x = g·W; ∂L/∂W = gᵀ·x, a sum over the B·T tokens, which both operands store a row apart. On a CPU the one with
  # more features is written out transposed first, which tinygrad's tiling handles far faster: the up and down weight
  # gradients were the `small` step's slowest kernels (2 x 219 ms of 2.13 s, one CPU; 1.79 s with this). Square: no gain
  x, w = Tensor(call.src[1]), Tensor(call.src[2])
  g, xs = Tensor(g).reshape(-1, w.shape[0]), x.reshape(-1, w.shape[1])  # (B·T, out), (B·T, in)
  if not str(w.device).startswith("CPU") or w.shape[0] == w.shape[1]: dw = g.T @ xs
  elif w.shape[0] > w.shape[1]: dw = g.T.contiguous() @ xs
  else: dw = (xs.T.contiguous() @ g).T
  return (g @ w).reshape(x.shape).uop, dw.uop

@function(grad_fxn=_linear_grad)
def linear(x:Tensor, w:Tensor) -> Tensor:
  """y = x·Wᵀ: x (..., in), W (out, in), with the backward above. CPU: the weight gradient's faster layout."""
  return x @ w.T

def _tied_head_grad(g:UOp, call:UOp) -> tuple[UOp, UOp]:
  # call.src[1:] are tied_head's arguments: h (B, T, D) and w (V, D); g = ∂L/∂logits (B, T, V)
  # ∂L/∂h = g·W and ∂L/∂W = gᵀ·h, with gᵀ written out once: read in place, its stride over tokens makes that matmul
  # ~4x slower
  h, w = call.src[1:]
  g = g.contiguous()
  gT, h = g.reshape(-1, g.shape[-1]).T.contiguous(), h.reshape(-1, h.shape[-1])  # (V, B·T), (B·T, D)
  return _split_k(g, w), _by_rows(gT, lambda rows: rows @ h, dim=0)

@function(grad_fxn=_tied_head_grad)
def tied_head(h:Tensor, w:Tensor) -> Tensor:
  """logits = h·Wᵀ: h (B, T, D), W (V, D) -> (B, T, V), with the custom backward above. All backends."""
  return _by_rows(w, lambda rows: h @ rows.T, dim=-1)
