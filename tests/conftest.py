"""Shared fixtures: a small prepared English dataset made with the real data_prep code."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch

from data_prep.encode import encode_corpus
from data_prep.sources import CORPUS_DIR
from data_prep.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """2 cores per machine: keep each test process to one thread so parallel workers fit."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory) -> None:
    """The CPU's measured peak (pretrain.devices) is cached under a temporary directory, not
    the user's ~/.cache; subprocesses inherit it."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~150 KB of the built-in Gutenberg excerpt, as a .txt.gz input file."""
    tmp = tmp_path_factory.mktemp("corpus")
    text = gzip.decompress((CORPUS_DIR / "gutenberg_excerpt.txt.gz").read_bytes())
    path = tmp / "small.txt.gz"
    path.write_bytes(gzip.compress(text[:150_000]))
    return path


@pytest.fixture(scope="session")
def small_dataset(small_corpus: Path, tmp_path_factory) -> Path:
    """A WordPiece tokenizer (vocab 1000) and indexed shards of `small_corpus`."""
    tmp = tmp_path_factory.mktemp("prepared")
    train_tokenizer([small_corpus], tmp / "tokenizer", "wordpiece", 1000, lang="en")
    encode_corpus([small_corpus], tmp / "tokenizer", tmp / "data", lang="en")
    return tmp / "data"
