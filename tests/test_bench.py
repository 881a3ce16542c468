"""bench.py --cost: one train step scheduled on tinygrad's NULL device, whose operation count can never fall below the
model's own FLOPs (bench.flops_per_token), and, where nvcc exists, every kernel of the step compiled for Hopper."""
import json, os, shutil, subprocess, sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def cost(dev:str) -> dict:
  env = {**os.environ, "DEV": dev, "NULL_ALLOW_COPYOUT": "1"}
  out = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--cost", "--top", "3"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "top kernels by operations:" in out.stdout and "top kernels by bytes:" in out.stdout
  return json.loads(out.stdout.strip().splitlines()[-1])

@pytest.mark.parametrize("dev", ["NULL", "NULL:NVCC:sm_90"])
def test_cost_report_counts_at_least_the_models_flops(dev):
  if "NVCC" in dev and shutil.which("nvcc") is None: pytest.skip("no nvcc: the Hopper compile check needs CUDA's compiler")
  r = cost(dev)
  assert r["device"] == "NULL" and r["kernels"] > 50
  assert 1.0 <= r["ops_ratio"] < 2.0, r  # a step does at least the matmuls' FLOPs, and (tiny) not twice them
  # a step reads every weight and writes every gradient and both Adam moments at least once: 16 bytes per parameter
  assert r["gb_moved"] * 1e9 >= 16 * r["params"], r
