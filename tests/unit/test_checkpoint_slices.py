"""Resume reads only each rank's piece (pretrain.checkpoint._ShardedReader.local).

Oracle: the whole tensor assembled from every saved part and then cut for the rank (what the
loader did before), at every save/load tp pair of 1, 2 and 4, with a vocabulary padded to the
layout (rows beyond the real vocabulary are zeros). Bytes are counted by our reader: a rank
reads exactly the bytes of its own piece, 1/tp of each split tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pretrain.checkpoint import _local_part, _ShardedReader

VOCAB, HIDDEN, FFN = 131, 8, 12  # an odd vocabulary, padded to a multiple of tp


def _padded(rows: int, tp: int) -> int:
    return -(-rows // tp) * tp


def _whole_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "word": torch.randn(VOCAB, HIDDEN, generator=g),  # split on dim 0, padded
        "mlp_in": torch.randn(FFN, HIDDEN, generator=g),  # column-parallel: dim 0
        "mlp_out": torch.randn(HIDDEN, FFN, generator=g),  # row-parallel: dim 1
        "norm": torch.randn(HIDDEN, generator=g),  # not split
    }


SPLITS = {"word": 0, "mlp_in": 0, "mlp_out": 1}


def _save(directory, tp: int) -> None:
    """A checkpoint laid out as tp ranks write it: each rank its piece, the vocabulary padded."""
    directory.mkdir()
    whole = _whole_tensors()
    for rank in range(tp):
        tensors = {}
        for name, tensor in whole.items():
            if name in SPLITS:
                dim = SPLITS[name]
                padded = _padded(tensor.shape[dim], tp)
                like = torch.empty_like(tensor.narrow(dim, 0, padded // tp))
                tensor = _local_part(tensor, like, {"dim": dim, "tp": tp}, rank)
            tensors[name] = tensor.contiguous()
        save_file(tensors, str(directory / f"model_tp{rank:02d}.safetensors"))
    sharding = {n: {"dim": d, "size": whole[n].shape[d]} for n, d in SPLITS.items()}
    state = {"sharding": sharding, "layout": {"tp": tp}}
    (directory / "train_state.json").write_text(json.dumps(state))


def _reader(directory) -> _ShardedReader:
    return _ShardedReader(directory, lambda r: [f"model_tp{r:02d}.safetensors"])


@pytest.mark.parametrize("saved_tp", [1, 2, 4])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_local_pieces_equal_the_cut_whole_and_read_only_their_bytes(tmp_path, saved_tp, tp):
    _save(tmp_path / "ckpt", saved_tp)
    whole = _whole_tensors()
    total = sum(t.numel() * 4 for t in whole.values())  # what the old loader read per rank
    for rank in range(tp):
        reader = _reader(tmp_path / "ckpt")
        own = 0
        for name, tensor in whole.items():
            split = {"dim": SPLITS[name], "tp": tp} if name in SPLITS else None
            like, real = tensor, tensor.numel()
            if split is not None:
                dim = split["dim"]
                local = _padded(tensor.shape[dim], tp) // tp
                like = tensor.narrow(dim, 0, local)
                rows = max(0, min((rank + 1) * local, tensor.shape[dim]) - rank * local)
                real = rows * tensor.numel() // tensor.shape[dim]  # its unpadded elements
            expected = _local_part(_reader(tmp_path / "ckpt").whole(name, name), like, split, rank)
            piece = reader.local(name, name, like, split, rank)
            torch.testing.assert_close(piece, expected, rtol=0, atol=0)
            assert reader.bytes_read - own == real * 4, (name, saved_tp, tp, rank)
            own = reader.bytes_read
        assert own < total if tp > 1 else own == total
