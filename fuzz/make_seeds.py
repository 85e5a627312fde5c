"""Writes the seed corpora in fuzz/corpus/<target>/: small valid files of each format, made with
pyrnn.data / pyrnn.checkpoint / pyrnn.reference at tiny sizes, plus a few truncated and damaged
copies. Deterministic, so re-running it rewrites the same bytes.

    python3 fuzz/make_seeds.py            (from the repository root)
"""
import os
import sys
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pyrnn import data, oracle  # noqa: E402
from pyrnn.checkpoint import write_checkpoint  # noqa: E402
from pyrnn.reference import write_reference  # noqa: E402

CORPUS = os.path.join(ROOT, 'fuzz', 'corpus')


def damaged(path, raw):
    """A few broken copies: truncated at several points, one flipped byte, trailing bytes."""
    base, _ = os.path.splitext(path)
    for frac in (0.0, 0.25, 0.5):
        cut = int(len(raw) * frac)
        with open(f'{base}.trunc{cut}', 'wb') as f:
            f.write(raw[:cut])
    with open(f'{base}.trunc-1', 'wb') as f:
        f.write(raw[:-1])
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x40
    with open(f'{base}.flip', 'wb') as f:
        f.write(bytes(flipped))
    with open(f'{base}.trail', 'wb') as f:
        f.write(raw + b'\0' * 4)


def tokens(d):
    texts = {'abc': b'abcabcab', 'one': b'a', 'empty-tokens': None, 'bytes': bytes(range(256)),
             'text': b'First Citizen:\nBefore we proceed any further, hear me speak.\n'}
    for name, text in texts.items():
        path = os.path.join(d, f'{name}.bin')
        if text is None:
            data.write_tokens(path, np.zeros(0, np.uint8), b'xy')
        else:
            vocab = data.build_vocab(text)
            data.write_tokens(path, data.encode(text, vocab), vocab)
    raw = open(os.path.join(d, 'abc.bin'), 'rb').read()
    damaged(os.path.join(d, 'abc.bin'), raw)


def checkpoints(d):
    rng = np.random.default_rng(0)
    vocab = b'abc'
    for cell, L, B, T in (('rnn', 1, 0, 0), ('lstm', 2, 2, 3), ('gru', 1, 1, 2), ('rnn_relu', 1, 2, 1)):
        params = {k: rng.normal(0, 0.1, s).astype(np.float32)
                  for k, s in oracle.lm_param_shapes(cell, len(vocab), 2, 3, L).items()}
        P = sum(p.size for p in params.values())
        path = os.path.join(d, f'{cell}.bin')
        write_checkpoint(path, cell, params, vocab, m=np.full(P, 0.01, np.float32), v=np.full(P, 1e-4, np.float32),
                         step=5, adam_t=5, B=B, T=T, carry=1, data_pos=3,
                         h=rng.normal(0, 1, (L, B, 3)).astype(np.float32) if B else None,
                         c=rng.normal(0, 1, (L, B, 3)).astype(np.float32) if B and cell == 'lstm' else None, rng=7)
    raw = open(os.path.join(d, 'lstm.bin'), 'rb').read()
    damaged(os.path.join(d, 'lstm.bin'), raw)
    # sizes whose product overflows the sanity bound (L * B * H > 2^40), with a valid CRC
    huge = bytearray(raw)
    np.frombuffer(huge, np.int32, 64)[[5, 7]] = [65536, 0x7FFFFFFF]
    huge[-4:] = np.uint32(zlib.crc32(bytes(huge[:-4]))).tobytes()
    with open(os.path.join(d, 'lstm.huge'), 'wb') as f:
        f.write(bytes(huge))
    # what a `latest` file holds (the fuzz target also resolves every input as one)
    for name, body in (('latest-ok', b'ckpt_00000060.bin\n'), ('latest-crlf', b'ckpt_00000001.bin\r\n'),
                       ('latest-slash', b'../ckpt.bin\n'), ('latest-empty', b'')):
        with open(os.path.join(d, name), 'wb') as f:
            f.write(body)


def references(d):
    for i, cell in enumerate(oracle.CELLS):
        path = os.path.join(d, f'{cell}.bin')
        write_reference(path, cell, V=3, E=2, H=2, L=1 + (cell == 'lstm'), B=1 + i % 2, T=2, steps=1, seed=i)
    raw = open(os.path.join(d, 'gru.bin'), 'rb').read()
    damaged(os.path.join(d, 'gru.bin'), raw)
    huge = bytearray(raw)   # B * T > 2^40
    np.frombuffer(huge, np.int32, 64)[[7, 8]] = [0x7FFFFFFF, 0x7FFFFFFF]
    with open(os.path.join(d, 'gru.huge'), 'wb') as f:
        f.write(bytes(huge))


def main():
    for target, fn in (('tokens', tokens), ('checkpoint', checkpoints), ('reference', references)):
        d = os.path.join(CORPUS, target)
        os.makedirs(d, exist_ok=True)
        fn(d)
        files = sorted(os.listdir(d))
        print(f'{d}: {len(files)} seeds, {sum(os.path.getsize(os.path.join(d, f)) for f in files)} bytes')


if __name__ == '__main__':
    main()
