"""A hostile environment loses nothing, by kind: the system or the backend fails (a full disk, a path that cannot be
written, a backend that does not exist or is not here, a file that is not UTF-8), the terminal cannot show a character,
the run resumes elsewhere, the user presses Ctrl-C once or twice at any moment. Each gives one line that says what to do,
an exit code other than 0, nothing already written lost, and no temp file left behind."""
import errno, io, json, os, signal, subprocess, sys
import numpy as np, pytest
import sample, train
from conftest import TINY
from data import prepare
from harness import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = TINY[:4] + ["--steps", "4", "--eval-every", "2"]  # tiny, 4 steps, a checkpoint at steps 2 and 4

def one_line_error(argv, main=train.main) -> str:
  with pytest.raises(SystemExit) as e: main(argv)
  message = str(e.value.code)
  assert message.startswith("error:") and "\n" not in message.strip(), message
  return message

def temp_files(*folders) -> list[str]:
  return [os.path.join(d, f) for folder in folders for d, _, fs in os.walk(folder) for f in fs if ".tmp" in f]

class Full:
  """A file on a full disk: every write fails with ENOSPC."""
  def __init__(self, f): self.f = f
  def write(self, data): raise OSError(errno.ENOSPC, "No space left on device")
  def __getattr__(self, name): return getattr(self.f, name)
  def __enter__(self): return self
  def __exit__(self, *exc): self.f.close()

def test_a_disk_that_fills_while_a_checkpoint_is_written_loses_nothing_and_leaves_no_temp_file(tmp_path, monkeypatch):
  """The second checkpoint does not fit (ENOSPC mid-write): one line; the first checkpoint intact; no temp file. A
  --resume on the still-full disk (its log cannot be rewritten): one line, no temp file."""
  def filling(path, *a, **kw):  # once a checkpoint is there, nothing more fits
    f = open(path, *a, **kw)
    return Full(f) if str(path).endswith(".tmp") and (tmp_path / "ckpt.safetensors").exists() else f
  monkeypatch.setattr(rundir, "open", filling, raising=False)
  message = one_line_error(SHORT + ["--out", str(tmp_path)])
  assert "no space left on the device: free some space" in message and "ckpt.safetensors" in message
  assert rundir.load(str(tmp_path / "ckpt.safetensors"))[1]["step"] == 2 and not temp_files(tmp_path)
  assert "no space left" in one_line_error(["--out", str(tmp_path), "--resume"]) and not temp_files(tmp_path)
  monkeypatch.undo()
  train.main(["--out", str(tmp_path), "--resume"])  # space again: the run goes on from its checkpoint
  assert rundir.load(str(tmp_path / "ckpt.safetensors"))[1]["step"] == 4

def test_too_little_room_for_checkpoints_is_refused_before_any_work(tmp_path, monkeypatch):
  from types import SimpleNamespace
  monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: SimpleNamespace(free=100_000))
  assert "free some space, or choose another --out" in one_line_error(SHORT + ["--out", str(tmp_path)])
  assert not (tmp_path / "log.jsonl").exists()

@pytest.mark.parametrize("where", ["file", "under_a_file", "dangling_link"])
def test_an_output_path_that_cannot_be_a_directory_is_one_line_before_any_work(tmp_path, where):
  (tmp_path / "file").write_text("not a directory")
  os.symlink(tmp_path / "nowhere", tmp_path / "dangling_link")
  out = {"file": tmp_path / "file", "under_a_file": tmp_path / "file" / "run", "dangling_link": tmp_path / "dangling_link"}
  assert "cannot use --out" in one_line_error(SHORT + ["--out", str(out[where])])
  assert (tmp_path / "file").read_text() == "not a directory"

def test_printing_never_costs_work_whatever_the_terminal_can_show(tmp_path, monkeypatch):
  """A stdout that cannot encode ⁇ or ░ (a Windows console, a log opened as cp1252): the run completes and saves,
  the characters replaced; the checkpoint is written before the evaluation's sample is printed."""
  raw = io.BytesIO()
  monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="cp1252", errors="strict", line_buffering=True))
  train.main(SHORT + ["--out", str(tmp_path)])
  sys.stdout.flush()
  assert rundir.load(str(tmp_path / "ckpt.safetensors"))[1]["step"] == 4 and b"sample:" in raw.getvalue()

def test_a_resumed_run_trains_on_the_data_it_started_with_from_any_directory(tmp_path, monkeypatch):
  """--data given relative to one directory, --resume from another that has a file of the same name: the run reads
  its own file (found by its recorded path); if that file's content changed, one line names both."""
  text = " ".join(f"Tom saw {i} birds and a cat.<|endoftext|>" for i in range(600))  # 600 different stories
  for d in ("a", "b"):
    (tmp_path / d).mkdir()
    (tmp_path / d / "story.txt").write_text(text if d == "a" else text.replace("birds", "cats"))
  monkeypatch.chdir(tmp_path / "a")
  train.main(TINY[:2] + ["--data", "story.txt", "--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "run")])
  meta = rundir.load(str(tmp_path / "run" / "ckpt.safetensors"))[1]
  assert meta["args"]["data"] == str(tmp_path / "a" / "story.txt")
  monkeypatch.chdir(tmp_path / "b")
  train.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "3"])  # a's story.txt, though b has one too
  (tmp_path / "a" / "story.txt").write_text(text.replace("birds", "dogs"))
  message = one_line_error(["--out", str(tmp_path / "run"), "--resume", "--steps", "4"])
  assert str(tmp_path / "a" / "story.txt") in message and meta["data_key"] in message and "now holds" in message

@pytest.mark.parametrize("dev,says", [("FOO", "tinygrad has no backend 'FOO'"), ("CUDA", "cannot be used on this machine")])
def test_a_backend_that_does_not_exist_or_is_not_here_is_one_line_before_any_work(tmp_path, dev, says):
  for script in (["train.py"] + SHORT + ["--out", str(tmp_path / "run")], ["sample.py"]):
    r = subprocess.run([sys.executable] + script, cwd=ROOT, env={**os.environ, "DEV": dev}, capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr[-800:]
  assert not (tmp_path / "run").exists()

def test_a_page_that_cannot_be_written_is_said_before_sampling(tiny_run, tmp_path, capsys):
  for path in (tmp_path / "missing" / "p.html", tmp_path):
    message = one_line_error(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--html", str(path)], sample.main)
    assert "does not exist" in message or "is a directory" in message
  assert "sampling" not in capsys.readouterr().err

def test_a_file_not_quite_utf8_says_where_and_leaves_no_temp_file(tmp_path, monkeypatch):
  """One Latin-1 byte past the first chunks of an otherwise UTF-8 file: the byte and line are named, the advice is to
  fix that line (converting the whole file would garble the rest), and no temp file is left in the prepared folder."""
  monkeypatch.setattr(prepare, "CHUNK", 1 << 10)
  lines = [f"Story {i}: Tom saw a bird.<|endoftext|>" for i in range(2000)]
  lines[1500] = "Story 1500: caf\xe9 au lait.<|endoftext|>"
  (tmp_path / "book.txt").write_bytes("\n".join(lines).replace("\xe9", "@").encode().replace(b"@", b"\xe9"))
  for _ in range(2):  # tried twice: nothing left either time
    with pytest.raises(prepare.DataError) as e: prepare.load(str(tmp_path / "book.txt"), root=str(tmp_path / "p"))
    assert "line 1,501" in str(e.value) and "b'\\xe9'" in str(e.value) and "fix that line" in str(e.value)
    assert "iconv" not in str(e.value) and not temp_files(tmp_path / "p")

def test_a_prompt_the_vocabulary_cannot_hold_is_said_before_sampling(tiny_run, capsys):
  sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--steps", "2", "--prompt", "A xylophone and a zebra"])
  err = capsys.readouterr().err
  assert "'xylophone'" in err and "'zebra'" in err and err.index("xylophone") < err.index("sampling")

def test_samples_that_need_more_memory_than_is_free_are_refused_before_any_work(tiny_run, monkeypatch, capsys):
  """What grows with --num-samples (logits, noise, recorded states) is weighed against the memory free: refused in one
  line before sampling when it does not fit, let through when it does."""
  from harness import devices
  def meminfo(free_kib:int):
    monkeypatch.setattr(devices, "open", lambda *a, **kw: io.StringIO(f"MemTotal: 9 kB\nMemAvailable: {free_kib} kB\n"),
                        raising=False)
  meminfo(1024)  # 1 MiB free: 64 tiny samples need ~40 MB
  message = one_line_error(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--num-samples", "64"], sample.main)
  assert "lower --num-samples" in message and "sampling" not in capsys.readouterr().err
  meminfo(1 << 30)  # 1 TiB free
  sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors"), "--num-samples", "64", "--steps", "2"])
  assert "64 x " in capsys.readouterr().err

def test_resuming_a_finished_run_says_how_to_train_further_without_compiling(tiny_run, capsys):
  with pytest.raises(SystemExit) as e: train.main(["--out", str(tiny_run), "--resume"])
  out = capsys.readouterr().out
  assert e.value.code is None and "is finished (step 20 of 20)" in out and "--steps N, with N > 20" in out
  assert "compiles" not in out

def interrupt_at(monkeypatch, *calls:int):
  """SIGINT from inside train.batch at these calls (each call of batch starts a step)."""
  batch, n = train.batch, []
  def interrupting(*a):
    n.append(1)
    for _ in range(calls.count(len(n))): os.kill(os.getpid(), signal.SIGINT)
    return batch(*a)
  monkeypatch.setattr(train, "batch", interrupting)

def test_ctrl_c_twice_stops_at_once_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
  interrupt_at(monkeypatch, 4, 4)  # both during step 4: the second before it could save
  with pytest.raises(SystemExit) as e: train.main(SHORT + ["--out", str(tmp_path)])
  err = capsys.readouterr().err
  assert e.value.code == 130 and err.strip().count("\n") == 0 and "holds step 2 (continue with --resume)" in err
  assert rundir.load(str(tmp_path / "ckpt.safetensors"))[1]["step"] == 2 and not temp_files(tmp_path)

def test_ctrl_c_while_the_first_step_compiles_stops_at_once_in_one_line(tmp_path, monkeypatch, capsys):
  interrupt_at(monkeypatch, 1)
  with pytest.raises(SystemExit) as e: train.main(SHORT + ["--out", str(tmp_path)])
  err = capsys.readouterr().err
  assert e.value.code == 130 and "interrupted: nothing was saved" in err and err.strip().count("\n") == 0

def test_ctrl_c_in_sample_is_one_line(tiny_run, monkeypatch, capsys):
  def interrupted(*a, **kw): raise KeyboardInterrupt
  monkeypatch.setattr(sample, "run", interrupted)
  with pytest.raises(SystemExit) as e: sample.main(["--ckpt", str(tiny_run / "ckpt.safetensors")])
  assert e.value.code == 130 and "interrupted: sampling stopped" in capsys.readouterr().err
