"""train.py end to end on the tiny preset: logging, evaluation, exact resume, and faults that must lose nothing."""
import json, math, os, signal
from xml.etree import ElementTree
import numpy as np, pytest
from tinygrad import Tensor
import model, train
from harness import devices, rundir
from conftest import TINY

def losses(out) -> list[float]:
  return [json.loads(line)["train_loss"] for line in open(os.path.join(out, "log.jsonl"))]

def test_log_has_every_field_and_the_loss_falls(tiny_run):
  rows = [json.loads(line) for line in open(tiny_run / "log.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 21))
  for r in rows: assert set(r) == {"step", "tokens", "train_loss", "val_nelbo", "val_nelbo_se", "val_ppl", "eval_s", "lr", "tok_per_s", "elapsed_s"}
  evals = [r for r in rows if r["val_nelbo"] is not None]
  assert [r["step"] for r in evals] == [10, 20]
  assert all(math.isclose(r["val_ppl"], math.exp(r["val_nelbo"]), rel_tol=1e-3) and 0 < r["val_nelbo_se"] < 0.2 for r in evals)
  assert rows[-1]["tokens"] == 20 * 8 * 32 and rows[-1]["tok_per_s"] > 0
  first, last = np.mean([r["train_loss"] for r in rows[:5]]), np.mean([r["train_loss"] for r in rows[-5:]])
  assert last < first, (first, last)                                  # the training loss is noisy: t is random
  assert evals[1]["val_nelbo"] < evals[0]["val_nelbo"] < math.log(513) - 0.5  # well below uniform over the vocabulary
  svg = ElementTree.parse(tiny_run / "curve.svg").getroot()                    # the learning curve, drawn from the log
  assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 2

def test_evaluation_is_deterministic(tiny_run):
  tensors, meta = rundir.load(str(tiny_run / "ckpt.safetensors"))
  m = model.Denoiser(rundir.config(meta))
  for k, v in model.parameters(m).items(): v.assign(tensors["model." + k]).realize()
  args = train.resolve(train.parse_args(TINY))
  from data import prepare
  ds = prepare.load("sample")
  keep = tensors["vocab.keep"].numpy()
  evaluate = train.make_evaluate(devices.replicas(m, devices.for_batch(args.batch_size)), ds["val"], keep, args, m.cfg.mask_id, 2)
  a, b = evaluate(), evaluate()
  assert a == b and 0 < a[0] < 10 and 0 < a[1] < 0.2

def test_resume_reproduces_an_uninterrupted_run(tiny_run, resumed_run):
  """Ctrl-C after 7 steps, --resume to 20: the same loss at every step as 20 steps without a break."""
  assert resumed_run.code == 130 and resumed_run.stopped_losses == losses(tiny_run)[:7]
  assert losses(resumed_run.out) == losses(tiny_run)

def test_a_write_killed_before_the_rename_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
  replace, saves = os.replace, []
  def dying_replace(src, dst):
    saves.append(dst)
    if str(dst).endswith(".safetensors") and len([s for s in saves if str(s).endswith(".safetensors")]) == 2: raise OSError("killed")
    return replace(src, dst)
  monkeypatch.setattr(rundir.os, "replace", dying_replace)
  with pytest.raises(SystemExit) as e: train.main(TINY + ["--steps", "4", "--eval-every", "2", "--out", str(tmp_path)])
  assert str(e.value.code).startswith("error: cannot write") and "\n" not in str(e.value.code)
  tensors, meta = rundir.load(str(tmp_path / "ckpt.safetensors"))
  assert meta["step"] == 2 and "model.tok_emb" in tensors and not list(tmp_path.glob("*.tmp"))

def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
  make = train.make_step
  def poisoned(*a, **kw):
    step, n = make(*a, **kw), []
    def run(*x, **kw):
      n.append(1)
      return Tensor(float("nan")) if len(n) == 3 else step(*x, **kw)
    return run
  monkeypatch.setattr(train, "make_step", poisoned)
  with pytest.raises(SystemExit) as e: train.main(TINY + ["--steps", "6", "--eval-every", "2", "--out", str(tmp_path)])
  assert "loss became nan at step 3" in str(e.value.code) and "last good checkpoint" in str(e.value.code)
  assert rundir.load(str(tmp_path / "ckpt.safetensors"))[1]["step"] == 2

def test_resuming_with_another_config_is_refused(tiny_run):
  with pytest.raises(SystemExit) as e: train.main(["--out", str(tiny_run), "--resume", "--dim", "64"])
  assert str(e.value.code).startswith("error:") and "dim=32" in str(e.value.code) and "\n" not in str(e.value.code)

def test_an_existing_run_is_never_overwritten(tiny_run):
  before = os.path.getmtime(tiny_run / "ckpt.safetensors")
  with pytest.raises(SystemExit) as e: train.main(TINY + ["--out", str(tiny_run)])
  assert "--resume" in str(e.value.code) and os.path.getmtime(tiny_run / "ckpt.safetensors") == before

@pytest.mark.parametrize("flags", [["--steps", "0"], ["--lr", "-1"], ["--ema", "1.5"], ["--preset", "huge"], ["--dim", "x"]])
def test_out_of_range_flags_are_argparse_errors(flags, capsys):
  with pytest.raises(SystemExit) as e: train.parse_args(flags)
  assert e.value.code == 2 and "error" in capsys.readouterr().err

@pytest.mark.parametrize("flags,message", [(["--dim", "30", "--n-heads", "4"], "multiple of"),  # --vocab-size -2: at parse time now
                                           (["--eval-draws", "3"], "must be even")])
def test_inconsistent_sizes_are_one_line_errors(tmp_path, flags, message):
  with pytest.raises(SystemExit) as e: train.main(TINY + flags + ["--out", str(tmp_path)])
  assert str(e.value.code).startswith("error:") and message in str(e.value.code)

def test_the_autoregressive_twin_trains_evaluates_and_samples(tiny_ar_run, capsys):
  """--causal: the same driver, the exact NLL logged where the NELBO is (no error bar: nothing is drawn), a checkpoint
  that sample.py reads and writes left to right."""
  import sample
  evals = [r for r in map(json.loads, open(tiny_ar_run / "log.jsonl")) if r["val_nelbo"] is not None]
  assert [r["val_nelbo_se"] for r in evals] == [0.0, 0.0] and evals[1]["val_nelbo"] < evals[0]["val_nelbo"] < math.log(513)
  _, meta = rundir.load(str(tiny_ar_run / "ckpt.safetensors"))
  assert meta["config"]["causal"] and not meta["config"]["time_cond"]
  capsys.readouterr()
  sample.main(["--ckpt", str(tiny_ar_run / "ckpt.safetensors"), "--prompt", "Once upon a time", "--length", "16"])
  out, err = capsys.readouterr()
  assert out.startswith("Once upon a time") and "░" not in out and "NFE 12" in err  # 4 prompt tokens, one evaluation per new token

def test_one_long_text_trains_on_random_windows(tmp_path, capsys):
  """A file with no end of text inside it (a book) has no stories to align windows with: train.py says it uses random
  windows, and records that in the checkpoint so that --resume and sample.py know."""
  book = tmp_path / "book.txt"
  book.write_text(" ".join(f"Tom saw {i % 50} birds and a cat." for i in range(2000)))
  train.main(["--preset", "tiny", "--data", str(book), "--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "run")])
  assert "| random windows |" in next(l for l in capsys.readouterr().out.splitlines() if l.startswith("device"))
  assert rundir.load(str(tmp_path / "run" / "ckpt.safetensors"))[1]["args"]["windows"] == "random"
