"""pyrnn command line: prepare | train | sample | plot | bench  (python -m pyrnn CMD -h)."""
import argparse
import json
import sys
import time

import numpy as np


def cmd_prepare(args):
    from . import data
    if args.dataset == "tinyshakespeare":
        text = data.fetch_tinyshakespeare(args.input)
    elif args.input:
        with open(args.input, "rb") as f:
            text = f.read()
    else:
        raise ValueError("give --input FILE or --dataset tinyshakespeare")
    vocab = data.prepare(text, args.out_dir, args.val_frac)
    n_val = int(len(text) * args.val_frac)
    print(f"wrote {args.out_dir}/train.bin ({len(text) - n_val} tokens) and {args.out_dir}/val.bin ({n_val} tokens), "
          f"vocabulary of {len(vocab)} symbols")


def cmd_sample(args):
    from .nn import CharLM
    from . import data
    model, vocab = CharLM.load(args.checkpoint, with_vocab=True)
    prime = args.prime.encode("utf-8") if args.prime else b"\n"
    missing = sorted(set(prime) - set(vocab))
    if missing:
        raise ValueError(f"--prime has characters outside the model's vocabulary: {bytes(missing)!r}")
    ids = data.encode(prime, vocab).astype(np.int32)
    out = model.sample(ids, args.length, temperature=1.0 if args.argmax else args.temperature,   # top-1: the argmax
                       top_k=1 if args.argmax else args.top_k, seed=args.seed)
    sys.stdout.write((args.prime or "") + data.decode(out, vocab) + "\n")


def progress(step, total, loss, tok_s, width=30):
    done = int(width * step / total)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.4f} {tok_s:,.0f} tok/s")
    sys.stderr.flush()


def batches(ids, B, T):
    """char-rnn layout: B contiguous streams, batch k continues batch k-1 row by row."""
    n_batches = (len(ids) - 1) // (B * T)
    if n_batches < 1:
        raise ValueError(f"{len(ids)} tokens are too few for one batch of B={B} x T={T}")
    streams = np.asarray(ids[:n_batches * B * T + 1], dtype=np.int32)
    span = n_batches * T
    for k in range(n_batches):
        rows = [streams[b * span + k * T: b * span + k * T + T + 1] for b in range(B)]
        x = np.stack(rows)
        yield k, x[:, :-1], x[:, 1:]


def evaluate(model, ids, B, T):
    model.eval()
    hx, total, n = None, 0.0, 0
    for _, x, y in batches(ids, B, T):
        total += model.forward(x, y, hx)
        hx = model.state
        n += 1
    model.train()
    return total / n


def cmd_train(args):
    from .nn import CharLM
    from . import data
    train_ids, vocab = data.read_tokens(args.train)
    val_ids = data.read_tokens(args.val)[0] if args.val else None
    model = CharLM(args.cell, len(vocab), args.embed, args.hidden, args.layers, seed=args.seed,
                   backend=args.backend, dropout=args.dropout)
    model.train()
    log = open(args.log, "w") if args.log else None
    step, hx, t_last, val = 0, None, time.perf_counter(), None
    while step < args.steps:
        for k, x, y in batches(train_ids, args.batch, args.bptt):
            if k == 0:
                hx = None   # a new pass over the text does not continue the last one
            loss = model.forward(x, y, hx)
            model.zero_grad()
            model.backward()
            norm = model.step(args.lr, weight_decay=args.weight_decay, max_grad_norm=args.clip or None)
            hx = model.state
            step += 1
            now = time.perf_counter()
            tok_s = x.size / max(now - t_last, 1e-9)
            t_last = now
            progress(step, args.steps, loss, tok_s)
            if log:
                log.write(json.dumps({"step": step, "train_loss": loss, "grad_norm": norm}) + "\n")
            if val_ids is not None and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                val = evaluate(model, val_ids, args.batch, args.bptt)
                sys.stderr.write(f"  val {val:.4f}\n")
                if log:
                    log.write(json.dumps({"step": step, "val_loss": val}) + "\n")
            if step == args.steps:
                break
    sys.stderr.write("\n")
    if log:
        log.close()
    if args.out:
        model.save(args.out, vocab=vocab)
        print(f"saved {args.out}")
    if val is not None:
        print(f"final val loss {val:.4f}")


def cmd_plot(args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'pyrnn[plot]' (or pip install matplotlib)") from None
    train, val = [], []
    with open(args.log) as f:
        for line in f:
            rec = json.loads(line)
            if "train_loss" in rec:
                train.append((rec["step"], rec["train_loss"]))
            if "val_loss" in rec:
                val.append((rec["step"], rec["val_loss"]))
    if not train and not val:
        raise ValueError(f"{args.log} has no train_loss or val_loss records")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyrnn", description=__doc__,
                                epilog="bench: CPU benchmark against PyTorch and the NumPy oracle, with flags of "
                                       "its own (python -m pyrnn bench -h)")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("prepare", help="text -> train.bin / val.bin token files")
    q.add_argument("--input", help="a text file (any bytes); with --dataset, a local copy of that corpus")
    q.add_argument("--dataset", choices=["tinyshakespeare"], help="download (or take from --input / "
                   "$PYRNN_TINYSHAKESPEARE) and hash-check a known corpus")
    q.add_argument("--out-dir", required=True)
    q.add_argument("--val-frac", type=float, default=0.1)
    q.set_defaults(fn=cmd_prepare)

    q = sub.add_parser("sample", help="generate text from a checkpoint")
    q.add_argument("checkpoint")
    q.add_argument("--prime", default="", help="text fed through the network first (default: a newline)")
    q.add_argument("--length", type=int, default=500)
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--top-k", type=int, default=0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--argmax", action="store_true", help="always take the most likely character")
    q.set_defaults(fn=cmd_sample)

    q = sub.add_parser("train", help="train from Python through the bindings")
    q.add_argument("--train", required=True, help="train.bin")
    q.add_argument("--val", help="val.bin")
    q.add_argument("--cell", default="lstm", choices=["rnn", "rnn_relu", "lstm", "gru"])
    q.add_argument("--layers", type=int, default=2)
    q.add_argument("--embed", type=int, default=128)
    q.add_argument("--hidden", type=int, default=256)
    q.add_argument("-B", "--batch", type=int, default=32)
    q.add_argument("-T", "--bptt", type=int, default=64)
    q.add_argument("--steps", type=int, default=1000)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--weight-decay", type=float, default=0.01)
    q.add_argument("--clip", type=float, default=1.0, help="global grad-norm clip, 0 = off")
    q.add_argument("--dropout", type=float, default=0.0)
    q.add_argument("--eval-every", type=int, default=200)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--backend", default="c", choices=["c", "numpy", "cuda"])
    q.add_argument("--out", help="checkpoint to write at the end")
    q.add_argument("--log", help="JSON-lines log (plot it with `python -m pyrnn plot`)")
    q.set_defaults(fn=cmd_train)

    q = sub.add_parser("plot", help="train / val curves from a log.jsonl")
    q.add_argument("log")
    q.add_argument("-o", "--out", default="loss.png")
    q.set_defaults(fn=cmd_plot)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:   # its own flags, parsed by pyrnn.bench, so not a subparser here
        from . import bench
        bench.main(argv[1:])
        return 0
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, TypeError, RuntimeError, OSError, ArithmeticError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
