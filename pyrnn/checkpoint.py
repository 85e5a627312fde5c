"""Checkpoint files (docs/formats.md), read and written with numpy; the C trainer reads the same bytes."""
import os
import zlib

import numpy as np

from . import oracle

CKPT_MAGIC, CKPT_VERSION = 20261102, 1
PRECISIONS = ('fp32', 'bf16')   # header word 13


def read_checkpoint(path):
    """Returns a dict: config (cell, V, E, H, L), B, T, step, carry, adam_t, dropout, precision, vocab, params (state
    dict), m, v (flat), data_pos, h, c, rng. Raises ValueError naming what is wrong."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 256 + 256 + 4:
        raise ValueError(f"{path}: truncated checkpoint ({len(data)} bytes)")
    header = np.frombuffer(data, dtype=np.int32, count=64)
    if header[0] != CKPT_MAGIC:
        raise ValueError(f"{path}: not a pyrnn checkpoint (bad magic)")
    if header[1] != CKPT_VERSION:
        raise ValueError(f"{path}: checkpoint version {header[1]}, this build reads {CKPT_VERSION}")
    stored = int(np.frombuffer(data, dtype=np.uint32, offset=len(data) - 4)[0])
    if zlib.crc32(data[:-4]) != stored:
        raise ValueError(f"{path}: checksum mismatch (corrupted or truncated checkpoint)")
    cell, V, E, H, L, B, T, step, carry, adam_t = (int(x) for x in header[2:12])
    # rates as the shortest decimal: 0.2 reads back as 0.2
    dropout, weight_drop, embed_dropout = (float(str(header[w:w + 1].view(np.float32)[0])) for w in (12, 15, 16))
    if not 0 <= cell < len(oracle.CELLS) or min(V, E, H, L) <= 0 or V > 256 or min(B, T, step, adam_t) < 0 \
            or not all(0.0 <= r < 1.0 for r in (dropout, weight_drop, embed_dropout)) or header[13] not in (0, 1) \
            or header[14] not in (0, 1) or header[17] < 0:
        raise ValueError(f"{path}: bad header")
    cell = oracle.CELLS[cell]
    lstm = cell == "lstm"
    shapes = oracle.lm_param_shapes(cell, V, E, H, L)
    P = oracle.num_params(shapes)
    lbh = L * B * H
    n_states = 2 if lstm else 1
    expected = 256 + 256 + 3 * P * 4 + 8 + n_states * lbh * 4 + 8 + 4
    if len(data) != expected:
        raise ValueError(f"{path}: size {len(data)} does not match its header (expected {expected})")
    off = 512
    def take(count, dtype=np.float32):
        nonlocal off
        a = np.frombuffer(data, dtype=dtype, count=count, offset=off).copy()
        off += a.nbytes
        return a
    flat, m, v = take(P), take(P), take(P)
    data_pos = int(take(1, np.int64)[0])
    h = take(lbh).reshape(L, B, H)
    c = take(lbh).reshape(L, B, H) if lstm else None
    rng = int(take(1, np.uint64)[0])
    return dict(cell=cell, vocab_size=V, embed_size=E, hidden_size=H, num_layers=L, B=B, T=T,
                step=step, carry=carry, adam_t=adam_t, dropout=dropout, vocab=bytes(data[256:256 + V]),
                precision=PRECISIONS[int(header[13])], locked_dropout=bool(header[14]), weight_drop=weight_drop,
                embed_dropout=embed_dropout, planned_steps=int(header[17]),
                params=oracle.unflatten(flat, shapes), m=m, v=v, data_pos=data_pos, h=h, c=c, rng=rng)


def write_checkpoint(path, cell, params, vocab, m=None, v=None, step=0, adam_t=0, B=0, T=0, carry=1,
                     data_pos=0, h=None, c=None, rng=1, dropout=0.0, precision='fp32', locked_dropout=False,
                     weight_drop=0.0, embed_dropout=0.0, planned_steps=0):
    """Writes atomically (temp file, fsync, rename). params: LM state dict in torch order. Word 12 of
    the header holds the dropout rate as a float32 (0 in files that predate it), word 13 the precision
    trained with (0 fp32, 1 bf16; the tensors are float32 either way), 14 locked dropout (0/1), 15 and 16
    the weight-drop and embedding-dropout rates as float32, 17 the step count a -x budget fixed."""
    cell_id = oracle.cell_id(cell)
    V, E = params["embedding.weight"].shape
    H = params["head.weight"].shape[1]
    L = sum(1 for k in params if k.startswith("rnn.weight_ih_l"))
    flat = oracle.flatten({k: np.asarray(x, dtype=np.float32) for k, x in params.items()}).astype(np.float32)
    zeros = np.zeros_like(flat)
    header = np.zeros(64, dtype=np.int32)
    header[:12] = [CKPT_MAGIC, CKPT_VERSION, cell_id, V, E, H, L, B, T, step, carry, adam_t]
    header[12:13].view(np.float32)[0] = dropout
    header[13] = PRECISIONS.index(precision)
    header[14] = int(locked_dropout)
    header[15:16].view(np.float32)[0] = weight_drop
    header[16:17].view(np.float32)[0] = embed_dropout
    header[17] = planned_steps
    vocab_block = bytearray(256)
    vocab_block[:len(vocab)] = vocab
    lbh = (L, B, H)
    parts = [header.tobytes(), bytes(vocab_block), flat.tobytes(),
             (zeros if m is None else np.asarray(m, np.float32)).tobytes(),
             (zeros if v is None else np.asarray(v, np.float32)).tobytes(),
             np.int64(data_pos).tobytes(),
             (np.zeros(lbh, np.float32) if h is None else np.asarray(h, np.float32)).tobytes()]
    if oracle._cell_name(cell) == "lstm":
        parts.append((np.zeros(lbh, np.float32) if c is None else np.asarray(c, np.float32)).tobytes())
    parts.append(np.uint64(rng).tobytes())
    body = b"".join(parts)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(body)
        f.write(np.uint32(zlib.crc32(body)).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
