"""moejax data: tokenizers, document sources and the grain pipeline (re-exports only).

Start-up (before any training work)::

    tok = make_tokenizer(cfg.data.tokenizer)           # model.vocab_size >= tok.vocab_size
    summary = check_enough_data(cfg.data, tok, cfg.train.seq_len, cfg.train.batch_size,
                                jax.process_count())    # raises ValueError naming the fix
    train_it = make_train_iterator(cfg.data, tok, cfg.train.seq_len, cfg.train.batch_size,
                                   rows=rows)  # this process's rows of the global batch
    batch = next(train_it)  # {"tokens", "segment_ids", "positions"}: int32 [len(rows), L]

The global batch at a step is the same whatever the number of processes (see
moejax/data/streams.py); `rows` comes from the batch sharding
(`moejax.distributed.process_rows`). Checkpointing the train iterator with Orbax::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=iterator_checkpoint_args(train_it, restore=False)))  # every stream's state
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=iterator_checkpoint_args(train_it, restore=True)))
    train_it.set_state(restored["data"])  # on any number of processes
    # train_it now continues with exactly the batches the saved run would have seen.

Evaluation: `make_eval_iterator(...)` is one deterministic pass; build a fresh one per
evaluation and take at most `summary.validation_batches` batches (the same on every host).
"""
from moejax.data.pipeline import (
    DataSummary,
    check_enough_data,
    iterator_checkpoint_args,
    make_eval_iterator,
    make_train_iterator,
)
from moejax.data.corpus import describe, make_source
from moejax.data.parquet import ParquetSource
from moejax.data.sources import (
    ArrayRecordSource,
    FileDocuments,
    JsonlSource,
    builtin_source,
    stdlib_files,
    text_source,
)
from moejax.data.streams import GlobalBatchIterator
from moejax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    decoded_num_bytes,
    make_tokenizer,
    unigram_bits_per_byte,
)

__all__ = [
    "ArrayRecordSource", "ByteTokenizer", "DataSummary", "FileDocuments", "GlobalBatchIterator",
    "HFTokenizer", "JsonlSource", "ParquetSource", "Tokenizer", "builtin_source",
    "check_enough_data", "decoded_num_bytes", "describe", "iterator_checkpoint_args", "make_eval_iterator", "make_source",
    "make_tokenizer", "make_train_iterator", "stdlib_files", "text_source",
    "unigram_bits_per_byte",
]
