"""Data preparation: text -> byte-level token files (format in docs/formats.md)."""
import hashlib
import os
import urllib.request

import numpy as np

TOKENS_MAGIC, TOKENS_VERSION, HEADER_BYTES = 20261101, 1, 1024
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def build_vocab(text: bytes) -> bytes:
    """The sorted set of distinct bytes: token id i is byte vocab[i]."""
    return bytes(sorted(set(text)))


def encode(text: bytes, vocab: bytes) -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int16)
    lut[np.frombuffer(vocab, dtype=np.uint8)] = np.arange(len(vocab))
    ids = lut[np.frombuffer(text, dtype=np.uint8)]
    if (ids < 0).any():
        bad = bytes([text[int(np.argmax(ids < 0))]])
        raise ValueError(f"byte {bad!r} is not in the vocabulary")
    return ids.astype(np.uint8)


def decode(ids, vocab: bytes) -> str:
    return bytes(vocab[int(i)] for i in ids).decode("utf-8", errors="replace")


class Vocab:
    """Text <-> token ids at the byte level: token id i is the byte symbols[i]. The vocabulary of
    token files and checkpoints (docs/formats.md), so a model trained on ids keeps its text.

        vocab = pyrnn.Vocab.from_text(text)     # the sorted distinct bytes of text (str or bytes)
        ids = vocab.encode("ROMEO:")            # int32 array; ValueError for bytes not in vocab
        vocab.decode(ids) == "ROMEO:"
    """

    def __init__(self, symbols):
        if isinstance(symbols, Vocab):
            symbols = symbols.symbols
        if isinstance(symbols, str):
            raise TypeError("Vocab takes the symbols as bytes; for a text use Vocab.from_text(text)")
        symbols = bytes(symbols)
        if not 1 <= len(symbols) <= 256:
            raise ValueError(f"a vocabulary holds 1..256 byte symbols, got {len(symbols)}")
        if len(set(symbols)) != len(symbols):
            dup = next(bytes([b]) for b in symbols if symbols.count(b) > 1)
            raise ValueError(f"vocabulary symbols must be distinct, {dup!r} repeats")
        self.symbols = symbols

    @classmethod
    def from_text(cls, text):
        return cls(build_vocab(text.encode("utf-8") if isinstance(text, str) else bytes(text)))

    def encode(self, text) -> np.ndarray:
        """Token ids (int32) of a str (as UTF-8) or bytes."""
        return encode(text.encode("utf-8") if isinstance(text, str) else bytes(text), self.symbols).astype(np.int32)

    def decode(self, ids) -> str:
        return decode(np.asarray(ids).ravel(), self.symbols)

    def __len__(self):
        return len(self.symbols)

    def __eq__(self, other):
        return isinstance(other, Vocab) and other.symbols == self.symbols

    def __repr__(self):
        return f"Vocab({self.symbols!r})"


def write_tokens(path, ids: np.ndarray, vocab: bytes):
    if not 1 <= len(vocab) <= 256:
        raise ValueError(f"vocabulary size must be 1..256, got {len(vocab)}")
    header = bytearray(HEADER_BYTES)
    np.frombuffer(header, dtype=np.int32)[:4] = [TOKENS_MAGIC, TOKENS_VERSION, len(vocab), 0]
    np.frombuffer(header, dtype=np.int64)[2] = len(ids)
    header[24:24 + len(vocab)] = vocab
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(np.ascontiguousarray(ids, dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_tokens(path):
    """Returns (ids uint8 array, vocab bytes); raises ValueError naming what is wrong."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < HEADER_BYTES:
        raise ValueError(f"{path}: truncated token file ({len(data)} bytes, header needs {HEADER_BYTES})")
    magic, version, vocab_size = np.frombuffer(data, dtype=np.int32, count=3)
    n = int(np.frombuffer(data, dtype=np.int64, count=1, offset=16)[0])
    if magic != TOKENS_MAGIC:
        raise ValueError(f"{path}: not a pyrnn token file (bad magic)")
    if version != TOKENS_VERSION:
        raise ValueError(f"{path}: token file version {version}, this build reads {TOKENS_VERSION}")
    if not 1 <= vocab_size <= 256:
        raise ValueError(f"{path}: vocabulary size {vocab_size} is outside 1..256")
    if n != len(data) - HEADER_BYTES:
        raise ValueError(f"{path}: header says {n} tokens but the file holds {len(data) - HEADER_BYTES}")
    ids = np.frombuffer(data, dtype=np.uint8, offset=HEADER_BYTES)
    if n and ids.max() >= vocab_size:
        raise ValueError(f"{path}: token {int(ids.max())} is outside the vocabulary [0, {vocab_size})")
    return ids, bytes(data[24:24 + vocab_size])


def fetch_tinyshakespeare(input_path=None):
    """The corpus bytes, from input_path, $PYRNN_TINYSHAKESPEARE or a download; the sha256 must match."""
    path = input_path or os.environ.get("PYRNN_TINYSHAKESPEARE")
    if path:
        with open(path, "rb") as f:
            text = f.read()
        source = path
    else:
        try:
            with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=30) as r:
                text = r.read()
        except OSError as e:
            raise RuntimeError(
                f"cannot download tiny-shakespeare ({e}); download input.txt from {TINYSHAKESPEARE_URL} "
                "yourself and pass it with --input FILE or PYRNN_TINYSHAKESPEARE=FILE") from None
        source = TINYSHAKESPEARE_URL
    digest = hashlib.sha256(text).hexdigest()
    if digest != TINYSHAKESPEARE_SHA256:
        raise RuntimeError(f"{source}: sha256 {digest} is not tiny-shakespeare's {TINYSHAKESPEARE_SHA256}")
    return text


def prepare(text: bytes, out_dir, val_frac=0.1):
    """Writes out_dir/train.bin and out_dir/val.bin (the last val_frac of the text); returns the vocab."""
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"val_frac must be in [0, 1), got {val_frac}")
    if not text:
        raise ValueError("the text is empty")
    vocab = build_vocab(text)
    ids = encode(text, vocab)
    n_val = int(len(ids) * val_frac)
    os.makedirs(out_dir, exist_ok=True)
    write_tokens(os.path.join(out_dir, "train.bin"), ids[:len(ids) - n_val], vocab)
    write_tokens(os.path.join(out_dir, "val.bin"), ids[len(ids) - n_val:], vocab)
    return vocab
