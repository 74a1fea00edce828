"""Training data for recovery: files, Hugging Face datasets and batch iterables -> dict batches.

Sources (``load_data`` picks by type and file suffix):
    .tsv            GLUE style, a header line and a label column      -> classification batches
    .jsonl / .json  one JSON object a line ({"text": ..., "label": ...}) -> classification or LM batches
    .txt / other    plain text, tokenised and packed into fixed-length blocks  -> causal-LM batches
    datasets.Dataset (anything with ``column_names`` and indexing): rows as in JSONL
    an iterable of dict batches (a DataLoader, a list): used as given

Every batch is a dict of tensors: ``input_ids`` (B, N), ``attention_mask`` (B, N), ``token_type_ids``
(B, N) when the tokenizer makes them, and ``labels``: (B,) class ids or (B, N) token ids for LMs.
Indexed sources are deterministic and resumable: batch ``k`` is a pure function of (seed, k), so a
run that resumes at data position ``k`` sees exactly the batches an uninterrupted run would.

Bad rows (wrong field count, non-integer label, empty text, invalid JSON, undecodable bytes) are
counted in a :class:`RowReport`, logged, and skipped (``on_bad="skip"``) or raised as a
:class:`DataError` naming the file and line (``on_bad="raise"``). Never silently.
"""

from .batches import Batches, StreamBatches, classification_collate, lm_collate, load_data, tokenize_examples
from .readers import ON_BAD, RowReport, default_data_dir, pack_text, read_jsonl, read_tsv

__all__ = ["ON_BAD", "Batches", "RowReport", "StreamBatches", "classification_collate", "default_data_dir",
           "lm_collate", "load_data", "pack_text", "read_jsonl", "read_tsv", "tokenize_examples"]
