"""pyrnn: minimal, exact RNN / LSTM / GRU char-LM trainer (C core, NumPy oracle)."""
from .data import Vocab
from .engine_c import get_num_threads, isa, isa_list, set_isa, set_num_threads
from .interop import from_torch, to_torch
from .nn import CharLM, GRU, GRUCell, LSTM, LSTMCell, RNN, RNNCell
from .optim import AdamW, clip_grad_norm_

__all__ = ['RNN', 'LSTM', 'GRU', 'RNNCell', 'LSTMCell', 'GRUCell', 'CharLM', 'AdamW', 'clip_grad_norm_', 'Vocab',
           'set_num_threads', 'get_num_threads', 'isa', 'set_isa', 'isa_list', 'to_torch', 'from_torch']
