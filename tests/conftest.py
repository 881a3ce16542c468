"""Tests run on tinygrad's CPU backend unless DEV says otherwise (with an OpenCL driver installed, tinygrad
would pick CL by itself), and import the project's modules from the repository root."""
import contextlib, functools, io, json, os, signal, sys
from types import SimpleNamespace
os.environ.setdefault("DEV", "CPU")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest

TINY = ["--preset", "tiny", "--data", "sample", "--steps", "20", "--eval-every", "10"]

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A tiny model trained for 20 steps on the bundled sample: its directory holds ckpt.safetensors and log.jsonl."""
  import train
  out = tmp_path_factory.mktemp("tiny_run")
  train.main(TINY + ["--out", str(out)])
  return out

@pytest.fixture(scope="session")
def tiny_ar_run(tmp_path_factory):
  """The autoregressive twin of tiny_run (train.py --causal), 12 steps."""
  import train
  out = tmp_path_factory.mktemp("tiny_ar_run")
  train.main(TINY + ["--steps", "12", "--eval-every", "6", "--causal", "--out", str(out)])
  return out

@pytest.fixture(scope="session", autouse=True)
def short_end_of_run_sample():
  """train.py shows a 64-step sample at every evaluation that no test reads: 8 steps in the tests (the same code, an
  eighth of the model calls, which cost ~1 s a run)."""
  import train
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "story", functools.partial(train.story, steps=8))
    yield

@pytest.fixture(scope="session")
def resumed_run(tmp_path_factory):
  """TINY stopped by Ctrl-C during step 7 (SIGINT sent from its 7th batch), then `--resume`d to step 20 by a new
  train.main: its directory, the stopped run's exit code and logged losses, and what the resumed run printed."""
  import train
  out = tmp_path_factory.mktemp("resumed_run")
  batch, calls = train.batch, []
  def interrupting_batch(*a):
    calls.append(1)
    if len(calls) == 7: os.kill(os.getpid(), signal.SIGINT)   # lands during step 7: it finishes, then the run stops
    return batch(*a)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "batch", interrupting_batch)
    with pytest.raises(SystemExit) as e: train.main(TINY + ["--out", str(out)])
  stopped = [json.loads(line)["train_loss"] for line in open(out / "log.jsonl")]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed): train.main(["--out", str(out), "--resume"])
  return SimpleNamespace(out=out, code=e.value.code, stopped_losses=stopped, printed=printed.getvalue())
