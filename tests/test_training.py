"""Training end to end: data files, train_cpu's resume determinism, checkpoints shared with Python,
sampling, the Python trainer and PyTorch round trips."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pyrnn
from pyrnn import checkpoint, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40).encode()


@pytest.fixture(scope="module")
def train_cpu():
    subprocess.run(["make", "-s", "train_cpu"], cwd=ROOT, check=True, capture_output=True)
    return os.path.join(ROOT, "train_cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    data.prepare(TEXT, str(d), val_frac=0.2)
    return d


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, **kw)


def small_flags(corpus, out, *extra):
    return ["-i", corpus / "train.bin", "-j", corpus / "val.bin", "-o", out, "-c", "lstm", "-L", "2", "-E", "8",
            "-H", "16", "-b", "4", "-t", "16", "-v", "5", "-s", "0", "-m", "0", "-P", "2", "-p", "0.1", *extra]


def losses(log):
    with open(log) as f:
        return [json.loads(l)["train_loss"] for l in f if "train_loss" in l]


# -- data ---------------------------------------------------------------------------------------

def test_prepare_utf8_vocab_and_roundtrip(tmp_path):
    text = "naïve café – ünïcode\n".encode() * 20
    vocab = data.prepare(text, str(tmp_path), val_frac=0.1)
    assert vocab == bytes(sorted(set(text)))
    train, v1 = data.read_tokens(tmp_path / "train.bin")
    val, v2 = data.read_tokens(tmp_path / "val.bin")
    assert v1 == v2 == vocab
    assert len(train) + len(val) == len(text) and len(val) == int(len(text) * 0.1)
    assert data.decode(np.concatenate([train, val]), vocab) == text.decode()


def test_prepare_cli_tinyshakespeare_from_env(tmp_path):
    if not os.path.exists(SHAKESPEARE):
        pytest.skip("../shared/data/tinyshakespeare.txt is not beside the checkout")
    r = run([sys.executable, "-m", "pyrnn", "prepare", "--dataset", "tinyshakespeare", "--out-dir", tmp_path],
            env=dict(os.environ, PYRNN_TINYSHAKESPEARE=SHAKESPEARE))
    assert r.returncode == 0, r.stderr
    ids, vocab = data.read_tokens(tmp_path / "train.bin")
    assert len(vocab) == 65 and len(ids) == 1115394 - 111539


def test_tinyshakespeare_hash_mismatch_and_no_network(tmp_path, monkeypatch):
    fake = tmp_path / "input.txt"
    fake.write_bytes(b"not shakespeare")
    with pytest.raises(RuntimeError, match="sha256"):
        data.fetch_tinyshakespeare(str(fake))
    monkeypatch.delenv("PYRNN_TINYSHAKESPEARE", raising=False)

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="--input FILE or PYRNN_TINYSHAKESPEARE"):
        data.fetch_tinyshakespeare()


# -- train_cpu ----------------------------------------------------------------------------------

def test_resume_is_bit_identical(train_cpu, corpus, tmp_path):
    """2N steps in one go == N steps, then a resume for N more (dropout on, state carried)."""
    a, b = tmp_path / "a", tmp_path / "b"
    r = run([train_cpu, *small_flags(corpus, a, "-n", "12", "-k", "6")])
    assert r.returncode == 0, r.stderr
    r = run([train_cpu, *small_flags(corpus, b, "-n", "6")])
    assert r.returncode == 0, r.stderr
    r = run([train_cpu, *small_flags(corpus, b, "-n", "12", "-r", "latest")])
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "at step 6" in r.stdout
    assert losses(a / "log.jsonl") == losses(b / "log.jsonl")
    assert (a / "ckpt_00000012.bin").read_bytes() == (b / "ckpt_00000012.bin").read_bytes()
    # the loss fell, and the log carries val records
    la = losses(a / "log.jsonl")
    assert la[-1] < la[0]
    assert any("val_loss" in l for l in open(a / "log.jsonl"))


def test_independent_windows_differ_from_carried(train_cpu, corpus, tmp_path):
    carried, windows = tmp_path / "c", tmp_path / "w"
    assert run([train_cpu, *small_flags(corpus, carried, "-n", "4")]).returncode == 0
    assert run([train_cpu, *small_flags(corpus, windows, "-n", "4", "-C", "0")]).returncode == 0
    lc, lw = losses(carried / "log.jsonl"), losses(windows / "log.jsonl")
    assert lc[0] == lw[0] and lc[1:] != lw[1:]   # same first batch from zeros, then the state matters


def test_python_and_train_cpu_share_checkpoints(train_cpu, corpus, tmp_path):
    """A CharLM saved from Python resumes in train_cpu; train_cpu's steps equal Python's on the same
    batches (the same C code underneath), and its checkpoint loads back into Python."""
    ids, vocab = data.read_tokens(corpus / "train.bin")
    model = pyrnn.CharLM("gru", len(vocab), 8, 16, 2, seed=3)
    start = tmp_path / "start.bin"
    model.save(start, vocab=vocab)
    out = tmp_path / "run"
    flags = ["-i", corpus / "train.bin", "-j", "", "-o", out, "-c", "gru", "-L", "2", "-E", "8", "-H", "16",
             "-b", "4", "-t", "16", "-n", "3", "-s", "0", "-m", "0", "-P", "1", "-l", "1e-2", "-w", "0.01", "-g", "1"]
    r = run([train_cpu, *flags, "-r", start])
    assert r.returncode == 0, r.stderr
    c_losses = losses(out / "log.jsonl")
    # the same three batches through the Python API: char-rnn streams, carried state
    from pyrnn.__main__ import batches
    pyrnn.set_num_threads(1)
    py_losses, hx = [], None
    for k, x, y in batches(ids, 4, 16):
        if k == 3:
            break
        py_losses.append(model.forward(x, y, hx))
        hx = model.state
        model.zero_grad()
        model.backward()
        model.step(1e-2, weight_decay=0.01, max_grad_norm=1.0)
    pyrnn.set_num_threads(os.cpu_count())
    np.testing.assert_allclose(c_losses, py_losses, rtol=1e-6)
    back = pyrnn.CharLM.load(out / "ckpt_00000003.bin")
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(back.state_dict()[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    ck = checkpoint.read_checkpoint(out / "ckpt_00000003.bin")
    assert ck["step"] == 3 and ck["adam_t"] == 3 and ck["vocab"] == vocab and ck["data_pos"] == 3


def test_sample_cli_deterministic_and_argmax_matches_oracle(train_cpu, corpus, tmp_path):
    out = tmp_path / "s"
    assert run([train_cpu, *small_flags(corpus, out, "-n", "10")]).returncode == 0
    ck = out / "ckpt_00000010.bin"
    args = [sys.executable, "-m", "pyrnn", "sample", ck, "--prime", "Speak", "--length", "40", "--seed", "7"]
    r1, r2 = run(args), run(args)
    assert r1.returncode == 0, r1.stderr
    assert r1.stdout == r2.stdout and r1.stdout.startswith("Speak") and len(r1.stdout) == len("Speak") + 41
    r3 = run(args[:-1] + ["8"])
    assert r3.stdout != r1.stdout
    # argmax: the C sampler and the NumPy oracle pick the same characters
    c_model, vocab = pyrnn.CharLM.load(ck, with_vocab=True)
    np_model = pyrnn.CharLM.load(ck, backend="numpy")
    prime = data.encode(b"Speak", vocab).astype(np.int32)
    greedy = c_model.sample(prime, 30, top_k=1)
    np.testing.assert_array_equal(greedy, np_model.sample(prime, 30, top_k=1))
    np.testing.assert_array_equal(greedy, c_model.sample(prime, 30, temperature=0.5, top_k=1, seed=5))
    # the argmax of every step, recomputed with the oracle's forward
    tokens = list(prime)
    for _ in range(30):
        np_model.eval().forward(np.array([tokens]))
        tokens.append(int(np.argmax(np_model.logits[0, -1])))
    np.testing.assert_array_equal(greedy, tokens[len(prime):])
    r = run([sys.executable, "-m", "pyrnn", "sample", ck, "--prime", "Speak", "--length", "30", "--argmax"])
    assert r.stdout == "Speak" + data.decode(greedy, vocab) + "\n"
    # a prime outside the vocabulary is a clear error
    r = run([sys.executable, "-m", "pyrnn", "sample", ck, "--prime", "Zebra#"])
    assert r.returncode == 1 and "outside the model's vocabulary" in r.stderr and "Traceback" not in r.stderr


def test_python_train_cli(corpus, tmp_path):
    ck, log = tmp_path / "py.bin", tmp_path / "log.jsonl"
    r = run([sys.executable, "-m", "pyrnn", "train", "--train", corpus / "train.bin", "--val", corpus / "val.bin",
             "--cell", "rnn", "--layers", "1", "--embed", "8", "--hidden", "32", "-B", "4", "-T", "16",
             "--steps", "40", "--lr", "1e-2", "--eval-every", "20", "--out", ck, "--log", log])
    assert r.returncode == 0, r.stderr
    assert "40/40" in r.stderr and "final val loss" in r.stdout
    ls = losses(log)
    assert len(ls) == 40 and np.mean(ls[-5:]) < np.mean(ls[:5]) - 0.5
    assert pyrnn.CharLM.load(ck).cell == "rnn"


def test_plot_needs_matplotlib_or_draws(tmp_path, corpus):
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("plotting runs none of pyrnn's C code, and matplotlib's ft2font trips ASan's "
                    "__cxa_throw interceptor when the runtime is preloaded")
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "train_loss": 4.0}\n{"step": 2, "train_loss": 3.0}\n{"step": 2, "val_loss": 3.5}\n')
    r = run([sys.executable, "-m", "pyrnn", "plot", log, "-o", tmp_path / "loss.png"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode == 1 and "matplotlib" in r.stderr
        return
    assert r.returncode == 0 and (tmp_path / "loss.png").stat().st_size > 1000


# -- PyTorch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["rnn", "rnn_relu", "lstm", "gru"])
def test_torch_round_trip(cell):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
    rng = np.random.default_rng(0)
    model = pyrnn.CharLM(cell, 11, 6, 9, 2, seed=1)
    x, y = rng.integers(0, 11, (3, 7)), rng.integers(0, 11, (3, 7))
    loss = model.forward(x, y)
    tm = pyrnn.to_torch(model)
    logits, _ = tm(torch.from_numpy(x).long())
    tloss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), torch.from_numpy(y).reshape(-1).long())
    assert abs(tloss.item() - loss) <= 1e-5 * abs(loss)
    back = pyrnn.from_torch(tm)
    assert back.cell == cell
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)
    assert abs(back.forward(x, y) - loss) <= 1e-6 * abs(loss)


# -- regressions from review --------------------------------------------------------------------

def test_resume_independent_windows_is_bit_identical_and_mode_must_match(train_cpu, corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run([train_cpu, *small_flags(corpus, a, "-n", "10", "-k", "5", "-C", "0")]).returncode == 0
    assert run([train_cpu, *small_flags(corpus, b, "-n", "5", "-C", "0")]).returncode == 0
    r = run([train_cpu, *small_flags(corpus, b, "-n", "10", "-r", "latest")])   # -C comes from the checkpoint
    assert r.returncode == 0, r.stderr
    assert losses(a / "log.jsonl") == losses(b / "log.jsonl")
    assert (a / "ckpt_00000010.bin").read_bytes() == (b / "ckpt_00000010.bin").read_bytes()
    r = run([train_cpu, *small_flags(corpus, b, "-n", "12", "-r", "latest", "-C", "1")])
    assert r.returncode == 1 and "resuming needs the same -C" in r.stderr


def test_nonfinite_skip_on_last_step_still_checkpoints(train_cpu, corpus, tmp_path):
    out = tmp_path / "skip"
    r = run([train_cpu, *small_flags(corpus, out, "-n", "4", "-N", "skip")],
            env=dict(os.environ, PYRNN_FAULT_NAN_GRAD_STEP="4"))
    assert r.returncode == 0, r.stderr
    assert "step 4: non-finite gradient, update skipped" in r.stdout
    ck = checkpoint.read_checkpoint(out / "ckpt_00000004.bin")
    assert ck["step"] == 4 and ck["adam_t"] == 3 and "final val loss" in r.stdout


def test_dropout_masks_follow_forward_not_backward_mode():
    """eval() between forward and backward must not change which masks backward applies."""
    x = np.random.default_rng(0).integers(0, 9, (3, 5))
    grads = []
    for switch in (False, True):
        m = pyrnn.CharLM("gru", 9, 4, 6, 2, seed=4, dropout=0.5)
        m.forward(x, x)
        if switch:
            m.eval()
        m.zero_grad()
        m.backward()
        grads.append({k: g.copy() for k, g in m.grad.items()})
    for k in grads[0]:
        np.testing.assert_array_equal(grads[0][k], grads[1][k], err_msg=k)


def test_sampling_a_vocabulary_larger_than_bytes():
    m = pyrnn.CharLM("rnn", 300, 4, 8, seed=0)
    out = m.sample([299], 50, temperature=1.0, top_k=280, seed=1)
    assert out.shape == (50,) and out.min() >= 0 and out.max() < 300


def test_train_cpu_checkpoint_carries_dropout(train_cpu, corpus, tmp_path):
    # header word 12: a model loaded from train_cpu's checkpoint trains with the rate it was trained with
    out = tmp_path / "run"
    assert run([train_cpu, *small_flags(corpus, out, "-n", "2", "-p", "0.25")]).returncode == 0
    ck = checkpoint.read_checkpoint(str(out / "ckpt_00000002.bin"))
    assert ck["dropout"] == 0.25
    assert pyrnn.CharLM.load(str(out / "ckpt_00000002.bin")).dropout == 0.25
    # a resume without -p carries the rate on; -p changes it
    no_p = [f for i, f in enumerate(small_flags(corpus, out)) if f != "-p" and small_flags(corpus, out)[i - 1] != "-p"]
    assert run([train_cpu, *no_p, "-n", "3", "-r", "latest"]).returncode == 0
    assert checkpoint.read_checkpoint(str(out / "ckpt_00000003.bin"))["dropout"] == 0.25
    assert run([train_cpu, *no_p, "-n", "4", "-r", "latest", "-p", "0.5"]).returncode == 0
    assert checkpoint.read_checkpoint(str(out / "ckpt_00000004.bin"))["dropout"] == 0.5
