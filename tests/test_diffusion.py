"""The diffusion math against denoisers whose exact posterior we can write down (oracles)."""
import math
import numpy as np, pytest
from tinygrad import Tensor, dtypes
from diffusion import (SAMPLERS, SCHEDULES, antithetic_times, ar_nll, mask_counts, sample_ar, forward_process, nelbo,
                       nelbo_by_count, sample, sample_blocks, stratified_mean)

def alpha(t, schedule): return SCHEDULES[schedule].alpha(t)
def weight(t, schedule): return SCHEDULES[schedule].weight(t)
def time_of(m, schedule): return SCHEDULES[schedule].time_of(m)

def times(n:int) -> Tensor:
  """n antithetic times from one offset drawn as train.py draws it, on the host."""
  return Tensor(antithetic_times(np.random.default_rng().random((1, 1), dtype=np.float32), n)[0])

V, PAD = 5, 64                       # real tokens, padded vocabulary (MASK = V)
P = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
H = float(-(P * np.log(P)).sum())    # entropy of one token, nats

def log_p_table() -> np.ndarray:
  logp = np.full(PAD, -np.inf, dtype=np.float32)
  logp[:V] = np.log(P)
  return logp

def iid_oracle(x:Tensor, t:Tensor) -> Tensor:
  """Exact posterior for i.i.d. tokens from P: every position is P, whatever x_t shows."""
  return Tensor(log_p_table()).reshape(1, 1, PAD).expand(x.shape[0], x.shape[1], PAD)

def repeat_oracle(x:Tensor, t:Tensor) -> Tensor:
  """Exact posterior for sequences that repeat one token drawn from P: certain once any position is visible."""
  visible = x != V
  seen = visible.where(x, -1).max(-1, keepdim=True)                     # the visible token, or −1
  certain = (Tensor.arange(PAD).reshape(1, 1, PAD) == seen.unsqueeze(-1)).where(0.0, -math.inf)
  return (seen.unsqueeze(-1) >= 0).where(certain, iid_oracle(x, t))

def estimate(fn, draws:int) -> tuple[float, float]:
  vals = np.array([fn() for _ in range(draws)])
  return vals.mean(), vals.std(ddof=1) / math.sqrt(draws)

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_weight_is_minus_alpha_derivative_over_mask_prob(schedule):
  for t in (0.05, 0.3, 0.5, 0.8, 0.99):
    h = 1e-6
    fd = -(alpha(t + h, schedule) - alpha(t - h, schedule)) / (2 * h) / (1 - alpha(t, schedule))
    assert weight(t, schedule) == pytest.approx(fd, rel=1e-5)
  tt = Tensor([0.2, 0.7])  # the Tensor path computes the same numbers
  np.testing.assert_allclose(weight(tt, schedule).numpy(), [weight(0.2, schedule), weight(0.7, schedule)], rtol=1e-5)
  np.testing.assert_allclose(alpha(tt, schedule).numpy(), [alpha(0.2, schedule), alpha(0.7, schedule)], rtol=1e-5)

def test_schedule_end_points():
  for s in SCHEDULES:
    assert alpha(0.0, s) == pytest.approx(1) and alpha(1.0, s) == pytest.approx(0, abs=1e-12)
  assert weight(0.25, "loglinear") == 4
  assert set(SCHEDULES) == {"loglinear", "cosine"}  # the flags' choices are the table's keys

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_empirical_mask_rate_matches_one_minus_alpha(schedule):
  Tensor.manual_seed(1)
  ts = [0.1, 0.4, 0.75, 0.95]
  x0 = Tensor.zeros(len(ts), 4096, dtype=dtypes.int32).contiguous()
  x_t, masked = forward_process(x0, Tensor(ts), V, schedule)
  rate = masked.float().mean(-1).numpy()
  assert ((x_t.numpy() == V) == masked.numpy()).all()
  for r, t in zip(rate, ts):
    q = 1 - alpha(t, schedule)
    assert abs(r - q) < 4 * math.sqrt(q * (1 - q) / 4096)

def test_antithetic_times_cover_the_interval_evenly():
  t = np.sort(antithetic_times(np.array([[0.37]], np.float32), 8)[0])
  np.testing.assert_allclose(np.diff(t), (1 - 1e-3) / 8, rtol=1e-5)
  assert 1e-3 <= t.min() and t.max() <= 1

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_nelbo_of_iid_oracle_is_the_entropy(schedule):
  Tensor.manual_seed(2)
  rng = np.random.default_rng(2)
  def once(): return nelbo(iid_oracle, Tensor(rng.choice(V, size=(64, 32), p=P).astype(np.int32)), times(64), V, schedule).item()
  mean, se = estimate(once, 30)
  assert abs(mean - H) < 4 * se + 2e-3 * H, (mean, se, H)  # 2e-3: t is drawn from [ε, 1], not [0, 1]

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_nelbo_of_repeat_oracle_is_entropy_over_length(schedule):
  """The discriminating case: at L = 2 the true NLL is H/2 per token; the unweighted masked mean is H/3."""
  Tensor.manual_seed(3)
  rng, L, B = np.random.default_rng(3), 2, 512
  unweighted = []
  def once():
    x0 = Tensor(np.repeat(rng.choice(V, size=(B, 1), p=P), L, axis=1).astype(np.int32))
    t, u = times(B), Tensor.rand(B, L)
    x_t, masked = forward_process(x0, t, V, schedule, u)
    log_p = repeat_oracle(x_t, t).log_softmax(-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    unweighted.append((masked.where(-log_p, 0).sum() / x0.numel()).item())  # no w(t)
    return nelbo(repeat_oracle, x0, t, V, schedule, u).item()
  mean, se = estimate(once, 40)
  assert abs(mean - H / L) < 4 * se + 2e-3 * H, (mean, se, H / L)
  if schedule == "loglinear":                                      # without w(t) = 1/t the same draws give H/(L+1):
    assert abs(np.mean(unweighted) - H / (L + 1)) < 0.03 * H
    assert abs(H / L - H / (L + 1)) > 10 * se                      # far outside our error bars

def test_unmasked_positions_contribute_nothing():
  Tensor.manual_seed(4)
  x0, t, u = Tensor.randint(4, 16, high=V), Tensor([0.2, 0.5, 0.7, 0.9]), Tensor.rand(4, 16)
  _, masked = forward_process(x0, t, V, "loglinear", u)
  base = Tensor.randn(4, 16, PAD).realize()
  junk = Tensor.randn(4, 16, PAD).realize()
  perturbed = masked.unsqueeze(-1).where(base, junk * 100)  # change every output at unmasked positions
  a = nelbo(lambda x, tt: base, x0, t, V, "loglinear", u).item()
  b = nelbo(lambda x, tt: perturbed, x0, t, V, "loglinear", u).item()
  assert 0 < masked.sum().item() < 64 and a == b

def test_nelbo_is_finite_with_minus_inf_logits():
  """SUBS logits are −∞ at MASK and padding; the loss and its gradient must stay finite."""
  Tensor.manual_seed(5)
  w = Tensor.randn(PAD).realize()
  subs = Tensor(np.where(np.arange(PAD) < V, 0, -np.inf).astype(np.float32))
  x0 = Tensor.randint(2, 8, high=V)
  loss = nelbo(lambda x, t: (w + subs).reshape(1, 1, PAD).expand(2, 8, PAD), x0, Tensor([0.5, 0.9]), V)
  loss.backward()
  assert math.isfinite(loss.item()) and np.isfinite(w.grad.numpy()).all()

# ***** samplers *****

def run(denoiser, x, steps, method="ancestral", **kw):
  kw["method"] = method
  states = [(x.numpy(), 1.0, 0)] + [(xs.numpy(), s, nfe) for xs, s, nfe in sample(denoiser, x, V, steps, **kw)]
  return states

@pytest.mark.parametrize("method,cache", [("ancestral", False), ("ancestral", True), ("confidence", False)])
def test_sampler_never_changes_given_or_revealed_tokens(method, cache):
  Tensor.manual_seed(6)
  init = np.full((3, 20), V, dtype=np.int32)
  init[:, :4] = [1, 2, 3, 4]; init[1, 10:12] = 0        # a prompt and infilling context
  states = run(iid_oracle, Tensor(init), 12, method=method, cache=cache)
  for (a, _, _), (b, _, _) in zip(states, states[1:]):
    assert (b[a != V] == a[a != V]).all()                 # given and revealed tokens never change
  final = states[-1][0]
  assert (final != V).all() and final.max() < V and (final[init != V] == init[init != V]).all()
  masks = [(s[0] == V).sum() for s in states]
  assert masks == sorted(masks, reverse=True) and states[-1][1] == 0

@pytest.mark.parametrize("cache,method", [(False, "ancestral"), (True, "ancestral"), (False, "remdm")])
def test_exact_samplers_frequencies_match_iid_oracle(cache, method):
  """Chi-square goodness of fit at a fixed seed (critical value for 4 d.o.f. at p = 0.001 is 18.47). Remasking keeps
  the marginals (ReMDM's cap), and a position masked again is drawn with fresh noise."""
  Tensor.manual_seed(7)
  final = run(iid_oracle, Tensor.full((32, 64), V).contiguous(), 16, method, cache=cache, eta=0.3)[-1][0]
  counts = np.bincount(final.ravel(), minlength=V)
  expected = P * final.size
  assert ((counts - expected) ** 2 / expected).sum() < 18.47

def test_confidence_sampler_bias_is_toward_likely_tokens_and_choice_noise_removes_it():
  """The confidence sampler reveals first the positions whose drawn token is likely, so under an i.i.d. oracle the
  likeliest token comes out more often than P says: the bias it trades for revealing many tokens per step. Gumbel noise
  on the order of revealing (choice_noise) shrinks it; with noise that swamps log p the order is random and the
  frequencies are P's again (chi-square as above). One network evaluation per step, whatever the noise."""
  freq = {}
  for noise in (0.0, 1.0, 1000.0):
    Tensor.manual_seed(9)
    states = run(iid_oracle, Tensor.full((32, 64), V).contiguous(), 16, method="confidence", choice_noise=noise)
    final, nfe = states[-1][0], states[-1][2]
    assert nfe == 16 and (final != V).all()
    counts = np.bincount(final.ravel(), minlength=V)
    freq[noise], se = counts[0] / final.size, math.sqrt(P[0] * (1 - P[0]) / final.size)
    if noise == 1000.0: assert ((counts - P * final.size) ** 2 / (P * final.size)).sum() < 18.47
  assert freq[0.0] > P[0] + 10 * se and P[0] + 3 * se < freq[1.0] < freq[0.0] - 3 * se, freq

def test_cached_sampler_matches_uncached_with_fewer_evaluations():
  x = Tensor.full((2, 8), V).contiguous()
  Tensor.manual_seed(8)
  plain = run(repeat_oracle, x, 100)
  Tensor.manual_seed(8)
  cached = run(repeat_oracle, x, 100, cache=True)
  assert all((a[0] == b[0]).all() for a, b in zip(plain, cached))  # same samples, step by step
  assert plain[-1][2] == 100 and cached[-1][2] <= 2 * 8 + 1        # steps ≫ length: at most one NFE per change

def test_temperature_zero_and_top_p_restrict_to_likely_tokens():
  Tensor.manual_seed(9)
  greedy = run(iid_oracle, Tensor.full((4, 16), V).contiguous(), 4, temperature=0)[-1][0]
  assert (greedy == 0).all()
  nucleus = run(iid_oracle, Tensor.full((8, 32), V).contiguous(), 4, top_p=0.6)[-1][0]  # keeps {0, 1}: 0.4 + 0.3 ≥ 0.6
  assert set(np.unique(nucleus)) == {0, 1}

# ***** the evaluation estimator *****

def timed_oracle(x:Tensor, t:Tensor) -> Tensor:
  """Not an exact posterior: depends on t and on how much of x_t is masked, so that an estimator which draws t or the
  masks from the wrong distribution gives a different expectation."""
  frac = (x == V).float().mean(-1, keepdim=True).unsqueeze(-1)
  bias = (Tensor.arange(PAD).reshape(1, 1, PAD) == 0).where(3 * t.reshape(-1, 1, 1) - 2 * frac, 0)
  return iid_oracle(x, t) + bias

def by_count(denoiser, x0:np.ndarray, K:int, schedule:str, rng) -> np.ndarray:
  """(N, K) estimates of nelbo_by_count, the mask counts of each row stratified over 1..L as train.py draws them."""
  (N, L) = x0.shape
  k = 1 + np.floor(L * (np.arange(K) + rng.random((N, 1))) / K).astype(np.int32)
  e = nelbo_by_count(denoiser, Tensor(np.repeat(x0, K, 0)), Tensor(k.reshape(-1)), Tensor(rng.random((N * K, L), dtype=np.float32)), V, schedule)
  return e.numpy().reshape(N, K)

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_time_of_inverts_the_mask_probability(schedule):
  for m in (0.01, 0.3, 0.9):
    assert 1 - alpha(time_of(m, schedule), schedule) == pytest.approx(m, rel=1e-9)
  np.testing.assert_allclose(time_of(Tensor([0.01, 0.3, 0.9]), schedule).numpy(), [time_of(m, schedule) for m in (0.01, 0.3, 0.9)], rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_nelbo_by_count_agrees_with_nelbo_and_has_less_variance(schedule):
  """Both estimate one integral for the same fixed data; the plain one is the definition, the other its rearrangement."""
  Tensor.manual_seed(10)
  rng, L, B = np.random.default_rng(10), 16, 64
  x0 = rng.choice(V, size=(B, L), p=P).astype(np.int32)
  plain = np.array([nelbo(timed_oracle, Tensor(x0), times(B), V, schedule).item() for _ in range(60)])
  counted = np.array([by_count(timed_oracle, x0, 4, schedule, rng).mean() for _ in range(15)])  # 60 forward passes too
  se = math.sqrt(plain.var(ddof=1) / len(plain) + counted.var(ddof=1) / len(counted))
  assert abs(plain.mean() - counted.mean()) < 4 * se + 2e-3 * H, (plain.mean(), counted.mean(), se)  # 2e-3: nelbo's ε cut
  # per forward pass of 64 rows (each `counted` value took 4): the plain estimate's variance is several times larger
  # (measured at other seeds: 11x loglinear, 4x cosine)
  assert plain.var(ddof=1) > 2 * 4 * counted.var(ddof=1), (plain.var(ddof=1), counted.var(ddof=1))

def test_nelbo_by_count_of_repeat_oracle_is_entropy_over_length():
  """At L = 2: one token masked costs nothing (the other shows it), both masked cost H each: H/2 per token."""
  rng = np.random.default_rng(11)
  x0 = np.repeat(rng.choice(V, size=(256, 1), p=P), 2, axis=1).astype(np.int32)
  e = by_count(repeat_oracle, x0, 2, "loglinear", rng)
  assert (e[:, 0] == 0).all()  # k = 1
  mean, se = stratified_mean(e.tolist())
  assert abs(mean - H / 2) < 4 * se and se > 0

def test_stratified_standard_error_matches_the_spread_of_repeated_evaluations():
  Tensor.manual_seed(12)
  rng, L = np.random.default_rng(12), 32
  x0 = rng.choice(V, size=(16, L), p=P).astype(np.int32)
  runs = [stratified_mean(by_count(timed_oracle, x0, 8, "loglinear", rng).tolist()) for _ in range(40)]
  spread, reported = np.std([m for m, _ in runs], ddof=1), np.mean([s for _, s in runs])
  assert 0.7 * spread < reported < 1.6 * spread, (spread, reported)  # honest, at most slightly conservative
  with pytest.raises(ValueError, match="even"): stratified_mean([[1.0, 2.0, 3.0]])

# ***** the autoregressive twin *****

BIGRAM = np.random.default_rng(13).dirichlet(np.ones(V), size=V)  # P(next | previous), a known chain

def bigram_oracle(x:Tensor, t:Tensor) -> Tensor:
  """log P(x_{i+1} | x_i) at every position i, from a table: what a perfect causal model of the chain outputs."""
  table = np.full((PAD, PAD), -np.inf, np.float32)
  table[:V, :V] = np.log(BIGRAM)
  return Tensor(table)[x]

def test_ar_nll_is_the_hand_computed_chain_nll():
  x = np.array([[0, 1, 2, 3, 4, 0], [4, 4, 3, 1, 0, 2]], np.int32)
  want = [-np.mean([np.log(BIGRAM[r[i - 1], r[i]]) for i in range(1, len(r))]) for r in x]
  np.testing.assert_allclose(ar_nll(bigram_oracle, Tensor(x)).numpy(), want, rtol=1e-5)

def test_ar_sampler_follows_the_chain_left_to_right_and_keeps_the_prompt():
  init = np.full((2, 12), V, np.int32)
  init[:, 0] = [1, 3]; init[1, 5] = 2                                     # a given token in the middle is kept
  states = [(x.numpy(), nfe) for x, _, nfe in sample_ar(bigram_oracle, Tensor(init), V, temperature=0)]
  final = states[-1][0]
  assert len(states) == states[-1][1] == 11                               # one network evaluation per position
  for r, row in enumerate(final):
    for i in range(1, 12):
      if init[r, i] == V: assert row[i] == BIGRAM[row[i - 1]].argmax()    # greedy: the most likely next token
  assert final[1, 5] == 2 and (final[:, 0] == [1, 3]).all()
  stop = int(final[0, 3])  # stop_id: the sampler ends once every row has written it
  at = min(i for i in range(1, 12) if final[0, i] == stop)
  stopped = [x.numpy() for x, _, _ in sample_ar(bigram_oracle, Tensor(init[:1]), V, temperature=0, stop_id=stop)]
  assert len(stopped) == at and np.array_equal(stopped[-1][0, :at + 1], final[0, :at + 1]) and (stopped[-1][0, at + 1:] == V).all()
  for k, (x, _) in enumerate(states, start=1): assert (x[:, k + 1:] == init[:, k + 1:]).all()  # nothing ahead is touched
  Tensor.manual_seed(14)
  drawn = [x for x, _, _ in sample_ar(bigram_oracle, Tensor(np.repeat([[0] + [V] * 63], 64, 0).astype(np.int32)), V)][-1].numpy()
  pairs = np.zeros((V, V)); np.add.at(pairs, (drawn[:, :-1], drawn[:, 1:]), 1)
  expected = pairs.sum(1, keepdims=True) * BIGRAM                          # chi-square over the chain's transitions
  assert ((pairs - expected) ** 2 / np.maximum(expected, 1e-9)).sum() < 52.6  # 20 d.o.f., p = 0.0001

def test_mask_counts_cover_one_to_length_evenly():
  k = mask_counts(np.array([[0.3]], np.float32), 8, 16)[0]
  assert k.tolist() == [5, 7, 9, 11, 13, 15, 1, 3]  # 1 + ⌊16·((0.3 + i/8) mod 1)⌋: one count in each eighth of 1..16

# ***** past the context: blockwise generation *****

M = 20  # tokens of the counting language (MASK = M)

def counting_oracle(x:Tensor, t:Tensor) -> Tensor:
  """A window of the counting language: token j is the window's first token + j (mod M), with certainty. It reads only
  the window's first position, so a block is right only if the blocks before it wrote it and its prompt was kept."""
  want = (x[:, :1] + Tensor.arange(x.shape[1]).reshape(1, -1)) % M
  return (Tensor.arange(PAD).reshape(1, 1, PAD) == want.unsqueeze(-1)).where(0.0, -math.inf)

def test_blocks_continue_the_text_past_the_context_and_keep_every_prompt_token():
  init = np.full((2, 50), M, np.int32)
  init[:, 0] = [3, 10]
  states = [(x.numpy(), nfe) for x, _, nfe in sample_blocks(counting_oracle, Tensor(init), M, 4, context=8)]
  final, nfe = states[-1]
  assert np.array_equal(final, (init[:, :1] + np.arange(50)) % M)  # every block continued exactly where the last one stopped
  assert nfe == len(states) == 4 * 12                                # windows ending at 8, 12, ..., 48, 50: 4 steps each
  for (a, _), (b, _) in zip(states, states[1:]):
    assert ((a == M) | (a == b)).all()                                # a written or given token is never changed
  ahead = [int((x != M).all(0).sum()) for x, _ in states[3::4]]     # written by the end of each block
  assert ahead == [8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 50]   # each block writes half a context past the last

def test_blocks_stop_once_every_row_has_written_the_end_of_text():
  init = np.full((2, 50), M, np.int32)
  init[:, 0] = [3, 10]  # 17 first appears at position 14 in row 0 and at 7 in row 1
  final, _, nfe = [*sample_blocks(counting_oracle, Tensor(init), M, 4, context=8, stop_id=17, first=1)][-1]
  final = final.numpy()
  assert nfe == 4 * 3 and (final[:, 16:] == M).all() and (final[:, :16] != M).all()  # the third block, ending at 16, wrote it
  final, _, nfe = [*sample_blocks(counting_oracle, Tensor(init[1:]), M, 4, context=8, stop_id=10, first=1)][-1]
  assert nfe == 4 * 5  # position 0 (a given 10) does not count: 10 comes again at 20, in the fifth block (ending at 24)

# ***** samplers that decide how many tokens to write, and remasking *****

def sharp_oracle(beta:float):
  """An i.i.d. oracle of tokens from softmax(beta · log P): the larger beta, the surer it is of its likeliest token."""
  logp = np.log(P) * beta
  logp = logp - np.log(np.exp(logp).sum())
  table = np.full(PAD, -np.inf, np.float32); table[:V] = logp
  return lambda x, t: Tensor(table).reshape(1, 1, PAD).expand(x.shape[0], x.shape[1], PAD)

def test_the_threshold_sampler_needs_fewer_evaluations_the_surer_the_model_and_keeps_the_prompt():
  """Reveals every position above tau (at least one a step): an oracle sure of its token (p = 0.997) writes 24 tokens
  in a couple of evaluations, one that is not (p = 0.4 < tau) in as many as the cap allows; the prompt stays."""
  init = np.full((4, 28), V, np.int32)
  init[:, :4] = [1, 2, 3, 4]
  nfes = []
  for beta in (1.0, 8.0):
    Tensor.manual_seed(15)
    states = run(sharp_oracle(beta), Tensor(init), 24, method="threshold", tau=0.9)
    final, nfe = states[-1][0], states[-1][2]
    assert (final != V).all() and (final[:, :4] == [1, 2, 3, 4]).all() and states[-1][1] == 0
    for (a, _, _), (b, _, _) in zip(states, states[1:]): assert (b[a != V] == a[a != V]).all()  # no token changes
    nfes.append(nfe)
  assert nfes[0] == 24 and nfes[1] <= 3, nfes  # not sure: one a step, up to the cap; sure: nearly all at once

def test_remasking_with_eta_zero_is_the_ancestral_sampler_exactly():
  init = np.full((3, 24), V, np.int32)
  init[:, :3] = [0, 1, 2]
  runs = []
  for method, kw in (("ancestral", {}), ("remdm", {"eta": 0.0})):
    Tensor.manual_seed(16)
    runs.append(run(repeat_oracle, Tensor(init), 20, method=method, **kw))
  for (a, s, n), (b, s2, n2) in zip(*runs): assert (a == b).all() and s == s2 and n == n2

def test_remasking_changes_only_revealed_tokens_that_the_prompt_did_not_give_and_only_in_its_window():
  """With eta > 0 a revealed token may be masked again (then revealed anew), only for t_off < t <= t_on, never one the
  prompt gave, and never turned into another token without being masked first. The run still ends with every position
  written."""
  init = np.full((8, 32), V, np.int32)
  init[:, :4] = [1, 2, 3, 4]; init[:, 16] = 0
  given = init != V
  Tensor.manual_seed(17)
  states = run(iid_oracle, Tensor(init), 40, method="remdm", eta=0.5, t_on=0.6, t_off=0.2)
  remasked = 0
  for (a, t, _), (b, s, _) in zip(states, states[1:]):
    again = (a != V) & (b == V)
    assert not (again & given).any() and (b[given] == init[given]).all()
    assert ((a == b) | (a == V) | (b == V)).all()  # a token changes only by being masked again
    if again.any(): assert 0.2 < t <= 0.6 + 1e-9, t
    remasked += again.sum()
  assert remasked > 10 and (states[-1][0] != V).all()
