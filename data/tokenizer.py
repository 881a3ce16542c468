"""GPT-2 BPE built from the bundled ranks file: tiktoken would otherwise download it at first use."""
import base64, functools, hashlib, os
import tiktoken
from data import DataError

EOT = 50256
RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2.tiktoken")
SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

def encoding(path=RANKS):
  """The encoding from a ranks file, checked against its known hash so a damaged file never yields wrong ids."""
  try: raw = open(path, "rb").read()
  except OSError: raise DataError(f"{path} is missing: restore it with `git checkout data/gpt2.tiktoken`") from None
  if hashlib.sha256(raw).hexdigest() != SHA256:
    raise DataError(f"{path} is corrupt (sha256 mismatch): restore it with `git checkout data/gpt2.tiktoken`")
  ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}
  return tiktoken.Encoding(name="gpt2", pat_str=SPLIT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT})

@functools.cache
def gpt2():
  """The shared encoding; building it takes ~0.2 s, so build it once per process."""
  return encoding(RANKS)
