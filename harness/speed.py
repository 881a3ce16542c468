"""Speed devices: each computes the plain formula written beside it, faster on the backend it names, and falls back to
that formula everywhere else. PLAIN_FORMULAS=1 in the environment (or `speed.PLAIN = True`) runs the plain formulas on
every backend, as nanoGPT keeps its manual attention beside flash attention: tests/test_speed.py compares the two,
values and gradients. They make the CPU train step about 5x faster (BENCHMARKS.md). The custom backwards use
tinygrad's `function` (a call with its own gradient), an internal API listed in the README."""
import functools, operator, os
from tinygrad import Context, Tensor, dtypes, nn
from tinygrad.function import function
from tinygrad.helpers import TRAINING
from tinygrad.uop.ops import UOp

PLAIN = os.environ.get("PLAIN_FORMULAS", "0") not in ("", "0")

def on(x:Tensor, *backends:str) -> bool:
  """Whether x lives on one of these backends (and the plain formulas are not forced)."""
  return not PLAIN and str(x.device).split(":")[0] in backends

def stored(x:Tensor) -> Tensor:
  """x, computed once into a buffer. Plain: x itself. Tensors built from arange have no device, so .contiguous() leaves
  them lazy and every kernel that reads them recomputes them (sin/cos/pow in software, in the attention backward)."""
  if PLAIN: return x.contiguous()
  return Tensor.empty(*x.shape, dtype=x.dtype).assign(x).realize()

# ***** the embedding: table[ids]

def embed(table:Tensor, ids:Tensor, dtype=None, atomic:bool|None=None) -> Tensor:
  """table[ids] in `dtype`, with a backward that scales. Plain indexing's backward is a one-hot reduction over the whole
  vocabulary for every token, on ordinary cores (324 G operations a `base` step: more than the output head's matmul).
  CPU and AMD (atomic): tinygrad's atomic scatter-add (nn.Embedding with USE_ATOMICS) adds each token's gradient into
  its row. Elsewhere (CUDA, NV, METAL, CL, NULL), when training: the backward is a matmul with the one-hot matrix,
  written once in the forward pass so that the matmul reads it as a buffer and runs on tensor cores."""
  dtype = dtype or table.dtype
  if not PLAIN and (atomic if atomic is not None else on(table, "CPU", "AMD")):
    emb = nn.Embedding.__new__(nn.Embedding)  # an nn.Embedding around our table, without allocating one of its own
    emb.weight = table
    with Context(USE_ATOMICS=1): return emb(ids).cast(dtype)
  if PLAIN or not TRAINING: return table.cast(dtype)[ids]
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

# ***** a bias-free linear layer: x @ wᵀ

def linear(x:Tensor, w:Tensor) -> Tensor:
  """y = x·Wᵀ: x (..., in), W (out, in). CPU: a backward whose weight gradient has a faster layout (_linear_grad)."""
  return _linear(x, w) if on(w, "CPU") and w.shape[0] != w.shape[1] else x @ w.T

def _linear_grad(g:UOp, call:UOp) -> tuple[UOp, UOp]:
  # call.src[1:] are _linear's arguments: x (..., in) and w (out, in); g = ∂L/∂y (..., out)
  # ∂L/∂x = g·W; ∂L/∂W = gᵀ·x, a sum over the B·T tokens, which both operands store a row apart. The one with more
  # features is written out transposed first, which tinygrad's CPU tiling handles far faster: the up and down weight
  # gradients were the `small` step's slowest kernels (BENCHMARKS.md). A square weight gains nothing.
  x, w = Tensor(call.src[1]), Tensor(call.src[2])
  g, xs = Tensor(g).reshape(-1, w.shape[0]), x.reshape(-1, w.shape[1])  # (B·T, out), (B·T, in)
  dw = g.T.contiguous() @ xs if w.shape[0] > w.shape[1] else (xs.T.contiguous() @ g).T
  return (g @ w).reshape(x.shape).uop, dw.uop

@function(grad_fxn=_linear_grad)
def _linear(x:Tensor, w:Tensor) -> Tensor: return x @ w.T

# ***** the output head, tied to the embedding: h @ wᵀ

SPLIT_ROWS = 1024  # W's rows per chunk in _split_k (BENCHMARKS.md: 512, 1024 and 2048 measured)

def _by_rows(w:Tensor, f, dim:int) -> Tensor:
  """f(w), computed as f(first 2^k rows of w) joined with f(the other rows) along dim: the same numbers, but tinygrad's
  CPU heuristic tiles an axis of 8256 = 3·2752 by 3 rather than 4, which makes the vocabulary matmuls ~2x slower. CPU
  only: on a GPU the join is one more copy of the B·T·V logits."""
  n = 1 << (w.shape[0].bit_length() - 1)
  if PLAIN or n == w.shape[0] or not str(w.device).startswith("CPU"): return f(w)
  return f(w[:n]).contiguous().cat(f(w[n:]).contiguous(), dim=dim)

def _split_k(g:UOp, w:UOp) -> UOp:
  """g·W (g: (..., V), W: (V, D)) as a sum over chunks of W's rows: each chunk stays in a core's cache while all of g's
  rows pass it. CPU only: in one piece the `small` head's input gradient took a quarter of the step."""
  if PLAIN or not str(w.device).startswith("CPU") or w.shape[0] <= SPLIT_ROWS: return g @ w
  return functools.reduce(operator.add, [(g[..., i:i + SPLIT_ROWS] @ w[i:i + SPLIT_ROWS]).contiguous()
                                       for i in range(0, w.shape[0], SPLIT_ROWS)])

def tied_head(h:Tensor, w:Tensor) -> Tensor:
  """logits = h·Wᵀ: h (B, T, D), W (V, D) -> (B, T, V), with the custom backward below. All backends."""
  return h @ w.T if PLAIN else _tied_head(h, w)

def _tied_head_grad(g:UOp, call:UOp) -> tuple[UOp, UOp]:
  # call.src[1:] are _tied_head's arguments: h (B, T, D) and w (V, D); g = ∂L/∂logits (B, T, V)
  # ∂L/∂h = g·W and ∂L/∂W = gᵀ·h, with gᵀ written out once: read in place, its stride over tokens makes that matmul
  # ~4x slower
  h, w = call.src[1:]
  g = g.contiguous()
  gT, h = g.reshape(-1, g.shape[-1]).T.contiguous(), h.reshape(-1, h.shape[-1])  # (V, B·T), (B·T, D)
  return _split_k(g, w), _by_rows(gT, lambda rows: rows @ h, dim=0)

@function(grad_fxn=_tied_head_grad)
def _tied_head(h:Tensor, w:Tensor) -> Tensor: return _by_rows(w, lambda rows: h @ rows.T, dim=-1)
