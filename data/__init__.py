"""Text in, token streams out: the GPT-2 tokenizer, dataset preparation, compact vocabularies and batches."""
import errno

class DataError(Exception):
  """Bad or missing data; the message is one line that says what to do, so drivers can print it and exit."""

def explain(e:OSError) -> str:
  """What an OSError from writing a file means for the user, and what to do, in a few words."""
  what = {errno.ENOSPC: "no space left on the device: free some space", errno.EDQUOT: "over the disk quota: free some",
          errno.EROFS: "the file system is read-only: choose a place you can write to",
          errno.EACCES: "permission denied: choose a place you can write to",
          errno.EPERM: "permission denied: choose a place you can write to",
          errno.ENOENT: "a directory on the way does not exist (or is a dangling link): create it first",
          errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
          errno.EISDIR: "it is a directory: name a file",
          errno.EEXIST: "a file (or a broken link) is in the way: choose another path",
          errno.ENOMEM: "out of memory: close other programs, or use a smaller --batch-size"}
  return what.get(e.errno, f"{e.strerror or e}: check the path and the disk")
