"""Tests run on tinygrad's CPU backend unless DEV says otherwise (with an OpenCL driver installed, tinygrad
would pick CL by itself), and import the project's modules from the repository root."""
import os, sys
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
