"""The denoiser: a bidirectional transformer with adaLN-Zero time conditioning (a DiT, Peebles & Xie 2023) that reads a
partly masked sequence x_t and returns logits for the clean tokens x_0 at every position. Read bottom-up: the config,
the pieces of a block, the block, the denoiser. Three products run on speed devices (harness/speed.py), each called
with its formula beside it; .contiguous() stores what tinygrad would otherwise recompute in each kernel reading it."""
import math
from dataclasses import dataclass
from tinygrad import Tensor, dtypes, nn
from tinygrad.nn.state import get_state_dict
from harness import speed

@dataclass
class Config:
  n_tokens: int = 8193   # token ids 0..n_tokens-1: the K kept by --vocab-size K, and <unk>; the MASK id is n_tokens
  seq_len: int = 128
  dim: int = 128
  n_layers: int = 4
  n_heads: int = 4
  time_cond: bool = False  # off: the network sees only x_t (MDLM: the share of masks already tells the noise level)
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
  return speed.stored(angle.cos()).is_param_(False), speed.stored(angle.sin()).is_param_(False)  # buffers

def rope(x:Tensor, cos:Tensor, sin:Tensor) -> Tensor:
  # rotate each pair (x1_i, x2_i) by its angle: [x1·cos − x2·sin, x2·cos + x1·sin]
  x1, x2 = x.chunk(2, dim=-1)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)

def attention(q:Tensor, k:Tensor, v:Tensor, bias:Tensor|None=None) -> Tensor:
  """softmax(q·kᵀ/√d + bias)·v over (B, H, T, D/H) heads, the scores in float32: the place to swap in another attention.
  bias: (T, T) added to the scores (−∞ hides a key), None for MDLM's bidirectional attention."""
  scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, T, T)
  return (scores if bias is None else scores + bias).softmax(-1).cast(v.dtype).contiguous() @ v

class Linear(nn.Linear):
  """A linear layer that computes in its input's dtype: float32 master weights, bfloat16/float16 matmuls."""
  def __call__(self, x:Tensor) -> Tensor:
    if self.bias is None: return speed.linear(x, self.weight.cast(x.dtype))  # x @ Wᵀ
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

  def __call__(self, x:Tensor, mod:Tensor, cos:Tensor, sin:Tensor, attn_bias:Tensor|None=None) -> Tensor:
    """x: (B, T, D); mod: (B, 6D), self.ada(c.silu()) (the Denoiser's, all blocks' at once); attn_bias: `attention`"""
    B, T, D = x.shape  # contiguous_backward below: mod's gradient in a buffer, not summed again in each kernel using it
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.contiguous_backward().unsqueeze(1).chunk(6, dim=-1)  # (B, 1, D)
    q, k, v = [y.reshape(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, D/H)
               for y in self.qkv(modulate(x, shift1, scale1)).chunk(3, dim=-1)]
    q, k = rope(q, cos, sin).contiguous(), rope(k, cos, sin).contiguous()
    attn = attention(q, k, v, attn_bias).transpose(1, 2).reshape(B, T, D)   # heads side by side again
    x = x + gate1 * self.proj(attn)                                          # x + gate·f(rmsnorm(x)·(1+scale) + shift)
    return x + gate2 * self.down(self.up(modulate(x, shift2, scale2)).gelu().contiguous())  # tinygrad's gelu: tanh form

def time_features(t:Tensor, n:int=256) -> Tensor:
  # sinusoidal features of 1000·t: [cos(1000·t·f_i), sin(1000·t·f_i)], f_i = 10000^(-i/(n/2))
  freqs = (-math.log(10000) * Tensor.arange(n // 2).float() / (n // 2)).exp()
  a = 1000 * t.float().unsqueeze(1) * freqs.unsqueeze(0)  # (B, n/2)
  return a.cos().cat(a.sin(), dim=1)

class Denoiser:
  def __init__(self, cfg:Config, dtype="float32"):
    self.cfg, self.dtype = cfg, getattr(dtypes, dtype) if isinstance(dtype, str) else dtype  # compute dtype
    self.tok_emb = Tensor.normal(cfg.padded_vocab, cfg.dim, std=0.02).contiguous()
    self.t_in, self.t_out = Linear(256, cfg.dim), Linear(cfg.dim, cfg.dim)
    self.blocks = [Block(cfg.dim, cfg.n_heads) for _ in range(cfg.n_layers)]
    self.ada_final = zero_linear(cfg.dim, 2 * cfg.dim)
    self.rope = rope_tables(cfg.seq_len, cfg.dim // cfg.n_heads)
    if cfg.causal:  # −∞ above the diagonal: no position sees the ones after it
      self.causal = speed.stored(Tensor.full((cfg.seq_len, cfg.seq_len), -math.inf).triu(1)).is_param_(False)
    # SUBS: MASK and padding ids get −∞, so p_θ(x_0 = MASK | x_t) = 0
    self.subs = (Tensor.arange(cfg.padded_vocab) >= cfg.n_tokens).where(-math.inf, 0.0).contiguous().is_param_(False)
    Tensor.realize(*get_state_dict(self).values())  # now: left lazy, the draws would depend on what else is drawn first

  def __call__(self, x:Tensor, t:Tensor) -> Tensor:
    """x: (B, T) token ids with MASK where masked; t: (B,) noise levels. Returns (B, T, padded_vocab) logits."""
    T = x.shape[1]
    if not self.cfg.time_cond or self.cfg.causal: t = t.zeros_like()
    c = self.t_out(self.t_in(time_features(t)).silu()).cast(self.dtype)  # (B, D)
    h = speed.embed(self.tok_emb, x, self.dtype)                          # tok_emb[x]
    cos, sin, attn_bias = self.rope[0][:T], self.rope[1][:T], self.causal[:T, :T] if self.cfg.causal else None
    # every block's ada(c.silu()) in one matmul on their weights side by side: its gradient for c is then one long sum
    w, b = [Tensor.cat(*[getattr(block.ada, k) for block in self.blocks]).cast(self.dtype) for k in ("weight", "bias")]
    for block, mod in zip(self.blocks, c.silu().linear(w.T, b).chunk(len(self.blocks), dim=-1)):  # each (B, 6D)
      h = block(h, mod, cos, sin, attn_bias)
    shift, scale = self.ada_final(c.silu()).unsqueeze(1).chunk(2, dim=-1)
    logits = speed.tied_head(modulate(h, shift, scale), self.tok_emb.cast(self.dtype))  # h @ tok_embᵀ: head = embedding
    return logits.float() + self.subs

def parameters(model:Denoiser) -> dict[str, Tensor]:
  """The trained tensors by name, told from buffers (rope, causal, subs) by tinygrad's own flag, Tensor.is_param."""
  return {k: v for k, v in get_state_dict(model).items() if v.is_param}

def n_params(model:Denoiser) -> int: return sum(v.numel() for v in parameters(model).values())
