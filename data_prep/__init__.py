"""Corpus preparation for BERT pre-training: raw text → tokenizer → indexed token shards.

Run it as `bert-prep` (or `python -m data_prep`); the trainer only imports
`data_prep.shard_format` to read what this package wrote.
"""
