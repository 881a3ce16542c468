"""Text in, token streams out: the GPT-2 tokenizer, dataset preparation, compact vocabularies and batches."""

class DataError(Exception):
  """Bad or missing data; the message is one line that says what to do, so drivers can print it and exit."""
