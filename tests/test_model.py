"""The denoiser: adaLN-Zero identity at init, SUBS, bidirectional attention, time conditioning, that it learns, and that
the data-parallel step computes the single-device one."""
import functools, math, os
import numpy as np, pytest
from tinygrad import Context, Device, Tensor, TinyJit, dtypes, nn
from tinygrad.nn.state import get_state_dict
import argparse
from harness import devices
from harness.devices import replicas, supported_dtype
from model import Config, Denoiser, modulate, parameters, rmsnorm, time_features
from diffusion import SCHEDULES, antithetic_times, nelbo
from test_diffusion import estimate

CFG = Config(n_tokens=13, seq_len=16, dim=32, n_layers=2, n_heads=2, time_cond=True)  # every path: t read too

def randomize_modulation(model:Denoiser):
  """adaLN-Zero starts every block as the identity; give the modulation weights values so the blocks act."""
  for lin in [b.ada for b in model.blocks] + [model.ada_final]:
    lin.weight.assign(Tensor.randn(*lin.weight.shape) * 0.2).realize()
    lin.bias.assign(Tensor.randn(*lin.bias.shape) * 0.2).realize()

def inputs(seed=0, B=2, cfg=CFG):
  rng = np.random.default_rng(seed)
  return Tensor(rng.integers(0, cfg.n_tokens + 1, size=(B, cfg.seq_len)).astype(np.int32)), Tensor(rng.uniform(0.1, 1, B).astype(np.float32))

def test_every_block_is_the_identity_at_init():
  Tensor.manual_seed(0)
  model = Denoiser(CFG)
  x, t = inputs()
  h = model.tok_emb[x]
  c = model.t_out(model.t_in(Tensor.randn(2, 256)).silu())
  cos, sin = model.rope[0], model.rope[1]
  for block in model.blocks: np.testing.assert_array_equal(block(h, block.ada(c.silu()), cos, sin).numpy(), h.numpy())
  expected = rmsnorm(h) @ model.tok_emb.T   # final adaLN is zero too: logits = rmsnorm(emb) · embᵀ
  np.testing.assert_allclose(model(x, t).numpy()[..., :CFG.n_tokens], expected.numpy()[..., :CFG.n_tokens], rtol=1e-5, atol=1e-6)

def test_subs_never_predicts_mask_or_padding():
  Tensor.manual_seed(1)
  model = Denoiser(CFG)
  randomize_modulation(model)
  logits = model(*inputs()).numpy()
  assert CFG.padded_vocab == 64 and logits.shape[-1] == 64
  assert np.isneginf(logits[..., CFG.n_tokens:]).all()          # MASK (= n_tokens) and padding
  assert np.isfinite(logits[..., :CFG.n_tokens]).all()
  probs = Tensor(logits).softmax(-1).numpy()
  assert (probs[..., CFG.mask_id] == 0).all() and np.allclose(probs.sum(-1), 1, atol=1e-5)

def test_attention_is_bidirectional():
  Tensor.manual_seed(2)
  model = Denoiser(CFG)
  randomize_modulation(model)
  x, t = inputs()
  changed = x.numpy().copy()
  changed[:, -1] = (changed[:, -1] + 1) % CFG.n_tokens           # change only the last token
  a, b = model(x, t).numpy(), model(Tensor(changed), t).numpy()
  assert np.abs(a[:, 0, :CFG.n_tokens] - b[:, 0, :CFG.n_tokens]).max() > 1e-4  # the first position sees it

def test_the_causal_twin_never_sees_the_future():
  """Changing token j changes the twin's logits at j and after, never before it (and t is ignored)."""
  Tensor.manual_seed(2)
  model = Denoiser(Config(**{**CFG.__dict__, "causal": True}))
  randomize_modulation(model)
  x, t = inputs()
  for j in (1, CFG.seq_len // 2, CFG.seq_len - 1):
    changed = x.numpy().copy()
    changed[:, j] = (changed[:, j] + 1) % CFG.n_tokens
    a, b = model(x, t).numpy()[..., :CFG.n_tokens], model(Tensor(changed), t).numpy()[..., :CFG.n_tokens]
    np.testing.assert_array_equal(a[:, :j], b[:, :j])
    assert np.abs(a[:, j:] - b[:, j:]).max() > 1e-4
  np.testing.assert_array_equal(model(x, t).numpy(), model(x, t * 0.5).numpy())

def test_time_conditioning_changes_output_only_when_on():
  for time_cond in (True, False):
    Tensor.manual_seed(3)
    model = Denoiser(Config(**{**CFG.__dict__, "time_cond": time_cond}))
    randomize_modulation(model)
    x, _ = inputs()
    early, late = (model(x, Tensor([t, t])).numpy()[..., :CFG.n_tokens] for t in (0.1, 0.9))
    diff = np.abs(early - late).max()
    assert (diff > 1e-4) if time_cond else (diff == 0)

def test_all_blocks_modulations_in_one_matmul_are_each_blocks_own_adaln():
  """The Denoiser computes every block's ada(c.silu()) in one matmul (speed: one long sum for c's gradient); logits and
  every gradient must be those of each block computing its own, the formula of the DiT."""
  Tensor.manual_seed(5)
  model = Denoiser(CFG)
  randomize_modulation(model)
  x, t = inputs()
  def per_block(x, t):  # Denoiser.__call__ with each block's own modulation
    c = model.t_out(model.t_in(time_features(t)).silu())
    h = model.tok_emb[x]
    for b in model.blocks: h = b(h, b.ada(c.silu()), model.rope[0], model.rope[1])
    shift, scale = model.ada_final(c.silu()).unsqueeze(1).chunk(2, dim=-1)
    return (modulate(h, shift, scale) @ model.tok_emb.T).float() + model.subs
  results, r = [], Tensor.randn(2, CFG.seq_len, CFG.n_tokens).realize()
  for f in (model, per_block):
    for p in parameters(model).values(): p.grad = None
    with Context(TRAINING=1):
      logits = f(x, t)
      (logits[..., :CFG.n_tokens].log_softmax(-1) * r).sum().backward()
    results.append([logits.numpy()] + [p.grad.numpy() for p in parameters(model).values()])
  for a, b in zip(*results): np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

def test_parameter_count_matches_the_architecture():
  d, V = CFG.dim, CFG.padded_vocab
  per_block = 3 * d * d + d * d + 8 * d * d + (6 * d * d + 6 * d)   # qkv, proj, MLP, adaLN
  expected = V * d + (256 * d + d) + (d * d + d) + CFG.n_layers * per_block + (2 * d * d + 2 * d)
  assert sum(p.numel() for p in parameters(Denoiser(CFG)).values()) == expected

PATTERNS = np.array([np.roll(np.arange(16), k) for k in (0, 3, 7, 11)], dtype=np.int32)

def pattern_batch(rng, B=32) -> tuple[Tensor, Tensor, Tensor]:
  """Windows, their antithetic times and mask uniforms, drawn on the host as train.py draws them."""
  t = antithetic_times(rng.random((1, 1), dtype=np.float32), B)[0]
  return Tensor(PATTERNS[rng.integers(0, 4, B)]), Tensor(t), Tensor(rng.random((B, 16), dtype=np.float32))

@pytest.fixture(scope="module")
def trained():
  """300 steps on sequences that repeat one of four fixed patterns, without time conditioning."""
  Tensor.manual_seed(4)
  rng = np.random.default_rng(4)
  cfg = Config(n_tokens=16, seq_len=16, dim=32, n_layers=2, n_heads=2, time_cond=False)
  model = Denoiser(cfg)
  opt = nn.optim.AdamW(list(parameters(model).values()), lr=3e-3, b1=0.9, b2=0.95, weight_decay=0)

  @TinyJit
  @Context(TRAINING=1)
  def step(x0:Tensor, t:Tensor, u:Tensor) -> Tensor:
    opt.zero_grad()
    loss = nelbo(model, x0, t, cfg.mask_id, u=u).backward()
    return loss.realize(*opt.schedule_step())
  return model, cfg, [step(*pattern_batch(rng)).item() for _ in range(300)]

def test_a_few_hundred_steps_learn_a_repetitive_corpus(trained):
  first, last = np.mean(trained[2][:10]), np.mean(trained[2][-30:])
  assert first > 0.8 * math.log(16) and last < 0.25 * math.log(16), (first, last)  # log 4 / 16 tokens ≈ 0.09 is the floor

def test_without_time_conditioning_the_bound_does_not_depend_on_the_schedule(trained):
  """NELBO = ∫ w(t)·E[−log p] dt = ∫₀¹ f(m) dm over the mask rate m = 1 − α(t), when p_θ sees only x_t: the same weights
  give the same bound under every schedule. A wrong weight breaks this (−α′ alone, say, differs by a factor 1/m)."""
  model, cfg, _ = trained
  estimates = []
  for schedule in SCHEDULES:
    ev = TinyJit(lambda x0, t, u: nelbo(model, x0, t, cfg.mask_id, schedule, u).realize())
    rng = np.random.default_rng(5)
    estimates.append(estimate(lambda: ev(*pattern_batch(rng)).item(), 60))
  (a, se_a), (b, se_b) = estimates
  assert abs(a - b) < 4 * math.hypot(se_a, se_b), estimates
  assert math.log(4) / 16 - 4 * se_a < a < 0.25 * math.log(16)  # a bound: never below the data's entropy, log 4 / 16

def _has_opencl() -> bool:
  try: return Device["CL"] is not None
  except Exception: return False

SHORT = Config(**{**CFG.__dict__, "seq_len": 8})  # CFG at half the length, for the tests that compile a whole training step:
                                                  # the same operations, compiled in 2/3 the time (by PoCL in 1/3)

def one_step(dtype:str, device:str) -> tuple[float, np.ndarray]:
  """The loss and the float32 gradients of one training step of SHORT with its matmuls in `dtype`, on `device` (the
  same weights and inputs whatever the device: made on the CPU, then moved)."""
  Tensor.manual_seed(6)
  model = Denoiser(SHORT, dtype)
  randomize_modulation(model)
  if device != "CPU":  # the same weights and buffers, on the device
    for v in get_state_dict(model).values(): v.replace(v.to(device).realize())
  x, t = inputs(cfg=SHORT)
  x, t = x.to(device), t.to(device)
  with Context(TRAINING=1):
    loss = nelbo(model, x.clip(0, SHORT.n_tokens - 1), t, SHORT.mask_id, u=Tensor.full(x.shape, 0.5, device=device))
    loss.backward()
  assert all(p.dtype == p.grad.dtype == dtypes.float32 for p in parameters(model).values())
  return loss.item(), np.concatenate([p.grad.numpy().ravel() for p in parameters(model).values()])

@functools.cache
def float32_step() -> tuple[float, np.ndarray]: return one_step("float32", "CPU")  # the reference, computed once for all

@pytest.mark.parametrize("device,dtype", [(d, t) for d in ["CPU"] + ["CL"] * _has_opencl() for t in ("bfloat16", "float16")])
def test_half_precision_matches_float32_to_its_rounding(device, dtype):
  """--dtype: matmuls in bfloat16/float16, weights and gradients in float32. The loss and the gradients of one step must
  be float32's up to the dtype's rounding (2^-8 relative for bfloat16, 2^-11 for float16, grown over a few layers), on
  the CPU and on OpenCL (PoCL here: GPU-style kernels). The reference is float32 on the CPU backend for both (float32 on
  PoCL differs from it by < 1e-6, far inside the tolerances). Measured: bfloat16 on PoCL 1.3e-2 (gradients), 5e-5 (loss);
  float16 on the CPU 1.3e-3, 1e-5."""
  if supported_dtype(dtype, device) != dtype: pytest.skip(f"{device} has no {dtype}")
  (loss32, g32), (loss, g) = float32_step(), one_step(dtype, device)
  tol = {"bfloat16": 2e-2, "float16": 3e-3}[dtype]
  assert abs(loss - loss32) < tol * loss32, (loss, loss32)
  assert np.linalg.norm(g - g32) < tol * np.linalg.norm(g32), np.linalg.norm(g - g32) / np.linalg.norm(g32)

@pytest.mark.parametrize("n,estimator", [(2, "plain"), (4, "count")])
def test_data_parallel_step_matches_one_device_and_the_average_follows_its_formula(n, estimator):
  """train.py's step splits the batch over n CPU devices (`--devices n`) and averages the gradients: the weights it
  reaches must be the single-device ones (and the same seed must give the same initial weights whatever the devices),
  with train.py's objective and host draws for each estimator (antithetic times or mask counts spread over the whole
  batch, each device taking its rows). The weight average must be θ_ema ← d·θ_ema + (1 − d)·θ, d given to each step."""
  import train
  args = argparse.Namespace(causal=False, estimator=estimator, schedule="loglinear", batch_size=4, seq_len=SHORT.seq_len,
                            grad_accum=1, windows="random")
  loss, rng = train.objective(args, SHORT.mask_id), np.random.default_rng(3)
  tokens = rng.integers(0, SHORT.n_tokens, 1000)
  data = [train.batch(tokens, None, None, args, rng) for _ in range(3)]
  runs = []
  for devs in (devices.for_batch(4, 1), devices.for_batch(4, n)):
    Tensor.manual_seed(8)
    model, ema = Denoiser(SHORT), Denoiser(SHORT)
    params, ema_params = list(parameters(model).values()), list(parameters(ema).values())
    for e in ema_params: e.assign(Tensor.zeros(*e.shape)).realize()
    copies = replicas(model, devs)
    opt = nn.optim.SGD(params, lr=0.5)  # linear in the gradient (Adam's first steps amplify rounding in near-zero ones)
    step = train.make_step(copies, opt, loss, 1.0, ema)
    losses, expected = [], [np.zeros(e.shape, np.float32) for e in ema_params]
    for x, d in zip(data, (0.5, 0.9, 0.0)):
      losses.append(step(*x, ema_decay=d).item())
      expected = [d * e + (1 - d) * p.numpy() for e, p in zip(expected, params)]
    for e, want in zip(ema_params, expected): np.testing.assert_allclose(e.numpy(), want, rtol=1e-5, atol=1e-6)
    for copy in copies[1:]:
      for a, b in zip(parameters(copy).values(), params): np.testing.assert_array_equal(a.numpy(), b.numpy())
    runs.append((losses, [p.numpy() for p in params]))
  np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5)
  for a, b in zip(runs[1][1], runs[0][1]): np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

def test_buffers_are_told_from_parameters_by_tinygrads_flag_not_by_name():
  """A buffer is a tensor with is_param False (rope, causal, subs), whatever its name; a parameter named like a private
  attribute is still trained and saved."""
  model = Denoiser(Config(**{**CFG.__dict__, "causal": True}))
  model.blocks[0]._x = Tensor.ones(3).contiguous().realize().is_param_(False)   # a buffer with a private name
  model.blocks[0]._w = Tensor.ones(3).contiguous().realize()                    # a parameter with one
  names = set(parameters(model))
  assert "blocks.0._w" in names and "blocks.0._x" not in names
  assert not any(n.startswith(("rope", "causal", "subs")) for n in names) and "tok_emb" in names

@pytest.mark.skipif(not _has_opencl(), reason="no OpenCL driver (CI installs PoCL)")
def test_an_opencl_driver_on_the_cpu_is_a_cpu():
  """With PoCL installed tinygrad picks CL by itself; the drivers must then behave as on the CPU backend (its preset and
  devices), and DEV=CL must still mean CL (named as a CPU)."""
  import subprocess, sys
  from harness.devices import is_cpu, name as device_name
  assert is_cpu("CL") and is_cpu("CPU") and not is_cpu("NULL") and "a CPU" in device_name("CL")
  env = {k: v for k, v in os.environ.items() if k != "DEV"}
  probe = "from harness import devices; from tinygrad import Device; a = Device.DEFAULT; devices.prefer_cpu_backend(); print(a, Device.DEFAULT)"
  out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.split() == ["CL", "CPU"], out.stderr[-500:]
