import json

import numpy as np
import pytest
import torch

from kimi_k2.train.data import (
    IGNORE_INDEX,
    BatchOrder,
    expand_paths,
    load_pretrain,
    load_sft,
    pack_conversations,
    pack_stream,
    read_conversations,
    read_documents,
)


def test_pack_stream_separates_documents_with_eos_and_drops_the_tail():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    rows = pack_stream(docs, seq_len=3, eos_id=0)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0]
    assert rows.tokens.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    x, y = rows.inputs_and_labels(torch.tensor([1]))
    assert x.tolist() == [[4, 5, 0]] and y.tolist() == [[5, 0, 6]]


def test_pack_stream_too_short_is_an_error():
    with pytest.raises(ValueError, match="fewer than one row"):
        pack_stream([[1, 2]], seq_len=8, eos_id=0)


def test_pack_conversations_masks_non_assistant_tokens_and_never_splits():
    convs = [
        ([10, 11, 12, 13], [False, False, True, True]),
        ([20, 21, 22], [False, True, True]),
        ([30, 31, 32, 33, 34], [False, False, False, True, True]),
    ]
    rows, truncated = pack_conversations(convs, seq_len=7, pad_id=99)
    assert truncated == 0
    assert rows.tokens.tolist() == [[10, 11, 12, 13, 20, 21, 22, 99], [30, 31, 32, 33, 34, 99, 99, 99]]
    _, y = rows.inputs_and_labels(torch.tensor([0, 1]))
    I = IGNORE_INDEX
    # label at position t is token t+1 when token t+1 is an assistant token
    assert y.tolist() == [[I, 12, 13, I, 21, 22, I], [I, I, 33, 34, I, I, I]]


def test_pack_conversations_truncates_long_ones_and_counts_them():
    rows, truncated = pack_conversations([(list(range(10)), [True] * 10)], seq_len=3, pad_id=0)
    assert truncated == 1 and rows.tokens.tolist() == [[0, 1, 2, 3]]


def test_pack_conversations_rejects_mask_of_wrong_length():
    with pytest.raises(ValueError, match="mask"):
        pack_conversations([([1, 2, 3], [True])], seq_len=4, pad_id=0)


def test_split_is_seeded_and_disjoint():
    rows = pack_stream([list(range(1, 200))], seq_len=3, eos_id=0)
    tr, va = rows.split(0.2, seed=1)
    tr2, va2 = rows.split(0.2, seed=1)
    assert torch.equal(va.tokens, va2.tokens) and len(tr) + len(va) == len(rows) == 50 and len(va) == 10
    seen = {tuple(r) for r in tr.tokens.tolist()}
    assert not seen & {tuple(r) for r in va.tokens.tolist()}


def test_batch_order_covers_each_epoch_once_and_shards_ranks():
    order = BatchOrder(num_rows=12, micro_batch=2, grad_accum=3, world_size=1, seed=5)
    epoch0 = torch.cat([order.rows(s, m, 0) for s in range(2) for m in range(3)])
    assert sorted(epoch0.tolist()) == list(range(12))
    epoch1 = torch.cat([order.rows(s, m, 0) for s in range(2, 4) for m in range(3)])
    assert sorted(epoch1.tolist()) == list(range(12)) and not torch.equal(epoch0, epoch1)
    # 2 ranks x 1 accumulation sees the same global batch of 6 rows... split differently
    two = BatchOrder(num_rows=12, micro_batch=3, grad_accum=1, world_size=2, seed=5)
    one = BatchOrder(num_rows=12, micro_batch=3, grad_accum=2, world_size=1, seed=5)
    for step in range(3):
        assert torch.equal(torch.cat([two.rows(step, 0, r) for r in range(2)]),
                           torch.cat([one.rows(step, m, 0) for m in range(2)]))
    with pytest.raises(ValueError, match="rank"):
        two.rows(0, 0, 2)


def test_read_files_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert read_documents(expand_paths([tmp_path])) == ["hello", "x", "y"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"txt": 1}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_documents([tmp_path / "bad.jsonl"])
    with pytest.raises(ValueError, match="messages"):
        read_conversations([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_paths([tmp_path / "nope"])
    (tmp_path / "c.csv").write_text("1,2")
    with pytest.raises(ValueError, match="c.csv"):
        read_documents([tmp_path / "c.csv"])


def test_load_pretrain_from_npy(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(20, dtype=np.uint16))
    rows = load_pretrain([tmp_path / "t.npy"], seq_len=4, tokenizer=None)
    assert rows.tokens.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    (tmp_path / "d.txt").write_text("text")
    with pytest.raises(ValueError, match="tokenizer"):
        load_pretrain([tmp_path / "d.txt"], seq_len=4, tokenizer=None)


def test_text_pretraining_keeps_special_token_text_as_text(tmp_path, k2_tokenizer_dir):
    from kimi_k2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(k2_tokenizer_dir)
    (tmp_path / "a.txt").write_text("a document that mentions <|im_end|> in passing " * 3)
    (tmp_path / "b.txt").write_text("and a second document")
    rows = load_pretrain([tmp_path / "a.txt", tmp_path / "b.txt"], seq_len=4, tokenizer=tok)
    ids = rows.tokens.flatten().tolist()
    assert tok.im_end_id not in ids
    assert ids.count(tok.eos_id) >= 1  # the documents are separated
    assert tok.decode(ids).startswith("a document that mentions <|im_end|> in passing")


def test_sft_tokenized_in_worker_processes_equals_one_process(tmp_path, k2_tokenizer_dir):
    from kimi_k2.data.synth import train_episodes
    from kimi_k2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(k2_tokenizer_dir)
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(e.conversation()) + "\n" for e in train_episodes(0, 40)))
    one, t1 = load_sft([path], 256, tok)
    two, t2 = load_sft([path], 256, tok, workers=2, tokenizer_dir=str(k2_tokenizer_dir))
    assert t1 == t2
    assert torch.equal(one.tokens, two.tokens) and torch.equal(one.loss_mask, two.loss_mask)
