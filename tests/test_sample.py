"""sample.py on a tiny checkpoint trained in the test session: prompts, infilling, seeds, the visualizer, HTML, errors."""
import json, os, re
from html.parser import HTMLParser
import numpy as np, pytest
from tinygrad import Tensor
import sample
from data import vocab
from harness import display, rundir

def page_data(path) -> dict:
  """The JSON a page holds, with each sample's frames replayed from their changes into full states (None: masked)."""
  data = json.loads(re.search(r'application/json">(.*?)</script>', path.read_text(), re.S)[1])
  for s in data["samples"]:
    s["states"], cur = [], []
    for diff in s["frames"]:
      cur = list(cur) + [None] * (1 + max([i for i, _ in diff], default=-1) - len(cur))
      for i, t in diff: cur[i] = t
      s["states"].append(cur)
  return data

def first_reveal(states) -> list[int]:
  """For each position, the first frame that shows it revealed."""
  return [next(k for k, st in enumerate(states) if st[i] is not None) for i in range(len(states[-1]))]

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
  assert json.loads(scripts[0])["labels"]  # the page parses as HTML, its data as JSON
  data = page_data(path)
  assert len(data["labels"]) == 8 + 1 and "100.0% revealed" in data["labels"][-1] and "t = 0.000" in data["labels"][-1]
  for s, text in zip(data["samples"], out.split("-" * 40)):   # the final frame is the printed text, up to the end of text
    assert len(s["states"]) == 9 and max(first_reveal(s["states"])) == 8 and min(first_reveal(s["states"])) >= 1
    assert "".join(s["states"][-1][:s["end"]]).strip() == text.split("\n[cut:")[0].strip()
  assert "masked again" in path.read_text()  # the legend

def test_a_story_is_shown_up_to_its_end_of_text_and_keep_going_shows_the_rest(capsys, tiny_run, monkeypatch):
  """The drawn tokens are planted (the tiny model seldom ends a story): the printed text stops where the story ends."""
  _, keep, _ = rundir.load_model(str(tiny_run / "ckpt.safetensors"))
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
  assert "block 4  step 8/8" in html and len(page_data(tmp_path / "long.html")["labels"]) == 32 + 1
  with pytest.raises(SystemExit) as e: sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--race", str(tiny_run / "ckpt.safetensors")])
  assert "not an autoregressive twin" in str(e.value.code)

def test_race_off_a_terminal_prints_both_sides_and_writes_a_page(capsys, tiny_run, tiny_ar_run, tmp_path):
  out, err = run(capsys, tiny_run, "--race", str(tiny_ar_run / "ckpt.safetensors"), "--keep-going", "--html", str(tmp_path / "race.html"))
  frames = [f for f in out.split("-" * 40) if f.strip()]
  assert len(frames) == 5 and "\x1b" not in out and all("diffusion (8 NFE)" in f and "autoregressive twin (31 NFE)" in f for f in frames)
  assert frames[0].count(vocab.MASK) > frames[-1].count(vocab.MASK) == 0
  assert "diffusion: NFE 8 | autoregressive twin: NFE 31" in err  # confidence: one evaluation a step; left to right: one a token
  page, data = (tmp_path / "race.html").read_text(), page_data(tmp_path / "race.html")
  assert [s["title"] for s in data["samples"]] == ["diffusion", "autoregressive twin"] and len(data["labels"]) == 31 + 1
  assert max(first_reveal(data["samples"][0]["states"])) == 8
  assert sorted(first_reveal(data["samples"][1]["states"])) == list(range(1, 32))  # one position an evaluation
  assert "http" not in page.replace("http://www.w3.org", "")  # self-contained

@pytest.mark.parametrize("flags,message", [
  (["--prompt", "a [MASK*x] b"], "malformed marker"), (["--prompt", "a [MASK*0] b"], "malformed marker"),
  (["--prompt", "word " * 40], "more than the model context"), (["--prompt", "word " * 10, "--length", "5"], "more than --length 5"),
])
def test_bad_prompts_are_one_line_errors(tiny_run, flags, message):
  with pytest.raises(SystemExit) as e: sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), *flags])
  assert str(e.value.code).startswith("error:") and message in str(e.value.code) and "\n" not in str(e.value.code)

def test_a_checkpoint_that_cannot_be_read_says_why_and_never_to_delete_it(tmp_path, tiny_run):
  """Not there, a directory, not a safetensors file, a safetensors file of something else, a newer version's."""
  from tinygrad import Tensor
  def error(path) -> str:
    with pytest.raises(SystemExit) as e: sample.main(["--ckpt", str(path)])
    assert str(e.value.code).startswith("error:") and "\n" not in str(e.value.code) and "delete" not in str(e.value.code)
    return str(e.value.code)
  assert "run `python train.py` first" in error(tmp_path / "none.safetensors")
  assert "is a directory: pass the checkpoint in it" in error(tiny_run) and str(tiny_run / "ckpt.safetensors") in error(tiny_run)
  (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  assert "is not a checkpoint" in error(tmp_path / "junk.safetensors")
  rundir.save(str(tmp_path / "other.safetensors"), {"w": Tensor.ones(2, 2).contiguous()}, {"note": "someone else's"})
  assert "not a tinymdlm checkpoint" in error(tmp_path / "other.safetensors")
  tensors, meta = rundir.load(str(tiny_run / "ckpt.safetensors"))
  rundir.save(str(tmp_path / "newer.safetensors"), tensors, {**meta, "format": rundir.FORMAT + 1})
  assert "newer tinymdlm" in error(tmp_path / "newer.safetensors")

@pytest.mark.parametrize("flags", [["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "-1"], ["--top-p", "0"],
                                   ["--top-p", "nan"], ["--steps", "0"], ["--num-samples", "-3"], ["--length", "1e3"],
                                   ["--fps", "inf"], ["--seed", "-1"], ["--quality", "--length", "3"]])
def test_numbers_that_make_no_sense_are_refused_before_anything_runs(flags, capsys):
  with pytest.raises(SystemExit) as e: sample.parse_args(flags)
  assert e.value.code == 2 and "error" in capsys.readouterr().err

def test_markers_that_are_not_quite_markers_and_huge_ones_are_refused_before_any_allocation():
  for prompt in ("Tom had a [mask*3] dog.", "[Mask]", "a [MASK*-2] b", "a [ MASK ] b"):
    with pytest.raises(ValueError, match="malformed marker"): sample.template(prompt, None, None, 32, 50257)
  with pytest.raises(ValueError, match="more than the model context"): sample.template("[MASK*99999999999]", None, None, 32, 50257)
  with pytest.raises(ValueError, match="more than 100 contexts"): sample.template("", None, 10**12, 32, 50257)

def test_it_says_what_it_loaded_and_where_it_wrote(capsys, tiny_run, tmp_path):
  _, err = run(capsys, tiny_run, "--html", str(tmp_path / "p.html"))
  assert f"{tiny_run / 'ckpt.safetensors'}: MDLM, preset tiny, step 20 of 20, val NELBO" in err and "raw weights" in err
  assert "word salad" in err and f"wrote {tmp_path / 'p.html'}" in err  # 20 steps: said why the text is poor

def test_the_page_shows_characters_split_over_tokens_whole(capsys, tiny_run, tmp_path):
  """GPT-2 writes a curly quote as two tokens; decoded one token at a time each would be U+FFFD."""
  run(capsys, tiny_run, "--prompt", "Tom said “hi” and didn’t [MASK*5].", "--html", str(tmp_path / "q.html"))
  text = "".join(page_data(tmp_path / "q.html")["samples"][0]["states"][-1])
  assert text.startswith("Tom said “") and "” and didn’" in text and "\ufffd" not in text  # ("hi", "t": <unk> at K = 512)
  assert "overflow-wrap:anywhere" in (tmp_path / "q.html").read_text()  # an all-masked frame is one long word

def test_frames_never_write_control_characters_and_fall_back_to_snapshots_when_taller_than_the_window(capsys, monkeypatch):
  keep = None
  from data.tokenizer import gpt2
  controls = [gpt2().encode_single_token(b) for b in (b"\x08", b"\x11")]  # GPT-2 has a token for every byte
  tokens = np.array(vocab.encode("Tom", keep).tolist() + controls + vocab.encode(" ran.", keep).tolist())
  masked = np.full(len(tokens), 50257)
  text = display.frame_text(tokens, masked, np.zeros(len(tokens), bool), keep, 50257, color=True)
  assert "\x08" not in text and "\x11" not in text and "␈" in text and "Tom" in text
  monkeypatch.setattr(display.shutil, "get_terminal_size", lambda: __import__("os").terminal_size((20, 4)))
  texts = [("", np.stack([tokens] * 3), np.stack([masked] * 3))]  # three samples: taller than 4 rows
  assert display.show("step 1", texts, 0, np.ones(len(tokens), bool), keep, 50257, True, 1000) is False
  out = capsys.readouterr().out
  assert "\x1b[H" not in out and "snapshots instead" in out and "-" * 40 in out

def test_a_frame_shows_each_position_as_it_is_in_that_frame_a_token_masked_again_too():
  """Frames are states, not first reveals: a remasking sampler can mask a revealed token again, and it shows as masked
  (red) in that frame, then as whatever is revealed there later."""
  M = 50257
  before, now = np.array([5, M, 7, 8]), np.array([5, 6, M, 8])
  kinds = display.kinds(now, before, np.array([True, False, False, False]), M, None)
  assert kinds.tolist() == [display.GIVEN, display.NEW, display.REMASKED, display.OLD]
  text = display.frame_text(now, before, np.array([True, False, False, False]), None, M, color=True)
  assert "\x1b[31m" + vocab.MASK in text and "\x1b[1;32m" in text  # red mask, green new token

def test_without_ckpt_it_samples_your_own_run_if_there_is_one_else_the_shipped_model(tiny_run, tiny_ar_run, tmp_path,
                                                                                      monkeypatch, capsys):
  """A fresh clone has no out/ckpt.safetensors: sample.py then uses the shipped model (and --race its shipped twin)
  and says so; once the user has trained one, theirs."""
  monkeypatch.setattr(rundir, "SHIPPED", {"mdlm": str(tiny_run / "ckpt.safetensors"),
                                          "twin": str(tiny_ar_run / "ckpt.safetensors")})
  monkeypatch.chdir(tmp_path)
  sample.main(["--steps", "2", "--race", "--length", "8"])
  err = capsys.readouterr().err
  assert "the model shipped in models/ (you have no out/ckpt.safetensors yet)" in err and "autoregressive twin: NFE" in err
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "ckpt.safetensors").write_bytes((tiny_run / "ckpt.safetensors").read_bytes())
  sample.main(["--steps", "2"])
  assert "out/ckpt.safetensors: MDLM" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")

def test_the_shipped_models_are_a_diffusion_model_and_its_twin_on_one_vocabulary_as_the_race_needs():
  """models/ holds what a fresh clone samples, races and judges with: a bidirectional MDLM and a causal twin trained on
  the same data and vocabulary (load_twin refuses anything else), float16 weight averages, 12 MB together at most."""
  model, keep, meta = rundir.load_model(rundir.SHIPPED["mdlm"])
  twin = rundir.load_twin(None, keep, "race")
  _, _, twin_meta = rundir.load_model(rundir.SHIPPED["twin"])
  assert not model.cfg.causal and twin.cfg.causal and model.cfg.n_tokens == twin.cfg.n_tokens
  assert meta["data_key"] == twin_meta["data_key"] and meta["averaged"] and twin_meta["averaged"]
  assert sum(os.path.getsize(p) for p in rundir.SHIPPED.values()) <= 12e6
