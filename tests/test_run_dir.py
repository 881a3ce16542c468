"""What train.py says about its run directory matches what is on disk, whatever happened before (a crash, a NaN, a cut
line, another process); user files are checked before any work; every flag at --resume is applied or refused."""
import json, os, signal, subprocess, sys, time
import pytest
from tinygrad import Tensor
import train
from harness import rundir
from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def steps(out) -> list[int]: return [r["step"] for r in rundir.read_log(os.path.join(out, "log.jsonl"))[0]]
def losses(out) -> list[float]: return [r["train_loss"] for r in rundir.read_log(os.path.join(out, "log.jsonl"))[0]]

def error(argv) -> str:
  with pytest.raises(SystemExit) as e: train.main(argv)
  assert str(e.value.code).startswith("error:") and "\n" not in str(e.value.code).strip(), e.value.code
  return str(e.value.code)

def test_a_data_file_too_small_for_its_windows_says_how_much_text_is_needed(tmp_path):
  story = tmp_path / "three.txt"
  story.write_text("Tom had a red ball.\nHe liked it.\nThe end.\n")
  msg = error(["--preset", "tiny", "--data", str(story), "--out", str(tmp_path / "run")])
  assert "too few for windows of 32 tokens (preset tiny)" in msg and "KB of English text" in msg and "seq_len" not in msg
  assert not os.path.exists(tmp_path / "run" / "ckpt.safetensors") and not os.path.exists(tmp_path / "run" / "log.jsonl")

def poison(monkeypatch, at:int):
  """The train step returns NaN at its at-th call."""
  make = train.make_step
  def poisoned(*a, **kw):
    step, n = make(*a, **kw), []
    def run(*x, **kw):
      n.append(1)
      return Tensor(float("nan")) if len(n) == at else step(*x, **kw)
    return run
  monkeypatch.setattr(train, "make_step", poisoned)

def test_a_nan_before_any_checkpoint_says_so_and_names_only_flags_that_exist(tmp_path, monkeypatch):
  poison(monkeypatch, 2)
  msg = error(TINY + ["--out", str(tmp_path)])
  assert "loss became nan at step 2" in msg and "no checkpoint was written yet (the first comes at step 10)" in msg
  assert "--resume" not in msg and not os.path.exists(tmp_path / "ckpt.safetensors")
  msg = error(["--out", str(tmp_path), "--resume"])
  assert "nothing to resume in" in msg and "--ckpt" not in msg

def test_a_fresh_run_never_mixes_its_log_with_a_dead_runs(tmp_path, monkeypatch, capsys):
  poison(monkeypatch, 3)
  error(TINY + ["--out", str(tmp_path)])  # died at step 3 with no checkpoint: its log holds steps 1, 2
  monkeypatch.undo()
  train.main(TINY + ["--steps", "4", "--eval-every", "2", "--out", str(tmp_path)])
  assert steps(tmp_path) == [1, 2, 3, 4]
  assert [r["step"] for r in rundir.read_log(str(tmp_path / "log.jsonl.1"))[0]] == [1, 2]  # kept, set aside
  assert "moved to" in capsys.readouterr().out

def test_resume_survives_a_log_line_cut_by_a_crash(tiny_run, tmp_path, capsys):
  import shutil
  shutil.copytree(tiny_run, tmp_path / "run")
  train.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "22"])  # a run extended by two steps
  with open(tmp_path / "run" / "log.jsonl", "a") as f: f.write('{"step": 23, "tokens": 58')  # a crash mid-line
  train.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "24"])
  assert steps(tmp_path / "run") == list(range(1, 25)) and "dropped 1 damaged line" in capsys.readouterr().out
  assert rundir.read_log(str(tmp_path / "run" / "log.jsonl"))[1] == 0

def test_every_flag_at_resume_is_applied_and_said_or_refused_with_its_reason(tiny_run, tmp_path, capsys):
  assert "trained without a weight average" in error(["--out", str(tiny_run), "--resume", "--ema", "0.9"])
  assert "--seed does nothing at --resume" in error(["--out", str(tiny_run), "--resume", "--seed", "5"])
  assert "preset=tiny" in error(["--out", str(tiny_run), "--resume", "--preset", "small"])
  import shutil
  shutil.copytree(tiny_run, tmp_path / "run")
  train.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "21", "--lr", "0.001", "--eval-every", "7"])
  out = capsys.readouterr().out
  assert "resuming step 20 with --eval-every 7 (was 10), --lr 0.001 (was 0.003), --steps 21 (was 20)" in out
  assert rundir.load(str(tmp_path / "run" / "ckpt.safetensors"))[1]["args"]["lr"] == 0.001

@pytest.mark.parametrize("flags", [["--lr", "inf"], ["--lr", "nan"], ["--weight-decay", "nan"], ["--weight-decay", "-1"],
                                   ["--seed", "-1"], ["--vocab-size", "-2"], ["--grad-clip", "inf"], ["--ema", "nan"]])
def test_numbers_that_make_no_sense_are_refused_at_parse_time(flags, capsys):
  with pytest.raises(SystemExit) as e: train.parse_args(flags)
  assert e.value.code == 2 and "error" in capsys.readouterr().err

def test_a_second_run_in_the_same_directory_is_refused_while_the_first_runs(tmp_path):
  """Two processes writing one checkpoint and one log would each overwrite the other's."""
  first = subprocess.Popen([sys.executable, "train.py"] + TINY + ["--steps", "400", "--out", str(tmp_path)], cwd=ROOT,
                           env={**os.environ, "DEV": "CPU"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    while not os.path.exists(tmp_path / "log.jsonl"): time.sleep(0.2)
    second = subprocess.run([sys.executable, "train.py", "--out", str(tmp_path), "--resume"], cwd=ROOT,
                            env={**os.environ, "DEV": "CPU"}, capture_output=True, text=True)
    assert second.returncode == 1 and "another train.py is writing to" in second.stderr
  finally: first.kill(); first.wait()

def test_kill_9_mid_run_resumes_exactly_with_each_step_logged_once(tiny_run, tmp_path):
  run = subprocess.Popen([sys.executable, "train.py"] + TINY + ["--eval-every", "5", "--out", str(tmp_path)], cwd=ROOT,
                         env={**os.environ, "DEV": "CPU"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    while len(steps(tmp_path) if os.path.exists(tmp_path / "log.jsonl") else []) < 7: time.sleep(0.05)
  finally: run.send_signal(signal.SIGKILL); run.wait()
  assert rundir.load(str(tmp_path / "ckpt.safetensors"))[1]["step"] in (5, 10)
  train.main(["--out", str(tmp_path), "--resume"])
  assert steps(tmp_path) == list(range(1, 21)) and losses(tmp_path) == losses(tiny_run)  # evaluations take no training draws

def test_without_a_c_compiler_the_cpu_backend_says_to_install_one(tmp_path):
  for script in (["train.py"] + TINY + ["--out", str(tmp_path)], ["sample.py", "--ckpt", str(tmp_path / "x.safetensors")]):
    r = subprocess.run([sys.executable] + script, cwd=ROOT, env={**os.environ, "DEV": "CPU", "PATH": str(tmp_path)},
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "install it (Linux: apt-get install clang" in r.stderr, r.stderr

def test_offline_the_checkpoint_records_the_data_it_trained_on_and_resume_uses_it(tmp_path, monkeypatch, capsys):
  from data import prepare
  from test_data import closed_port
  monkeypatch.setattr(prepare, "URL", f"http://127.0.0.1:{closed_port()}/")
  monkeypatch.setattr(prepare, "DOWNLOADS", str(tmp_path / "downloads"))
  train.main(["--preset", "tiny", "--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "run")])  # no --data
  assert "FALLING BACK TO THE BUNDLED SAMPLE" in capsys.readouterr().out
  assert rundir.load(str(tmp_path / "run" / "ckpt.safetensors"))[1]["args"]["data"] == "sample"
  train.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "3"])
  out = capsys.readouterr().out
  assert "FALLING BACK" not in out and "downloading" not in out and steps(tmp_path / "run") == [1, 2, 3]

def test_speed_and_eta_are_shown_only_once_measured_also_after_resume(resumed_run):
  """A process's first two steps compile kernels: they are never counted in the speed, on a new run or a resumed one
  (resumed_run: stopped during step 7, resumed by a new train.main)."""
  out, tmp_path = resumed_run.printed, resumed_run.out
  assert "step 8 compiles first" in out and "a checkpoint at step 10, then every 10" in out  # announced, before step 8
  assert out.index("step 8 compiles") < out.index("step 8/20")
  lines = [l for l in out.splitlines() if l.startswith("step ") and "|" in l]
  assert [l.split()[1] for l in lines[:3]] == ["8/20", "9/20", "10/20"]
  assert "compiling" in lines[0] and "compiling" in lines[1] and "tok/s" not in lines[0] + lines[1]
  eta = lines[2].split("ETA ")[1]
  assert "tok/s" in lines[2] and int(eta.split("m")[0]) == 0 and int(eta.split("m")[1][:2]) < 20  # 10 steps of ~0.1 s
  rows = rundir.read_log(str(tmp_path / "log.jsonl"))[0]
  assert [r["tok_per_s"] > 0 for r in rows[7:10]] == [False, False, True]

def test_a_terminated_run_saves_like_ctrl_c(tmp_path, monkeypatch):
  """kill or timeout (SIGTERM) during step 3: the step finishes, its checkpoint is written, --resume can go on."""
  batch, calls = train.batch, []
  def terminating_batch(*a):
    calls.append(1)
    if len(calls) == 3: os.kill(os.getpid(), signal.SIGTERM)
    return batch(*a)
  def unhandled(*_): raise AssertionError("train.py left SIGTERM to its default: the run would die unsaved")
  monkeypatch.setattr(train, "batch", terminating_batch)
  previous = signal.signal(signal.SIGTERM, unhandled)  # what train.py must replace
  try:
    with pytest.raises(SystemExit) as e: train.main(TINY + ["--out", str(tmp_path)])
  finally: signal.signal(signal.SIGTERM, previous)
  assert e.value.code == 130 and steps(tmp_path) == [1, 2, 3]
  assert rundir.load(str(tmp_path / "ckpt.safetensors"))[1]["step"] == 3
