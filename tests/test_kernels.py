"""harness/kernels.py's hook on tinygrad's lowering: a pinned schedule is the one a kernel gets, one that no longer fits its
kernel is an error that says so, one that matches no kernel is reported; a kernel of a second device is lowered once."""
import numpy as np, pytest
from tinygrad import Tensor
from tinygrad.codegen import to_program_cache
from tinygrad.codegen.opt import KernelOptError, OptOps
from harness import kernels

@pytest.fixture(autouse=True)
def hooked():
  """The hook, installed as the code that uses it installs it (the last test checks that no import does)."""
  assert kernels.install()

def matmul(device:str, n:int=64) -> tuple[Tensor, np.ndarray]:
  rng = np.random.default_rng(n)
  a, b = rng.normal(size=(n, 48)).astype(np.float32), rng.normal(size=(48, 40)).astype(np.float32)
  return (Tensor(a, device=device) @ Tensor(b, device=device)).realize(), a @ b

def compiled_kernel(result:Tensor):
  """(key, applied opts) of the kernel that computed `result`: the last one compiled."""
  prg, (key, _) = list(kernels.compiled.items())[-1]
  return key, prg.src[0].arg.applied_opts

def test_a_pinned_schedule_is_applied_and_computes_the_same_numbers(monkeypatch):
  monkeypatch.setattr(kernels, "pinned", {})
  out, want = matmul("CPU", 64)
  key, heuristic = compiled_kernel(out)
  schedule = [["UPCAST", 0, 2], ["UNROLL", 0, 4]]
  assert [[o.op.name, o.axis, o.arg] for o in heuristic] != schedule  # else the test would prove nothing
  kernels.pin([{"key": key, "name": "matmul", "opts": schedule}])
  out, _ = matmul("CPU", 64)  # the same kernel: compiled again, with the pinned opts
  assert compiled_kernel(out) == (key, tuple(kernels.pinned[key])) and [o.op for o in kernels.pinned[key]] == [OptOps.UPCAST, OptOps.UNROLL]
  np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
  assert kernels.unmatched() == []

def test_a_schedule_that_no_longer_fits_its_kernel_is_a_loud_error_and_an_unknown_one_is_reported(monkeypatch):
  monkeypatch.setattr(kernels, "pinned", {})
  out, _ = matmul("CPU", 72)
  key, _ = compiled_kernel(out)
  kernels.pin([{"key": key, "name": "matmul", "opts": [["UPCAST", 0, 7]]}, {"key": "0" * 64, "name": "gone", "opts": []}])
  with pytest.raises(KernelOptError, match="pinned schedule no longer fits its kernel"): matmul("CPU", 72)
  assert kernels.unmatched() == ["0" * 64]

def test_a_kernel_is_lowered_once_for_all_devices_of_a_backend():
  a, want = matmul("CPU", 80)
  before = len(to_program_cache)
  b, _ = matmul("CPU:1", 80)
  assert len(to_program_cache) == before  # CPU:1's kernel is CPU's, found in the cache
  assert b.device == "CPU:1" and np.array_equal(a.numpy(), b.numpy()) and np.allclose(b.numpy(), want, atol=1e-4)

def test_no_import_changes_tinygrad_and_the_hook_is_guarded(monkeypatch, capsys):
  """Importing the scripts and the package leaves tinygrad's lowering as it is (a new process imports them all); the
  hook is installed only by install(), and where tinygrad has no hook point install() says so in one line and
  returns False, and nothing is pinned."""
  import os, subprocess, sys
  probe = ("from tinygrad.engine import realize; f = realize.lower_and_compile; import model, diffusion, train, sample; "
           "from harness import bench, cli, devices, display, kernels, quality, rundir, speed; "
           "print(realize.lower_and_compile is f and kernels._original is None)")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == "True", out.stderr[-800:]
  monkeypatch.setattr(kernels, "_original", None)
  monkeypatch.delattr(kernels.realize, "_get_call_to_compile")
  assert kernels.install() is False and kernels.pin([{"key": "0" * 64, "opts": []}]) is False
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "no engine.realize.lower_and_compile to hook" in err  # said once

def test_shipped_schedules_pin_for_the_gpu_preset_and_one_that_no_longer_fits_is_dropped_with_a_line(monkeypatch, tmp_path,
                                                                                                     capsys):
  """Shipped schedules (ARCH.json) are pinned for the default GPU preset only; one that no longer fits its kernel is
  not an error for the user: that kernel compiles as tinygrad would, and a line says so."""
  from tinygrad import Device
  monkeypatch.setattr(kernels, "pinned", {})
  monkeypatch.setattr(kernels, "lenient", set())
  out, want = matmul("CPU", 88)
  key, _ = compiled_kernel(out)
  (tmp_path / f"{Device['CPU'].renderer.target.arch}.json").write_text(
    '[{"key": "%s", "name": "matmul", "opts": [["UPCAST", 0, 7]]}]' % key)  # 7 does not divide the kernel's axes
  assert kernels.pin_shipped("small", "CPU", str(tmp_path)) is None and kernels.pinned == {}  # not the GPU preset
  assert "1 kernel schedules searched for this step" in kernels.pin_shipped("base", "CPU", str(tmp_path))
  out, _ = matmul("CPU", 88)  # compiles, without the schedule that no longer fits
  np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
  assert "no longer fit their kernels" in capsys.readouterr().err and key not in kernels.pinned
