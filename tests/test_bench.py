"""harness/bench.py's modes, dry-run on tinygrad's NULL device (which schedules and counts every kernel, running none): --cost,
whose operation count can never fall below the model's own FLOPs (bench.flops_per_token); where nvcc exists, every
kernel of a step compiled for Hopper, its matmuls on tensor cores; --profile and --search end to end. The tiny NULL runs
call harness.bench.main in the test process, so that the step's kernels are lowered once for them all; the schedules they write
are read back by a new `python -m harness.bench` process, and the Hopper step compiles in one of its own."""
import json, os, shutil, subprocess, sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def bench(dev:str, *flags:str) -> tuple[dict, str]:
  env = {**os.environ, "DEV": dev, "NULL_ALLOW_COPYOUT": "1"}
  out = subprocess.run([sys.executable, "-m", "harness.bench", *flags], cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout

def bench_here(monkeypatch, capsys, dev:str, *flags:str) -> tuple[dict, str]:
  """bench.main(flags) in this process on `dev`, with the pins and record of compiled kernels empty as in a new one."""
  from harness import bench, kernels
  from tinygrad import Context
  monkeypatch.setattr(kernels, "pinned", {})
  monkeypatch.setattr(kernels, "compiled", {})
  capsys.readouterr()
  with Context(DEV=dev, NULL_ALLOW_COPYOUT=1): bench.main(list(flags))
  out = capsys.readouterr().out
  return json.loads(out.strip().splitlines()[-1]), out

def test_cost_report_counts_at_least_the_models_flops(monkeypatch, capsys):
  r, text = bench_here(monkeypatch, capsys, "NULL", "--preset", "tiny", "--cost", "--top", "3")
  assert "top kernels by operations:" in text and "top kernels by bytes:" in text
  assert r["device"] == "NULL" and r["kernels"] > 50
  assert 1.0 <= r["ops_ratio"] < 2.0, r  # a step does at least the matmuls' FLOPs, and (tiny) not twice them
  # a step reads every weight and writes every gradient and both Adam moments at least once: 16 bytes per parameter
  assert r["gb_moved"] * 1e9 >= 16 * r["params"], r

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: compiling the step for Hopper needs CUDA's compiler")
def test_the_step_runs_on_tensor_cores_and_fills_a_hopper_gpu():
  """The `small` network with a GPU batch (64 windows: base's 16,384 tokens a step) in bfloat16, each kernel compiled
  for sm_90 (an H200: 132 SMs). Tensor cores: no reduction with more than 0.5% of the step's operations may miss them
  (the gated Linears' weight gradients did, before kernels.STEP_CONTEXT). The fill: most operations in kernels of at
  least two waves of thread blocks, and no kernel on fewer blocks than SMs with 1% of them (the weight gradients
  summed 16,384 tokens on 128 blocks, 13% of the step, before kernels.GPU_SPLIT). float32 would not do: tinygrad's
  NULL device offers TF32 tensor cores that real CUDA leaves off by default."""
  r, text = bench("NULL:NVCC:sm_90", "--preset", "small", "--batch-size", "64", "--dtype", "bfloat16", "--cost",
                  "--top", "3")
  assert r["kernels"] > 300 and 1.0 <= r["ops_ratio"] < 1.5, r
  assert r["big_reductions_without_tc"] == [] and r["tc_share"] > 0.95 and "tensor cores" in text, r
  assert r["fill"] > 0.7 and (r["largest_under_sms"] is None or r["largest_under_sms"]["gops"] < 0.01 * r["gops"]), r

def test_profile_and_search_run_end_to_end_and_write_schedules_that_pin(tmp_path, monkeypatch, capsys):
  """The GPU modes, dry-run on NULL: a per-kernel profile, a search of the two slowest kernels, their schedules written
  and pinned by the step built again (every one found its kernel), then read back by --schedules in a new process."""
  path = str(tmp_path / "schedules.json")
  r, text = bench_here(monkeypatch, capsys, "NULL", "--preset", "tiny", "--profile", "--top", "5", "--search", "2", "--beam", "1", "--write-schedules", path)
  assert len(r["profile"]) == 5 and {"name", "calls", "ms", "share", "gflops", "gbs", "tc"} <= set(r["profile"][0])
  assert r["searched"] == 2 and r["unmatched_schedules"] == 0 and "with the 2 schedules pinned" in text
  schedules = json.load(open(path))
  assert len(schedules) == 2 and all(len(s["key"]) == 64 and s["opts"] is not None for s in schedules)
  r, _ = bench("NULL", "--preset", "tiny", "--schedules", path, "--steps", "1", "--warmup", "1", "--skip-sample")
  assert r["unmatched_schedules"] == 0
