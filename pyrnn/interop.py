"""PyTorch interop: the torch module equivalent to each pyrnn module, and weights in both directions.

    tm = pyrnn.to_torch(pyrnn.LSTM(8, 16, 2, bidirectional=True))  # torch.nn.LSTM, same weights
    m = pyrnn.from_torch(torch.nn.GRUCell(8, 16))                  # pyrnn.GRUCell, same weights

Parameter names are torch's on both sides, so a pyrnn state dict loads into torch after
torch.from_numpy on each value, and a torch state dict loads into pyrnn as it is.
"""
import numpy as np

from . import oracle


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("PyTorch interop needs torch: pip install torch") from None
    return torch


def _stack_class(nn, cell):
    return {"rnn": nn.RNN, "rnn_relu": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[oracle._cell_name(cell)]


def _cell_class(nn, cell):
    return {"rnn": nn.RNNCell, "rnn_relu": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[oracle._cell_name(cell)]


def _nonlinearity(cell):
    return {"nonlinearity": "relu" if cell == "rnn_relu" else "tanh"} if cell in ("rnn", "rnn_relu") else {}


def torch_char_lm(cell, vocab_size, embed_size, hidden_size, num_layers=1, dropout=0.0):
    """Embedding(V, E) -> nn.RNN / LSTM / GRU (batch_first) -> Dropout -> Linear(H, V), named like
    CharLM's state dict; dropout also between layers, as CharLM."""
    torch = _torch()
    nn = torch.nn
    if cell not in oracle.CELLS:
        raise ValueError(f"unknown cell {cell!r} (expected rnn, rnn_relu, lstm or gru)")
    rnn = _stack_class(nn, cell)(input_size=embed_size, hidden_size=hidden_size, num_layers=num_layers,
                                 batch_first=True, dropout=dropout if num_layers > 1 else 0.0,
                                 **_nonlinearity(cell))

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
    """An equivalent torch.nn.Module carrying a copy of a pyrnn module's weights: RNN / LSTM / GRU
    (dropout, bidirectional and batch_first kept), RNNCell / LSTMCell / GRUCell, or CharLM
    (torch_char_lm). The training mode is kept too."""
    torch = _torch()
    from .nn import CharLM, _CellBase, _RNNBase
    if isinstance(model, CharLM):
        m = torch_char_lm(model.cell, model.vocab_size, model.embed_size, model.hidden_size, model.num_layers,
                          model.dropout)
    elif isinstance(model, _RNNBase):
        m = _stack_class(torch.nn, model.cell)(model.input_size, model.hidden_size, model.num_layers,
                                               bias=model.bias, batch_first=model.batch_first,
                                               dropout=model.dropout, bidirectional=model.bidirectional,
                                               **_nonlinearity(model.cell))
    elif isinstance(model, _CellBase):
        m = _cell_class(torch.nn, model.cell)(model.input_size, model.hidden_size, bias=model.bias,
                                              **_nonlinearity(model.cell))
    else:
        raise TypeError(f"to_torch takes a pyrnn module, got {type(model).__name__}")
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return m.train(model.training)


def _cell_of(module):
    """pyrnn's cell name for a torch recurrent module or cell."""
    kind = type(module).__name__.replace("Cell", "")
    if kind == "RNN":
        return oracle.rnn_cell(module.nonlinearity)
    return {"LSTM": "lstm", "GRU": "gru"}[kind]


def _weights(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def from_torch(module, backend="c"):
    """The pyrnn module equivalent to a torch one, with a copy of its weights: nn.RNN / LSTM / GRU
    -> pyrnn.RNN / LSTM / GRU, nn.RNNCell / LSTMCell / GRUCell -> the pyrnn cell, and a module shaped
    like torch_char_lm's (embedding, rnn with batch_first, head) -> pyrnn.CharLM. The training mode
    is kept."""
    torch = _torch()
    from . import nn
    tnn = torch.nn
    if isinstance(module, (tnn.RNN, tnn.LSTM, tnn.GRU)):
        if getattr(module, "proj_size", 0):
            raise ValueError("from_torch: LSTM projections (proj_size > 0) have no pyrnn equivalent")
        cell = _cell_of(module)
        kw = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                  dropout=module.dropout, bidirectional=module.bidirectional, backend=backend)
        if cell in ("rnn", "rnn_relu"):
            m = nn.RNN(module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **kw)
        else:
            m = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](module.input_size, module.hidden_size, **kw)
    elif isinstance(module, (tnn.RNNCell, tnn.LSTMCell, tnn.GRUCell)):
        cell = _cell_of(module)
        kw = dict(bias=module.bias, backend=backend)
        if cell in ("rnn", "rnn_relu"):
            m = nn.RNNCell(module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **kw)
        else:
            m = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}[cell](module.input_size, module.hidden_size, **kw)
    elif all(hasattr(module, a) for a in ("embedding", "rnn", "head")):
        rnn = module.rnn
        if not rnn.batch_first or rnn.bidirectional or not rnn.bias or getattr(rnn, "proj_size", 0):
            raise ValueError("from_torch takes a unidirectional, biased, batch_first RNN without projections")
        V, E = module.embedding.weight.shape
        drop = getattr(module, "drop", None)
        m = nn.CharLM(_cell_of(rnn), V, E, rnn.hidden_size, rnn.num_layers, backend=backend,
                      dropout=drop.p if drop is not None else rnn.dropout)
    else:
        raise TypeError(f"from_torch takes torch.nn.RNN / LSTM / GRU, their cells, or a char LM with "
                        f"embedding / rnn / head; got {type(module).__name__}")
    m.load_state_dict(_weights(module))
    return m.train(module.training)
