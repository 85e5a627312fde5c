"""PyTorch interop: the torch module equivalent to CharLM, and weights in both directions."""
import numpy as np


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("PyTorch interop needs torch: pip install torch") from None
    return torch


def torch_char_lm(cell, vocab_size, embed_size, hidden_size, num_layers=1, dropout=0.0):
    """Embedding(V, E) -> nn.RNN / LSTM / GRU (batch_first) -> Linear(H, V), named like CharLM's state dict."""
    torch = _torch()
    nn = torch.nn
    rnn_kw = dict(input_size=embed_size, hidden_size=hidden_size, num_layers=num_layers, batch_first=True,
                  dropout=dropout if num_layers > 1 else 0.0)
    if cell in ("rnn", "rnn_relu"):
        rnn = nn.RNN(nonlinearity="relu" if cell == "rnn_relu" else "tanh", **rnn_kw)
    elif cell == "lstm":
        rnn = nn.LSTM(**rnn_kw)
    elif cell == "gru":
        rnn = nn.GRU(**rnn_kw)
    else:
        raise ValueError(f"unknown cell {cell!r} (expected rnn, rnn_relu, lstm or gru)")

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell
            self.embedding = nn.Embedding(vocab_size, embed_size)
            self.rnn = rnn
            self.drop = nn.Dropout(dropout)
            self.head = nn.Linear(hidden_size, vocab_size)

        def forward(self, inputs, hx=None):
            """inputs (B, T) long -> logits (B, T, V), final state."""
            out, state = self.rnn(self.embedding(inputs), hx)
            return self.head(self.drop(out)), state

    return CharLM()


def to_torch(model):
    """An equivalent torch.nn.Module carrying a copy of a pyrnn.CharLM's weights."""
    torch = _torch()
    m = torch_char_lm(model.cell, model.vocab_size, model.embed_size, model.hidden_size, model.num_layers)
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return m


def from_torch(module, backend="c"):
    """A pyrnn.CharLM with the weights of a torch module shaped like torch_char_lm's (embedding, rnn, head)."""
    from .nn import CharLM
    rnn = module.rnn
    mode = type(rnn).__name__
    cell = {"LSTM": "lstm", "GRU": "gru"}.get(mode) or ("rnn_relu" if rnn.nonlinearity == "relu" else "rnn")
    if rnn.batch_first is False or rnn.bidirectional or not rnn.bias or getattr(rnn, "proj_size", 0):
        raise ValueError("from_torch takes a unidirectional, biased, batch_first RNN without projections")
    V, E = module.embedding.weight.shape
    model = CharLM(cell, V, E, rnn.hidden_size, rnn.num_layers, backend=backend)
    model.load_state_dict({k: v.detach().cpu().numpy() for k, v in module.state_dict().items()})
    return model
