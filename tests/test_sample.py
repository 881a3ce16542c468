"""sample.py on a tiny checkpoint trained in the test session: prompts, infilling, seeds, the visualizer, HTML, errors."""
import json, re
from html.parser import HTMLParser
import numpy as np, pytest
from tinygrad import Tensor
import quality, sample
from data import vocab

def run(capsys, tiny_run, *flags) -> tuple[str, str]:
  sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--steps", "8", *flags])
  out = capsys.readouterr()
  return out.out, out.err

def test_a_prompt_is_kept_exactly_and_no_mask_remains(capsys, tiny_run):
  out, err = run(capsys, tiny_run, "--prompt", "Once upon a time, Tom", "--num-samples", "2")
  stories = out.split("-" * 40)
  assert len(stories) == 2 and all(s.strip("\n").startswith("Once upon a time, Tom") for s in stories)
  assert vocab.MASK not in out and "NFE 8" in err and "tokens/s" in err, out

def test_infilling_keeps_every_character_outside_the_markers(capsys, tiny_run):
  out, _ = run(capsys, tiny_run, "--prompt", "Tom had a [MASK*3] dog.[MASK] The end!", "--seed", "5")
  m = re.fullmatch(r"Tom had a (.*) dog\.(.*) The end!\n", out, re.S)
  assert m and vocab.MASK not in out

def test_infill_template_places_masks_where_the_markers_are():
  keep = None
  ids = sample.template("a[MASK*2]b[MASK]", keep, None, 32, 50257)
  assert ids.tolist() == vocab.encode("a", keep).tolist() + [50257] * 2 + vocab.encode("b", keep).tolist() + [50257]
  assert (sample.template("hi", keep, 6, 32, 50257)[1:] == 50257).all()     # a plain prompt is a prefix

def test_a_seed_reproduces_the_text(capsys, tiny_run):
  a, _ = run(capsys, tiny_run, "--seed", "7")
  b, _ = run(capsys, tiny_run, "--seed", "7")
  c, _ = run(capsys, tiny_run, "--seed", "8")
  assert a == b and a != c

def test_visualizer_without_a_terminal_prints_snapshots_with_fewer_masks(capsys, tiny_run):
  out, _ = run(capsys, tiny_run, "--visualize", "--prompt", "Once upon a time")
  frames = [f for f in out.split("-" * 40) if f.strip()]
  masks = [f.count(vocab.MASK) for f in frames]
  assert len(frames) >= 4 and "\x1b" not in out                      # plain text when stdout is not a terminal
  assert masks == sorted(masks, reverse=True) and masks[0] > 0 and masks[-1] == 0
  assert all("Once upon a time" in f for f in frames)

def test_html_replay_parses_and_holds_every_frame(capsys, tiny_run, tmp_path):
  path = tmp_path / "replay.html"
  out, _ = run(capsys, tiny_run, "--html", str(path), "--num-samples", "2")
  scripts = []
  class Scripts(HTMLParser):
    def handle_starttag(self, tag, attrs): self.inside = tag == "script" and ("type", "application/json") in attrs
    def handle_data(self, data):
      if getattr(self, "inside", False): scripts.append(data)
  Scripts(convert_charrefs=True).feed(path.read_text())
  data = json.loads(scripts[0])
  assert len(data["labels"]) == 8 + 1 and "100.0% revealed" in data["labels"][-1] and "t = 0.000" in data["labels"][-1]
  for s, text in zip(data["samples"], out.split("-" * 40)):   # the final frame is the printed text, up to the end of text
    assert max(s["revealed_at"]) == 8 and min(s["revealed_at"]) >= 1
    assert "".join(s["tokens"][:s["end"]]).strip() == text.split("\n[cut:")[0].strip()

def test_a_story_is_shown_up_to_its_end_of_text_and_keep_going_shows_the_rest(capsys, tiny_run, monkeypatch):
  """The drawn tokens are planted (the tiny model seldom ends a story): the printed text stops where the story ends."""
  _, keep, _ = sample.load(str(tiny_run / "ckpt.safetensors"))
  eot, words = vocab.eot(keep), vocab.encode(" He was happy. She was sad.", keep)
  def planted(model, init, args, stop=None):
    x = np.tile(init, (2, 1))
    x[:, 1:1 + 2 * len(words)] = np.r_[words, words]
    x[0, 1 + len(words)] = eot  # row 0 ends after " He was happy. She was sad."; row 1 never ends
    yield Tensor(x), 0.0, 1
  monkeypatch.setattr(sample, "reverse_process", planted)
  out, _ = run(capsys, tiny_run, "--length", "20", "--num-samples", "2")
  a, b = out.split("-" * 40)
  assert a.strip("\n") == " He was happy. She was sad." and b.startswith("\n He was happy. She was sad. He was happy. She was sad.")
  assert "[cut: no end of text within 20 tokens]" in b and "[cut" not in a
  out, _ = run(capsys, tiny_run, "--length", "20", "--num-samples", "2", "--keep-going")
  assert out.startswith(" He was happy. She was sad.<|endoftext|>") and "[cut" not in out
  assert vocab.story_end([eot, 5, eot, 7], np.array([True, False, False, False]), keep) == 2  # the given start is not an end
  assert vocab.story_end([5, eot, 7, 8], np.array([False, False, True, False]), keep) is None  # given text follows it: not the end

def test_length_past_the_context_writes_block_by_block(capsys, tiny_run, tmp_path):
  out, err = run(capsys, tiny_run, "--length", "70", "--keep-going", "--prompt", "Once upon a time", "--html", str(tmp_path / "long.html"))
  assert out.startswith("Once upon a time") and vocab.MASK not in out
  assert "NFE 32" in err  # the EOT and 70 tokens: windows of 32 ending at 32, 48, 64 and 71, 8 steps each
  html = (tmp_path / "long.html").read_text()
  assert "block 4  step 8/8" in html and len(json.loads(re.search(r'application/json">(.*?)</script>', html, re.S)[1])["labels"]) == 32 + 1
  with pytest.raises(SystemExit) as e: sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--race", str(tiny_run / "ckpt.safetensors")])
  assert "not an autoregressive twin" in str(e.value.code)

def test_race_off_a_terminal_prints_both_sides_and_writes_a_page(capsys, tiny_run, tiny_ar_run, tmp_path):
  out, err = run(capsys, tiny_run, "--race", str(tiny_ar_run / "ckpt.safetensors"), "--keep-going", "--html", str(tmp_path / "race.html"))
  frames = [f for f in out.split("-" * 40) if f.strip()]
  assert len(frames) == 5 and "\x1b" not in out and all("diffusion (8 NFE)" in f and "autoregressive twin (31 NFE)" in f for f in frames)
  assert frames[0].count(vocab.MASK) > frames[-1].count(vocab.MASK) == 0
  assert "diffusion: NFE 8 | autoregressive twin: NFE 31" in err  # time-conditioned: one evaluation a step; left to right: one a token
  page = (tmp_path / "race.html").read_text()
  data = json.loads(re.search(r'application/json">(.*?)</script>', page, re.S)[1])
  assert [s["title"] for s in data["samples"]] == ["diffusion", "autoregressive twin"] and len(data["labels"]) == 31 + 1
  assert max(data["samples"][0]["revealed_at"]) == 8 and sorted(data["samples"][1]["revealed_at"]) == list(range(1, 32))
  assert "http" not in page.replace("http://www.w3.org", "")  # self-contained

@pytest.mark.parametrize("flags,message", [
  (["--prompt", "a [MASK*x] b"], "malformed marker"), (["--prompt", "a [MASK*0] b"], "malformed marker"),
  (["--prompt", "word " * 40], "more than the model context"), (["--prompt", "word " * 10, "--length", "5"], "more than --length 5"),
])
def test_bad_prompts_are_one_line_errors(tiny_run, flags, message):
  with pytest.raises(SystemExit) as e: sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), *flags])
  assert str(e.value.code).startswith("error:") and message in str(e.value.code) and "\n" not in str(e.value.code)

def test_missing_or_broken_checkpoints_are_one_line_errors(tmp_path):
  with pytest.raises(SystemExit) as e: sample.main(["--ckpt", str(tmp_path / "none.safetensors")])
  assert "run `python train.py` first" in str(e.value.code)
  (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(SystemExit) as e: sample.main(["--ckpt", str(tmp_path / "junk.safetensors")])
  assert str(e.value.code).startswith("error:") and "not a readable tinymdlm checkpoint" in str(e.value.code)

# ***** --quality *****

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
  judge = Denoiser(Config(n_tokens=40, seq_len=12, dim=32, n_layers=2, n_heads=2, causal=True))
  for p in [b.ada for b in judge.blocks] + [judge.ada_final]: p.bias.assign(Tensor.randn(*p.bias.shape)).realize()  # sharpen it
  init = np.array([[5] + [40] * 11], np.int32)
  text = [x for x, _, _ in diffusion.sample_ar(judge, Tensor(init), 40, temperature=0)][-1].numpy()[:, 1:]
  want = np.mean([-Tensor(judge(Tensor(np.r_[5, text[0]][None, :i].astype(np.int32)), Tensor([0.0])).numpy()[0, -1]).log_softmax().max().item()
                  for i in range(1, 12)])
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
  """sample.plot (the --sweep figure): log-log, one polyline per (sampler, temperature, top-p), its points by NFE."""
  import re
  from quality import plot
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
