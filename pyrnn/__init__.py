"""pyrnn: minimal, exact RNN / LSTM / GRU char-LM trainer (C core, NumPy oracle)."""
from .interop import from_torch, to_torch
from .nn import CharLM, GRU, LSTM, RNN, get_num_threads, set_num_threads

__all__ = ['RNN', 'LSTM', 'GRU', 'CharLM', 'set_num_threads', 'get_num_threads', 'to_torch', 'from_torch']
