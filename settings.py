"""The presets (every setting a named size chooses, in one table) and the flag types and size flags that the drivers
share. A flag left out is None until the driver fills it: from the run being resumed, the preset, or the default."""
import argparse, math

PRESETS = {  # network, batch and training recipe; each key is also a flag of train.py (bench.py uses the first seven)
  "tiny":  dict(dim=32, n_layers=2, n_heads=2, seq_len=32, vocab_size=512, batch_size=8, dtype="float32",  # tests
                steps=40, lr=3e-3, warmup=5, eval_every=20, eval_windows=16, eval_len=32, eval_draws=2, final_draws=4, ema=0.0),
  "small": dict(dim=128, n_layers=4, n_heads=4, seq_len=256, vocab_size=8192, batch_size=8, dtype="float32",  # a CPU
                steps=3000, lr=1e-3, warmup=100, eval_every=500, eval_windows=128, eval_len=128, eval_draws=8, final_draws=32,
                ema=0.999),
  "base":  dict(dim=512, n_layers=8, n_heads=8, seq_len=256, vocab_size=8192, batch_size=64, dtype="bfloat16",  # a GPU
                steps=20000, lr=6e-4, warmup=500, eval_every=1000, eval_windows=256, eval_len=256, eval_draws=8, final_draws=32,
                ema=0.9999),
}

def by_preset(key:str) -> str:
  """What --help says of a preset's setting: 'small: 3000, tiny: 40, base: 20000'."""
  return "default " + ", ".join(f"{p}: {v[key]}" for p, v in sorted(PRESETS.items(), key=lambda kv: kv[0] != "small"))

def number(kind=float, low:float=-math.inf, high:float=math.inf, low_open:bool=False, high_open:bool=False):
  """An argparse type: a finite number of `kind` in [low, high] (open where said); anything else is a usage error."""
  def parse(s:str):
    try: v = kind(s)
    except ValueError: raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {s!r}") from None
    if not math.isfinite(v) or v < low or v > high or (low_open and v == low) or (high_open and v == high):
      lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
      raise argparse.ArgumentTypeError(f"must be a finite number in {lo}, {hi}, got {s}")
    return v
  return parse

def positive(kind=int): return number(kind, 0, low_open=True)
fraction = number(float, 0, 1, high_open=True)

def add_size_flags(p:argparse.ArgumentParser):
  """The flags that override a preset's network and batch; left out, they stay None for the preset to fill."""
  p.add_argument("--preset", choices=PRESETS, help="default: small on a CPU, base on a GPU")
  for key in ("dim", "n_layers", "n_heads", "seq_len", "batch_size"):
    p.add_argument("--" + key.replace("_", "-"), type=positive(), help=by_preset(key))
  p.add_argument("--vocab-size", type=number(int, 0), help="keep the K most frequent training tokens (+ <unk>); 0: all "
                 f"of GPT-2; {by_preset('vocab_size')}")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype; weights and optimizer stay "
                 f"float32; {by_preset('dtype')} (the next one down where the device lacks it)")
  p.add_argument("--no-time-cond", dest="time_cond", action="store_false", default=None,
                 help="the denoiser ignores t (enables the cached sampler)")
  p.add_argument("--devices", type=positive(), help="train data-parallel on N devices of the backend (default: all; 2 on a CPU)")

def fill(args, *sources:dict) -> argparse.Namespace:
  """Each setting still None takes its value from the first of `sources` that has one."""
  for source in sources:
    for k, v in source.items():
      if getattr(args, k, None) is None: setattr(args, k, v)
  return args

def check_size(args):
  if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
    raise ValueError(f"--dim {args.dim} must be a multiple of --n-heads {args.n_heads}, with an even head size")
  if getattr(args, "eval_len", None) and args.eval_len > args.seq_len:
    raise ValueError(f"--eval-len {args.eval_len} is longer than the context (--seq-len {args.seq_len})")
  if getattr(args, "devices", None) and args.batch_size % args.devices:
    raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}")
  return args
