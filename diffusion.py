"""Masked diffusion (MDLM, Sahoo et al. 2024): the forward process that masks tokens, the continuous-time NELBO that
trains the denoiser, and the reverse process that samples from it.

Time runs from t = 0 (clean data) to t = 1 (every token is MASK). α(t) is the probability that a token is still clean
at time t. The denoiser is any function (x_t, t) -> logits over x_0; this file never builds one. Randomness that is
spread over a batch (times, mask counts) is drawn on the host with numpy, so that a run repeats from its seed."""
import math
from dataclasses import dataclass
from typing import Callable, Iterator
import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes

Denoiser = Callable[[Tensor, Tensor], Tensor]

def _cos(x): return x.cos() if isinstance(x, Tensor) else math.cos(x)
def _sin(x): return x.sin() if isinstance(x, Tensor) else math.sin(x)
def _acos(x): return x.acos() if isinstance(x, Tensor) else math.acos(x)

@dataclass(frozen=True)
class Schedule:
  alpha: Callable    # α(t), for a float or a Tensor of times
  weight: Callable   # the NELBO weight w(t) = −α′(t) / (1 − α(t))
  time_of: Callable  # the inverse of 1 − α: the time at which a token is masked with probability m

SCHEDULES = {
  "loglinear": Schedule(alpha=lambda t: 1 - t, weight=lambda t: 1 / t, time_of=lambda m: m),  # mask probability t
  "cosine": Schedule(alpha=lambda t: _cos(t * (math.pi / 2)),                                 # 1 − cos(πt/2)
                     weight=lambda t: (math.pi / 2) * _sin(t * (math.pi / 2)) / (1 - _cos(t * (math.pi / 2))),
                     time_of=lambda m: _acos(1 - m) * (2 / math.pi)),
}

# ***** the forward process and the bound *****

def strata(u:np.ndarray, n:int) -> np.ndarray:
  """n points spread evenly over [0, 1) with one random offset per row of u (A, 1): (u + i/n) mod 1, i = 0..n−1. The
  same expectation as n independent uniforms, far less variance. In u's dtype."""
  return (u + (np.arange(n) / n).astype(u.dtype)) % u.dtype.type(1)

def antithetic_times(u:np.ndarray, n:int, eps:float=1e-3) -> np.ndarray:
  """(A, n) times spread evenly over [ε, 1]: t_i = ε + (1−ε)·((u + i/n) mod 1)."""
  return u.dtype.type(eps) + u.dtype.type(1 - eps) * strata(u, n)

def mask_counts(u:np.ndarray, n:int, length:int) -> np.ndarray:
  """(A, n) numbers of masked tokens for `nelbo_by_count`, spread evenly over 1..L: k_i = 1 + ⌊L·((u + i/n) mod 1)⌋."""
  return 1 + np.floor(strata(u, n) * length).astype(np.int32)

def forward_process(x0:Tensor, t:Tensor, mask_id:int, schedule:str="loglinear", u:Tensor|None=None) -> tuple:
  """q(x_t | x_0): each token independently becomes MASK with probability 1 − α(t). Returns (x_t, masked)."""
  u = Tensor.rand(*x0.shape) if u is None else u
  masked = u < (1 - SCHEDULES[schedule].alpha(t)).unsqueeze(1)
  return masked.where(mask_id, x0), masked

def nelbo(denoiser:Denoiser, x0:Tensor, t:Tensor, mask_id:int, schedule:str="loglinear", u:Tensor|None=None) -> Tensor:
  """The continuous-time negative ELBO in nats per token, an upper bound on −log p(x_0) / L.

  NELBO = E_t E_{x_t} [ w(t) · Σ_{masked i} −log p_θ(x_0^i | x_t) ] / L. Unmasked positions contribute exactly
  nothing: under SUBS they are copied from x_t, so the reverse process has nothing left to predict there.
  Dropping w(t) (the mean masked cross-entropy many toy models report) is not a bound on anything."""
  x_t, masked = forward_process(x0, t, mask_id, schedule, u)
  log_p = denoiser(x_t, t).log_softmax(-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # log p_θ(x_0^i | x_t)
  return (masked.where(-log_p, 0) * SCHEDULES[schedule].weight(t).unsqueeze(1)).sum() / x0.numel()

def rank(key:Tensor) -> Tensor:
  """(B, T) → (B, T): each position's rank in its row when sorted by key, smallest first, ties broken by position."""
  i = Tensor.arange(key.shape[-1])
  a, b = key.unsqueeze(1), key.unsqueeze(2)  # a[:, 0, j] = key_j, b[:, i, 0] = key_i
  return ((a < b) | ((a == b) & (i.reshape(1, 1, -1) < i.reshape(1, -1, 1)))).sum(-1)

def nelbo_by_count(denoiser:Denoiser, x0:Tensor, k:Tensor, u:Tensor, mask_id:int, schedule:str="loglinear") -> Tensor:
  """The same NELBO with far less variance: (B,) unbiased estimates, one per row (validation; --estimator count).
  Given the number k of masked tokens, the integral over t can be done by hand (w(t)dt = dm/m for the mask rate m):
    NELBO = E_{k ~ U{1..L}} E_{m ~ Beta(k, L−k+1)} E_{S: |S| = k} [ mean_{i∈S} −log p_θ(x_0^i | x_t) ]
  The weight is absorbed into how m is drawn, so nothing like 1/t multiplies the noise of a nearly clean x_t, and k can
  be stratified by the caller. The k positions with the smallest of L uniforms u are such an S, and the k-th smallest u
  is such an m. Unlike `nelbo`, t is not cut off at ε: this is the whole integral."""
  masked = rank(u) < k.unsqueeze(1)
  m = masked.where(u, 0).max(-1)  # the mask rate: the k-th smallest u
  log_p = denoiser(masked.where(mask_id, x0), SCHEDULES[schedule].time_of(m)).log_softmax(-1)
  log_p = log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
  return masked.where(-log_p, 0).sum(-1) / k

def stratified_mean(e:np.ndarray) -> tuple[float, float]:
  """Mean and standard error of estimates e (N, K) (window n, stratum j of its mask counts): the error of the draws for
  these windows, adjacent strata paired (each pair's squared difference estimates the sum of their variances)."""
  e = np.asarray(e, np.float64)
  if e.shape[1] % 2: raise ValueError(f"the standard error needs an even number of strata per window, got {e.shape[1]}")
  return float(e.mean()), float(np.sqrt(((e[:, 0::2] - e[:, 1::2]) ** 2).sum()) / e.size)

def ar_nll(denoiser:Denoiser, x:Tensor) -> Tensor:
  """The autoregressive twin's objective, to compare with `nelbo`: the same network, causal attention, reads the clean
  prefix x_<i (no noise, no MASK, no t) and predicts x_i. (B,): each row's exact NLL in nats per predicted token."""
  log_p = denoiser(x[:, :-1], Tensor.zeros(x.shape[0], device=x.device)).log_softmax(-1)
  return -log_p.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1).mean(-1)

# ***** the reverse process *****

def gumbel(*shape) -> Tensor:
  """G = −log(−log u), in float64 where the device has it: float32 Gumbel noise is truncated in its tail, which lowers
  the effective temperature and makes samples repetitive (Zheng et al. 2024)."""
  dtype = dtypes.float32 if Device.DEFAULT.split(":")[0] in ("METAL", "WEBGPU") else dtypes.float64
  return -(-Tensor.rand(*shape, dtype=dtype).clip(1e-300, 1).log()).log()

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

@dataclass
class Step:
  """What a sampler's rule sees from t to s < t: x_t, a candidate token for each position and its p, the prompt."""
  x: Tensor; tokens: Tensor; p: Tensor; given: Tensor; n_gen: Tensor; mask_id: int
  t: Tensor; s: Tensor; a_t: Tensor; a_s: Tensor; options: dict

def ancestral(k:Step) -> Tensor:
  """Exact: each masked token is revealed with probability (α(s) − α(t)) / (1 − α(t)), as its candidate drawn from
  p_θ(· | x_t). Each position's noise is drawn once for the run and used when it is revealed, so the cached and the
  uncached sampler give the same samples."""
  new = (k.x == k.mask_id) & (Tensor.rand(*k.x.shape) < (k.a_s - k.a_t) / (1 - k.a_t))
  return new.where(k.tokens, k.x)

def confidence(k:Step) -> Tensor:
  """Reveals the most confident masked tokens (MaskGIT, LLaDA's low-confidence remasking), as many as the schedule
  expects between t and s. choice_noise > 0 ranks them by log p + choice_noise · t · G instead, G a Gumbel draw per
  position and step (MaskGIT's choice temperature, annealed to 0 with t), so that the order of revealing is partly
  random and the sampler does not reveal the most frequent tokens first and repeat them. Not exact: it favours likely
  tokens, less so with more choice noise (tests/test_diffusion.py measures by how much)."""
  masked, c = k.x == k.mask_id, k.options["choice_noise"]
  n = masked.sum(-1, keepdim=True) - (k.n_gen * (1 - k.a_s)).round().cast(dtypes.int32)  # the expected reveals
  score = k.p.log() + c * k.t * gumbel(*k.x.shape).cast(k.p.dtype) if c else k.p
  return (masked & (rank(-masked.where(score, -math.inf)) < n)).where(k.tokens, k.x)

def threshold(k:Step) -> Tensor:
  """Reveals every masked position whose candidate has p > τ, and at least the most confident one per row, so that the
  number of network evaluations adapts to how sure the model is (Fast-dLLM, Wu et al. 2025); `steps` is a cap, and
  the last step reveals what is left. The model reads t off the share still masked. Favours likely tokens."""
  masked = k.x == k.mask_id
  best = masked & (rank(-masked.where(k.p, -math.inf)) < 1)
  return (masked & ((k.p > k.options["tau"]) | (k.s <= 0)) | best).where(k.tokens, k.x)

def remdm(k:Step) -> Tensor:
  """ReMDM (Wang et al. 2025): the ancestral step, but in a window t_off < t ≤ t_on of the run each revealed token that
  the prompt did not give is masked again with probability σ = min(η, (1 − α(s))/α(t)) (ReMDM's cap, which keeps the
  posterior's marginals those of the plain sampler), and a masked one is revealed with probability
  (α(s) − (1 − σ)·α(t)) / (1 − α(t)): early mistakes can be corrected. η = 0 is the ancestral sampler exactly."""
  o, masked, u = k.options, k.x == k.mask_id, Tensor.rand(*k.x.shape)
  sigma = ((k.t > o["t_off"]) & (k.t <= o["t_on"])).where(((1 - k.a_s) / k.a_t).minimum(o["eta"]), 0)
  new = masked & (u < (k.a_s - (1 - sigma) * k.a_t) / (1 - k.a_t))
  return (~masked & ~k.given & (u < sigma)).where(k.mask_id, new.where(k.tokens, k.x))

@dataclass(frozen=True)
class Sampler:  # a rule, its parameters' defaults, a new Gumbel draw every evaluation or one a run, steps as a cap
  rule: Callable[[Step], Tensor]; options: dict; fresh_noise: bool = True; adaptive: bool = False

SAMPLERS = {"ancestral": Sampler(ancestral, {}, fresh_noise=False),
            "confidence": Sampler(confidence, {"choice_noise": 3.0}),
            "threshold": Sampler(threshold, {"tau": 0.9}, adaptive=True),
            "remdm": Sampler(remdm, {"eta": 0.02, "t_on": 0.55, "t_off": 0.05}, fresh_noise=False)}

def sample(denoiser:Denoiser, x:Tensor, mask_id:int, steps:int, schedule:str="loglinear", method:str="confidence",
           cache:bool=False, temperature:float=1.0, top_p:float=1.0, **options) -> Iterator[tuple[Tensor, float, int]]:
  """Run the reverse process from t = 1 to 0 with one of SAMPLERS and yield (x_s, s, NFE) after every step.

  x holds MASK where tokens are to be generated; every other position is given (a prompt, infilling context) and never
  changes (SUBS carry-over); a revealed token changes only if a sampler masks it again, and gets fresh noise then.
  `cache` only where the denoiser ignores t: p_θ depends on x_t alone, and is reused until x_t changes."""
  sampler, schedule = SAMPLERS[method], SCHEDULES[schedule]
  options = {**sampler.options, **{k: v for k, v in options.items() if k in sampler.options}}
  B, T = x.shape
  given, n_gen = (x != mask_id).realize(), (x == mask_id).sum(-1, keepdim=True).realize()  # per row: to generate
  V = denoiser(x, Tensor.ones(B)).shape[-1]                 # lazy: builds the graph only to read the logits' width

  @TinyJit
  def predict(x:Tensor, t:Tensor, noise:Tensor) -> tuple[Tensor, Tensor]:
    """One network evaluation: a candidate token for every position, and the model's probability of it."""
    logits = denoiser(x, t)
    tokens = draw(logits, noise, temperature, top_p)
    return tokens.realize(), logits.softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).realize()

  @TinyJit
  def update(x:Tensor, tokens:Tensor, p:Tensor, t:Tensor, s:Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x_s; whether anything changed; the positions masked again. Compared here: the JIT reuses its output buffers."""
    new = sampler.rule(Step(x, tokens, p, given, n_gen, mask_id, t, s, schedule.alpha(t), schedule.alpha(s), options))
    changed, remasked = (new != x).any(), (x != mask_id) & (new == mask_id)
    Tensor.realize(new, changed, remasked)
    return new, changed, remasked

  noise, tokens, nfe = None, None, 0
  for t, s in zip(time_grid(steps)[:-1], time_grid(steps)[1:]):
    if tokens is None or not cache:
      if noise is None or sampler.fresh_noise: noise = gumbel(B, T, V).realize()
      # the time the model reads: the step's, or (adaptive) the one at which the share still masked is expected
      t_in = schedule.time_of((x == mask_id).sum(-1) / n_gen.squeeze(-1).maximum(1)) if sampler.adaptive else \
        Tensor([t] * B)
      (tokens, p), nfe = predict(x, t_in.realize(), noise), nfe + 1
    x, changed, remasked = update(x, tokens, p, Tensor([t]), Tensor([s]))
    if remasked.any().item(): noise = remasked.unsqueeze(-1).where(gumbel(B, T, V), noise).realize()
    if cache and changed.item(): tokens = None  # x_t changed: the next step needs a fresh p_θ
    left = (x == mask_id).sum().item() if sampler.adaptive else None  # it stops once nothing is masked
    yield x, s if left is None else schedule.time_of(left / max(1, n_gen.sum().item())), nfe
    if left == 0: return

def time_grid(steps:int) -> list[float]: return [1 - i / steps for i in range(steps + 1)]

def sample_blocks(denoiser:Denoiser, x:Tensor, mask_id:int, steps:int, context:int, stop_id:int|None=None, first:int=0,
                  **kw) -> Iterator[tuple[Tensor, float, int]]:
  """`sample` past the model's context, semi-autoregressively (as MDLM and LLaDA generate long texts): the reverse
  process runs on one window of `context` positions at a time, each half a context further on than the last, so that
  its first half, the end of what exists, is the prompt for the block it writes. Stops at x's end, or after the block in
  which every row has written stop_id (an end of text) past position `first`. Yields the whole x, as `sample` does."""
  # windows are cut on the host: one at an odd offset into a device buffer can be a misaligned view (a CPU crash)
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
  """The autoregressive twin's sampler, yielding as `sample` does: left to right, each MASK at position i > 0 drawn from
  the logits at i − 1, one network evaluation per position; it stops once every row has written stop_id."""
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
