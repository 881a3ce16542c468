"""quality.py, the --quality harness: text statistics on known cases, copying, the judge against a hand computation, the
mode end to end, the plot."""
import json
import numpy as np, pytest
import sample
from harness import quality

def test_text_statistics_on_known_cases():
  assert quality.entropy([7, 7, 7, 7]) == 0 and quality.entropy([1, 2, 1, 2]) == pytest.approx(np.log(2))
  assert quality.distinct([1, 2, 1, 2, 1, 2]) == pytest.approx(2 / 3) and quality.distinct(list(range(10))) == 1
  grams = quality.ngrams(np.arange(12), 8)           # hashed (n > 4): still one value per distinct n-gram
  assert len(grams) == 5 and len(np.unique(grams)) == 5 and (quality.ngrams([3, 4, 5, 6], 4) == 3 + (4 << 16) + (5 << 32) + (6 << 48)).all()

def test_copying_finds_a_planted_copy():
  rng = np.random.default_rng(0)
  train = rng.integers(0, 8000, 100_000)
  text = np.concatenate([train[5000:5030], rng.integers(0, 8000, 70)])  # 30 copied tokens, then 70 new ones
  share = quality.copied(text, np.unique(quality.ngrams(train, 8)))
  assert share == (30 - 8 + 1) / (100 - 8 + 1)     # exactly the 8-grams inside the copied span
  assert quality.copied(rng.integers(0, 8000, 100), np.unique(quality.ngrams(train, 8))) == 0

def test_judge_perplexity_of_its_own_greedy_text():
  """Greedy text is the judge's argmax at every step, so its NLL is −log max p, computed here prefix by prefix."""
  from tinygrad import Tensor
  from model import Config, Denoiser
  import diffusion
  Tensor.manual_seed(3)
  L = 9  # the judge's context: a start token and 8 tokens of text, the fewest that hold an 8-gram (copied8)
  judge = Denoiser(Config(n_tokens=40, seq_len=L, dim=32, n_layers=2, n_heads=2, causal=True))
  for p in [b.ada for b in judge.blocks] + [judge.ada_final]: p.bias.assign(Tensor.randn(*p.bias.shape)).realize()  # sharpen it
  init = np.array([[5] + [40] * (L - 1)], np.int32)
  text = [x for x, _, _ in diffusion.sample_ar(judge, Tensor(init), 40, temperature=0)][-1].numpy()[:, 1:]
  want = np.mean([-Tensor(judge(Tensor(np.r_[5, text[0]][None, :i].astype(np.int32)), Tensor([0.0])).numpy()[0, -1]).log_softmax().max().item()
                  for i in range(1, L)])
  q = quality.quality(text, judge, 5, np.zeros(0, np.uint64))
  assert q["judge_nll"][0] == pytest.approx(want, rel=1e-4) and q["gen_ppl"][0] == pytest.approx(np.exp(want), rel=1e-3)
  assert q["copied8"][0] == 0

def test_quality_mode_prints_every_row(capsys, tiny_run, tiny_ar_run):
  sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--steps", "8", "--num-samples", "3", "--quality", "--judge", str(tiny_ar_run / "ckpt.safetensors")])
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [r["rows"] for r in rows] == ["samples", "validation text", "judge's own samples"]
  for r in rows: assert 0 < r["entropy"][0] < np.log(32) and 0 < r["distinct4"][0] <= 1 and 0 <= r["copied8"][0] <= 1 and r["gen_ppl"][0] > 1
  assert rows[0]["nfe"] == 8 and rows[2]["nfe"] == 31  # the judge writes a context's worth after its start token
  assert rows[1]["copied8"][0] < 0.5  # held-out stories are not in the training split
  with pytest.raises(SystemExit) as e: sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--steps", "2", "--quality", "--judge", str(tiny_run / "ckpt.safetensors")])
  assert "not an autoregressive twin" in str(e.value.code)

def test_the_quality_plot_draws_one_line_per_sampler_setting_in_nfe_order(tmp_path):
  """quality.plot (the --sweep figure): log-log, one polyline per sampler setting, its points by NFE per sample."""
  import re
  from harness.quality import plot
  rows = [{"rows": "samples", "sampler": s, "temperature": 1.0, "top_p": 1.0, "nfe": n, "gen_ppl": [ppl, 1.0]}
          for s, pts in (("ancestral", [(64, 600.0), (8, 1100.0), (32, 590.0)]), ("confidence", [(8, 130.0), (64, 22.0)])) for n, ppl in pts]
  rows.append({"rows": "validation text", "gen_ppl": [16.0, 2.0]})  # reference rows are not drawn
  plot(rows, str(tmp_path / "q.svg"))
  svg = (tmp_path / "q.svg").read_text()
  lines = [[tuple(map(float, p.split(","))) for p in pts.split()] for pts in re.findall(r'<polyline points="([^"]+)"', svg)]
  assert len(lines) == 2 and [len(p) for p in lines] == [3, 2] and "ancestral T=1.0 p=1.0" in svg
  (a8, a32, a64), (c8, c64) = lines
  assert a8[0] < a32[0] < a64[0] and a8[0] == c8[0] and a64[0] == c64[0]  # x: NFE, shared scale
  assert c64[1] == max(y for p in lines for _, y in p) and a8[1] == min(y for p in lines for _, y in p)  # y: lower PPL lower down
  assert abs((a32[0] - a8[0]) - (a64[0] - a32[0]) * 2) < 1e-6  # log scale: 8 → 32 is twice 32 → 64
