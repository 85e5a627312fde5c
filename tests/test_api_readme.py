"""The README's Python section runs as written: its ```python blocks, in order, in one namespace, in a
scratch folder (the torch block only where torch is installed)."""
import os
import re


import pyrnn

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def torch_installed():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def python_blocks():
    text = open(README, encoding='utf-8').read()
    start = text.index('\n## Python\n')
    end = text.index('\n## ', start + 1)
    return re.findall(r'```python\n(.*?)```', text[start:end], re.S)


def test_readme_python_section_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    threads = pyrnn.get_num_threads()
    pyrnn.set_num_threads(1)   # tiny sizes: one thread, so a busy machine does not slow the test down
    try:
        namespace = {}
        for i, block in enumerate(blocks):
            if 'import torch' in block and not torch_installed():
                continue
            exec(compile(block, f'README.md python block {i + 1}', 'exec'), namespace)
    finally:
        pyrnn.set_num_threads(threads)
    out = capsys.readouterr().out
    accuracy = float(re.search(r'accuracy (\S+)', out).group(1))
    assert accuracy >= 0.9, out                       # the classifier learned its task
    assert re.search(r'^ROMEO:.{60}', out, re.M | re.S), out   # 60 characters continue the prime
    assert (tmp_path / 'lm.bin').exists() and isinstance(namespace['lm'], pyrnn.CharLM)
    assert namespace['lm'].vocab == namespace['vocab']
    if 'back' in namespace:
        assert isinstance(namespace['back'], pyrnn.GRU) and namespace['back'].bidirectional
    if 'model' in namespace:   # the pyrnn.torch loop ran, then restore gave the model torch's LSTM back
        import torch
        assert type(namespace['model'].rnn) is torch.nn.LSTM and namespace['step'] == 19
