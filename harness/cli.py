"""Talking to the user, shared by the scripts: flag types that refuse nonsense at parse time, output that any terminal
can take, and Ctrl-C as one line."""
import argparse, math, signal, sys

def number(kind=float, low:float=-math.inf, high:float=math.inf, low_open:bool=False, high_open:bool=False):
  """An argparse type: a finite number of `kind` in [low, high] (open where said); anything else is a usage error."""
  def parse(s:str):
    try: v = kind(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {s!r}") from None
    if not math.isfinite(v) or v < low or v > high or (low_open and v == low) or (high_open and v == high):
      lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open or high == math.inf else "]")
      raise argparse.ArgumentTypeError(f"must be a finite number in {lo}, {hi}, got {s}")
    return v
  parse.__name__ = kind.__name__  # argparse names the type in its messages
  return parse

def positive(kind=int): return number(kind, 0, low_open=True)
fraction = number(float, 0, 1, high_open=True)

def check_sizes(args):
  """Settings that fit each flag alone but not each other: one-line ValueErrors."""
  if not args.causal and (args.eval_draws % 2 or args.final_draws % 2):
    raise ValueError("--eval-draws and --final-draws must be even (strata are paired for the standard error)")
  if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
    raise ValueError(f"--dim {args.dim} must be a multiple of --n-heads {args.n_heads}, with an even head size")
  if args.eval_len > args.seq_len:
    raise ValueError(f"--eval-len {args.eval_len} is longer than the context (--seq-len {args.seq_len})")
  if args.devices and args.batch_size % args.devices:
    raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}")
  return args

def plain_output():
  """Printing never raises: characters the terminal's encoding cannot show (a Windows console's cp1252, a log file
  opened as ASCII) are replaced, and a closed pipe (| head) ends the script quietly."""
  for stream in (sys.stdout, sys.stderr):
    if hasattr(stream, "reconfigure"): stream.reconfigure(errors="replace")
  if hasattr(signal, "SIGPIPE"): signal.signal(signal.SIGPIPE, signal.SIG_DFL)

def interrupted(what:str):
  """Exits as a Ctrl-C should (code 130) with one line that says what it stopped and what is on disk, the terminal
  left clean (colours off, cursor shown)."""
  if sys.stdout.isatty(): print("\x1b[0m\x1b[?25h", end="", flush=True)
  print(f"\ninterrupted: {what}", file=sys.stderr, flush=True)
  sys.exit(130)

def why(e:Exception) -> str:
  """An error's one line: its message, or for running out of memory what to do."""
  return "out of memory: use a smaller --batch-size (or --num-samples), or close other programs" \
    if isinstance(e, MemoryError) else str(e)

def stop_after_step(run:dict):
  """Ctrl-C, kill and timeout (SIGINT, SIGTERM) during a run: the first stops it after the step in progress, which
  then saves (run["stop"]); a second one, or any while nothing is unsaved (run["step"] == run["saved"]: setting up,
  compiling the first step), stops it at once (KeyboardInterrupt), losing only the steps since the last checkpoint."""
  def on_signal(*_):
    if run["stop"] or run["step"] == run["saved"]: raise KeyboardInterrupt
    run["stop"] = True
    print(f"\nstopping after step {run['step'] + 1}" + (" (still compiling its kernels)" if run["compiling"] else "")
          + ", then saving (Ctrl-C again: stop at once, without the steps since the last checkpoint)", flush=True)
  signal.signal(signal.SIGINT, on_signal); signal.signal(signal.SIGTERM, on_signal)
