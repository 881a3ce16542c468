"""harness/speed.py: each speed device against the plain formula beside it, values and gradients, and the switch that
runs the plain formulas everywhere (PLAIN_FORMULAS=1)."""
import numpy as np, pytest
from tinygrad import Context, Tensor
from harness import speed
from model import Config, Denoiser, parameters

def test_each_device_computes_its_plain_formula_and_its_gradients(monkeypatch):
  """embed (atomic, one-hot matmul), tied_head (custom backward, row split, chunked input gradient) and linear (the
  transposed weight gradient, for more, fewer and as many outputs as inputs) must give the numbers and the gradients of
  plain indexing and plain matmuls."""
  monkeypatch.setattr(speed, "SPLIT_ROWS", 64)  # 200 rows: the head's input gradient in chunks of 64, 64, 64 and 8
  rng = np.random.default_rng(5)
  table, h, r = (rng.normal(size=s).astype(np.float32) for s in [(200, 16), (2, 7, 16), (2, 7, 200)])  # split 128 + 72
  ids = Tensor(rng.integers(0, 200, (2, 7)).astype(np.int32))
  ws = [rng.normal(size=s).astype(np.float32) for s in [(48, 16), (16, 48), (16, 16)]]
  outs = []
  for fast in (None, True, False):  # the plain formulas; the CPU/AMD paths (atomic); the GPU paths (one-hot matmul)
    W, H, Ls = Tensor(table), Tensor(h), [Tensor(w) for w in ws]
    with Context(TRAINING=1):
      logits = H @ W.T if fast is None else speed.tied_head(H, W)
      e = W[ids] if fast is None else speed.embed(W, ids, atomic=fast)
      y = H
      for L in Ls: y = y @ L.T if fast is None else speed.linear(y, L)
      ((logits * Tensor(r)).sum() + (e * e).sum() + (y * y).sum()).backward()
    outs.append([logits.numpy(), e.numpy(), y.numpy(), W.grad.numpy(), H.grad.numpy()] + [L.grad.numpy() for L in Ls])
  for fast in outs[1:]:
    for a, b in zip(fast, outs[0]): np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

def test_the_switch_runs_the_plain_formulas_and_the_model_computes_the_same(monkeypatch):
  """With speed.PLAIN set no custom backward runs (counted here), and the loss and every gradient of a step are those
  of the speed devices, on this CPU where they are all on."""
  cfg = Config(n_tokens=200, seq_len=8, dim=32, n_layers=2, n_heads=2, time_cond=True)
  x, t = Tensor(np.random.default_rng(0).integers(0, 201, (2, 8)).astype(np.int32)), Tensor([0.3, 0.8])
  results = []
  for plain in (False, True):
    monkeypatch.setattr(speed, "PLAIN", plain)
    calls = []
    for name in ("_tied_head", "_linear", "_onehot_embed"):
      monkeypatch.setattr(speed, name, (lambda f, n: lambda *a: calls.append(n) or f(*a))(getattr(speed, name), name))
    Tensor.manual_seed(1)
    model = Denoiser(cfg)
    for b in model.blocks: b.ada.weight.assign(Tensor.randn(*b.ada.weight.shape) * 0.2).realize()
    with Context(TRAINING=1):
      loss = model(x, t)[..., :200].log_softmax(-1).mean()
      loss.backward()
    results.append((loss.item(), [p.grad.numpy() for p in parameters(model).values()], sorted(set(calls))))
    monkeypatch.undo()
  (fast, fast_grads, fast_calls), (plain, plain_grads, plain_calls) = results
  assert fast_calls == ["_linear", "_tied_head"] and plain_calls == []  # the CPU's devices (its embedding is atomic)
  assert abs(fast - plain) < 1e-5
  for a, b in zip(fast_grads, plain_grads): np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
