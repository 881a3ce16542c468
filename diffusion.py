"""Masked diffusion (MDLM, Sahoo et al. 2024): the forward process that masks tokens, the continuous-time
NELBO that trains the denoiser, and the reverse process that samples from it.

Time runs from t = 0 (clean data) to t = 1 (every token is MASK). α(t) is the probability that a token is
still clean at time t. The denoiser is any function (x_t, t) -> logits over x_0; this file never builds one."""
import math
from typing import Callable, Iterator
from tinygrad import Device, Tensor, TinyJit, dtypes

Denoiser = Callable[[Tensor, Tensor], Tensor]
SCHEDULES = ("loglinear", "cosine")

def _cos(x): return x.cos() if isinstance(x, Tensor) else math.cos(x)
def _sin(x): return x.sin() if isinstance(x, Tensor) else math.sin(x)

def alpha(t, schedule:str="loglinear"):
  """α(t) for a float or a Tensor of times."""
  if schedule == "loglinear": return 1 - t                 # mask probability t
  if schedule == "cosine": return _cos(t * (math.pi / 2))  # mask probability 1 − cos(πt/2)
  raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")

def weight(t, schedule:str="loglinear"):
  """The NELBO weight w(t) = −α′(t) / (1 − α(t))."""
  if schedule == "loglinear": return 1 / t
  if schedule == "cosine": return (math.pi / 2) * _sin(t * (math.pi / 2)) / (1 - _cos(t * (math.pi / 2)))
  raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")

def time_of(mask_prob, schedule:str="loglinear"):
  """The inverse of 1 − α: the time at which a token is masked with probability mask_prob."""
  if schedule == "loglinear": return mask_prob
  if schedule == "cosine" and isinstance(mask_prob, Tensor): return (1 - mask_prob).acos() * (2 / math.pi)
  if schedule == "cosine": return math.acos(1 - mask_prob) * 2 / math.pi
  raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")

def antithetic_times(batch_size:int, u:Tensor|None=None, eps:float=1e-3) -> Tensor:
  """(batch_size,) times spread evenly over [ε, 1] with one random offset u: the same expectation as independent
  uniform times, much less variance."""
  u = Tensor.rand(1) if u is None else u
  return eps + (1 - eps) * ((u + Tensor.arange(batch_size) / batch_size) % 1)  # t_i = ε + (1−ε)·((u + i/B) mod 1)

def mask_counts(batch_size:int, length:int, u:Tensor) -> Tensor:
  """(batch_size,) numbers of masked tokens for `nelbo_by_count`, spread evenly over 1..L across the batch with one
  random offset (as `antithetic_times` spreads t): k_i = 1 + ⌊L·((u + i/B) mod 1)⌋."""
  return 1 + (((u + Tensor.arange(batch_size) / batch_size) % 1) * length).floor().cast(dtypes.int32)

def forward_process(x0:Tensor, t:Tensor, mask_id:int, schedule:str="loglinear",
                    u:Tensor|None=None) -> tuple[Tensor, Tensor]:
  """q(x_t | x_0): each token independently becomes MASK with probability 1 − α(t). Returns (x_t, masked)."""
  u = Tensor.rand(*x0.shape) if u is None else u
  masked = u < (1 - alpha(t, schedule)).unsqueeze(1)
  return masked.where(mask_id, x0), masked

def nelbo(denoiser:Denoiser, x0:Tensor, t:Tensor, mask_id:int, schedule:str="loglinear", u:Tensor|None=None) -> Tensor:
  """The continuous-time negative ELBO in nats per token, an upper bound on −log p(x_0) / L.

  NELBO = E_t E_{x_t} [ w(t) · Σ_{masked i} −log p_θ(x_0^i | x_t) ] / L. Unmasked positions contribute exactly
  nothing: under SUBS they are copied from x_t, so the reverse process has nothing left to predict there.
  Dropping w(t) (the mean masked cross-entropy many toy models report) is not a bound on anything."""
  x_t, masked = forward_process(x0, t, mask_id, schedule, u)
  log_p = denoiser(x_t, t).log_softmax(-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # log p_θ(x_0^i | x_t)
  return (masked.where(-log_p, 0) * weight(t, schedule).unsqueeze(1)).sum() / x0.numel()

def rank(key:Tensor) -> Tensor:
  """(B, T) → (B, T): each position's rank in its row when sorted by key, smallest first, ties broken by position."""
  i = Tensor.arange(key.shape[-1])
  a, b = key.unsqueeze(1), key.unsqueeze(2)  # a[:, 0, j] = key_j, b[:, i, 0] = key_i
  return ((a < b) | ((a == b) & (i.reshape(1, 1, -1) < i.reshape(1, -1, 1)))).sum(-1)

def nelbo_by_count(denoiser:Denoiser, x0:Tensor, k:Tensor, u:Tensor, mask_id:int, schedule:str="loglinear") -> Tensor:
  """The same NELBO, estimated with far less variance: (B,) unbiased estimates, one per row. Validation uses it (and
  training, with --estimator count).

  Given the number k of masked tokens, the integral over t can be done by hand (w(t)dt = dm/m for the mask rate m):
    NELBO = E_{k ~ U{1..L}} E_{m ~ Beta(k, L−k+1)} E_{S: |S| = k} [ mean_{i∈S} −log p_θ(x_0^i | x_t) ]
  The weight is absorbed into how m is drawn, so nothing like 1/t multiplies the noise of a nearly clean x_t, and k can
  be stratified by the caller. The k positions with the smallest of L uniforms u are such an S, and the k-th smallest u
  is such an m. Unlike `nelbo`, t is not cut off at ε: this is the whole integral."""
  masked = rank(u) < k.unsqueeze(1)
  m = masked.where(u, 0).max(-1)  # the mask rate: the k-th smallest u
  log_p = denoiser(masked.where(mask_id, x0), time_of(m, schedule)).log_softmax(-1)
  log_p = log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
  return masked.where(-log_p, 0).sum(-1) / k

def stratified_mean(e:list[list[float]]) -> tuple[float, float]:
  """Mean and standard error of estimates e[n][j] (window n, stratum j of its mask counts, independent draws). The error
  is that of the draws for these windows: adjacent strata are paired and each pair's squared difference estimates the
  sum of their variances (collapsed strata: a slight overestimate, by the spread of the strata's own means)."""
  N, K = len(e), len(e[0])
  if K % 2: raise ValueError(f"the standard error needs an even number of strata per window, got {K}")
  mean = sum(map(sum, e)) / (N * K)
  return mean, math.sqrt(sum((r[j] - r[j + 1]) ** 2 for r in e for j in range(0, K, 2))) / (N * K)

def ar_nll(denoiser:Denoiser, x:Tensor) -> Tensor:
  """The autoregressive twin's objective, for comparison with `nelbo`: the same network with causal attention reads the
  clean prefix x_<i (no noise, no MASK, no t) and predicts x_i. (B,): each row's exact NLL in nats per predicted
  token."""
  log_p = denoiser(x[:, :-1], Tensor.zeros(x.shape[0], device=x.device)).log_softmax(-1)
  log_p = log_p.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
  return -log_p.mean(-1)

# ***** the reverse process *****

def noise_dtype():
  """float64 where the device has it: float32 Gumbel noise is truncated in its tail, which lowers the effective
  temperature and makes samples repetitive (Zheng et al. 2024)."""
  return dtypes.float32 if Device.DEFAULT.split(":")[0] in ("METAL", "WEBGPU") else dtypes.float64

def gumbel(*shape) -> Tensor:
  return -(-Tensor.rand(*shape, dtype=noise_dtype()).clip(1e-300, 1).log()).log()  # G = −log(−log u)

def nucleus(logits:Tensor, top_p:float, iters:int=24) -> Tensor:
  """Top-p: keep the most likely tokens whose probabilities sum to at least top_p, by bisecting the cut-off
  probability (a sort over the vocabulary at every position is far slower here)."""
  p = logits.softmax(-1)
  lo, hi = Tensor.zeros(*p.shape[:-1], 1), p.max(-1, keepdim=True)  # the cut-off lies in [lo, hi]
  for _ in range(iters):
    mid = (lo + hi) / 2
    enough = ((p >= mid).where(p, 0).sum(-1, keepdim=True) >= top_p)
    lo, hi = enough.where(mid, lo), enough.where(hi, mid)
  return (p >= lo).where(logits, -math.inf)

def draw(logits:Tensor, noise:Tensor, temperature:float, top_p:float) -> Tensor:
  """A categorical sample per position by Gumbel-max: argmax(logits/τ + G). τ = 0 is greedy."""
  if temperature == 0: return logits.argmax(-1)
  if top_p < 1: logits = nucleus(logits, top_p)
  return (logits.cast(noise.dtype) / temperature + noise).argmax(-1)

def time_grid(steps:int) -> list[float]: return [1 - i / steps for i in range(steps + 1)]

def sample(denoiser:Denoiser, x:Tensor, mask_id:int, steps:int, schedule:str="loglinear", method:str="ancestral",
           cache:bool=False, temperature:float=1.0, top_p:float=1.0,
           choice_noise:float=0.0) -> Iterator[tuple[Tensor, float, int]]:
  """Run the reverse process from t = 1 to 0 and yield (x_s, s, NFE) after every step.

  x holds MASK where tokens are to be generated; every other position is frozen (a prompt, infilling context)
  and, like every token once revealed, is never changed (SUBS carry-over). `cache` may be set only when the
  denoiser ignores t: then p_θ depends on x_t alone and its output is reused until a token changes.

  ancestral: from t to s each masked token is revealed with probability (α(s) − α(t)) / (1 − α(t)), drawn
    from p_θ(· | x_t). Each position's Gumbel noise is fixed for the whole run and used once, when it is
    revealed, so the draw is exact and the cached and uncached samplers give the same samples.
  confidence: each step reveals the most confident masked tokens (MaskGIT, LLaDA's low-confidence remasking),
    as many as the schedule expects to be revealed between t and s. choice_noise > 0 ranks them by
    log p + choice_noise · t · G instead, G a Gumbel draw per position and step (MaskGIT's choice temperature, annealed
    to 0 with t): the order of revealing becomes partly random, which keeps the sampler from choosing the most frequent
    tokens first and repeating them. Not an exact sampler of p_θ: it favours likely tokens. Under an i.i.d. oracle
    whose likeliest token has p = 0.4 (64 tokens, 16 steps) that token comes out 94% of the time without noise, 64%
    with choice_noise 1, 55% with 2, and 40% once the noise swamps log p (tests/test_diffusion.py)."""
  if method not in ("ancestral", "confidence"):
    raise ValueError(f"unknown sampler {method!r}: use ancestral or confidence")
  B, T = x.shape
  n_gen = (x == mask_id).sum(-1, keepdim=True).realize()  # positions to generate, per row
  V = denoiser(x, Tensor.ones(B)).shape[-1]               # lazy: builds the graph only to read the logits' width

  @TinyJit
  def predict(x:Tensor, t:Tensor, noise:Tensor) -> tuple[Tensor, Tensor]:
    """One network evaluation: a candidate token for every position, and the model's probability of it."""
    logits = denoiser(x, t)
    tokens = draw(logits, noise, temperature, top_p)
    return tokens.realize(), logits.softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).realize()

  @TinyJit
  def reveal(x:Tensor, tokens:Tensor, confidence:Tensor, t:Tensor, a_t:Tensor, a_s:Tensor) -> tuple[Tensor, Tensor]:
    masked = x == mask_id
    if method == "ancestral":
      new = masked & (Tensor.rand(B, T) < (a_s - a_t) / (1 - a_t))  # reveal with probability (α(s) − α(t)) / (1 − α(t))
    else:
      k = masked.sum(-1, keepdim=True) - (n_gen * (1 - a_s)).round().cast(dtypes.int32)  # the expected reveals
      score = confidence.log() + choice_noise * t * gumbel(B, T).cast(confidence.dtype) if choice_noise else confidence
      c = masked.where(score, -math.inf)
      new = masked & (rank(-c) < k)  # the k most confident
    return new.where(tokens, x).realize(), new.any().realize()

  noise, tokens, nfe = None, None, 0
  for t, s in zip(time_grid(steps)[:-1], time_grid(steps)[1:]):
    if tokens is None or not cache:
      if noise is None or method == "confidence": noise = gumbel(B, T, V).realize()
      (tokens, confidence), nfe = predict(x, Tensor([t] * B), noise), nfe + 1
    x, changed = reveal(x, tokens, confidence, Tensor([t]), Tensor([alpha(t, schedule)]), Tensor([alpha(s, schedule)]))
    if cache and changed.item(): tokens = None  # x_t changed: the next step needs a fresh p_θ
    yield x, s, nfe

def sample_blocks(denoiser:Denoiser, x:Tensor, mask_id:int, steps:int, context:int, stop_id:int|None=None, first:int=0,
                  **kw) -> Iterator[tuple[Tensor, float, int]]:
  """`sample` past the model's context, semi-autoregressively (as MDLM and LLaDA generate long texts): the reverse
  process runs on one window of `context` positions at a time, the first at x's start, each next one half a context
  further on, so that its first part, the end of what exists, is the prompt for the block it writes. Stops at x's end,
  or after the block in which every row has written stop_id (an end of text) past position `first`. Yields as `sample`
  does, the whole x, with s the time within the current block and NFE counted over all blocks."""
  # windows are cut on the host: a window at an odd offset into a device buffer can be a misaligned view (a crash on
  # tinygrad's CPU backend)
  x, hi, nfe = x.numpy(), min(context, x.shape[1]), 0
  while True:
    lo = hi - min(context, x.shape[1])  # every window is a whole context (the last one's prompt is longer)
    for w, s, n in sample(denoiser, Tensor(x[:, lo:hi].copy()), mask_id, steps, **kw):
      x[:, lo:hi] = w.numpy()
      yield Tensor(x.copy()), s, nfe + n
    nfe += n
    if hi == x.shape[1] or (stop_id is not None and (x[:, first:hi] == stop_id).any(-1).all()): return
    hi = min(hi + context // 2, x.shape[1])

def sample_ar(denoiser:Denoiser, x:Tensor, mask_id:int, temperature:float=1.0, top_p:float=1.0,
              stop_id:int|None=None) -> Iterator[tuple[Tensor, float, int]]:
  """The autoregressive twin's sampler, yielding as `sample` does: left to right, each MASK at position i > 0 is drawn
  from the logits at i − 1, one network evaluation per position. Text after a MASK is not seen before it is reached.
  Stops early once every row has written stop_id (an end of text)."""
  B, T = x.shape
  V = denoiser(x, Tensor.zeros(B)).shape[-1]
  @TinyJit
  def predict(x:Tensor, noise:Tensor) -> Tensor:
    return draw(denoiser(x, Tensor.zeros(B)), noise, temperature, top_p).realize()
  todo = [i for i in range(1, T) if (x[:, i] == mask_id).any().item()]
  for nfe, i in enumerate(todo, start=1):
    drawn = predict(x, gumbel(B, T, V).realize()).pad(((0, 0), (1, 0)))[:, :T]  # drawn at i − 1: for position i
    x = ((Tensor.arange(T) == i) & (x == mask_id)).where(drawn, x).realize()
    yield x, 1 - nfe / len(todo), nfe
    if stop_id is not None and (x[:, 1:i + 1] == stop_id).any(-1).all().item(): return

def generate(denoiser:Denoiser, x:Tensor, mask_id:int, steps:int, **kw) -> Tensor:
  """The final sample of `sample`, for callers that do not watch the steps."""
  for x, _, _ in sample(denoiser, x, mask_id, steps, **kw): pass
  return x
