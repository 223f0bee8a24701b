"""moejax data: tokenizers, document sources and the grain pipeline (re-exports only).

Start-up (before any training work)::

    tok = tokenizer_for_run(cfg.data, workdir)         # model.vocab_size >= tok.vocab_size
    save_tokenizer(tok, workdir)  # 'bpe:N': trained on the train split, cached for resume
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
from moejax.data.bpe import TOKENIZER_FILE, save_tokenizer, tokenizer_for_run
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
    token_bytes,
    unigram_bits_per_byte,
)

__all__ = [
    "ArrayRecordSource", "ByteTokenizer", "DataSummary", "FileDocuments", "GlobalBatchIterator",
    "HFTokenizer", "JsonlSource", "ParquetSource", "Tokenizer", "TOKENIZER_FILE",
    "builtin_source", "check_enough_data", "decoded_num_bytes", "describe",
    "iterator_checkpoint_args", "make_eval_iterator", "make_source", "make_tokenizer",
    "make_train_iterator", "save_tokenizer", "stdlib_files", "text_source", "token_bytes",
    "tokenizer_for_run", "unigram_bits_per_byte",
]
