"""sample.py on a tiny checkpoint trained in the test session: prompts, infilling, seeds, the visualizer, HTML, errors."""
import json, re
from html.parser import HTMLParser
import numpy as np, pytest
import sample
from data import vocab

def run(capsys, tiny_run, *flags) -> tuple[str, str]:
  sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--steps", "8", *flags])
  out = capsys.readouterr()
  return out.out, out.err

def test_a_prompt_is_kept_exactly_and_no_mask_remains(capsys, tiny_run):
  out, err = run(capsys, tiny_run, "--prompt", "Once upon a time, Tom", "--num-samples", "2")
  stories = out.split("-" * 40)
  assert len(stories) == 2 and all(s.strip("\n").startswith("Once upon a time, Tom") for s in stories)
  assert vocab.MASK not in out and "NFE 8" in err and "tokens/s" in err

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
  assert len(data["frames"]) == 8 + 1 and data["frames"][-1]["revealed"] == 100
  assert [f["t"] for f in data["frames"]] == sorted([f["t"] for f in data["frames"]], reverse=True)
  for s, text in zip(data["samples"], out.split("-" * 40)):   # the final frame is the printed text
    assert max(s["revealed_at"]) == 8 and min(s["revealed_at"]) >= 1
    assert "".join(s["tokens"]).strip() == text.strip()

@pytest.mark.parametrize("flags,message", [
  (["--prompt", "a [MASK*x] b"], "malformed marker"), (["--prompt", "a [MASK*0] b"], "malformed marker"),
  (["--prompt", "word " * 40], "the prompt is"), (["--length", "999"], "more than the model context"),
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
