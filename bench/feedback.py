"""Random feedback training (memkernels.feedback): accuracy, memory against depth, projection speed.

1. Accuracy on scikit-learn's digits (75/25 split, random_state 0, inputs / 16): MLPs with 1 and 3
   hidden layers of 256 tanh units and a small CNN (two Conv2d blocks), each trained by every rule
   (bp, fa, dfa, memdfa) with Adam (lr 1e-3, batch 32) from the same initialisation.
2. Memory of one training step against depth (MLP of width --width, batch --batch, tanh, SGD): the
   peak (memkernels.profile.peak_memory, above the level before the step) and the most bytes kept
   for backward at one moment (memkernels.profile.peak_saved_bytes). The trainer holds no feedback
   matrix; `b_bytes_if_stored` is what storing them in float32 would take.
3. Speed of delta = (e @ B) * f'(a): memkernels' fused kernel (B generated from Philox in the same
   pass) against materialise-then-matmul (torch.randn(K, M), then (e @ B) * f'(a)) and against a
   stored B ((e @ B) * f'(a)), float32. On CUDA the fused kernel is timed once per backend.

    python bench/feedback.py                  # everything, default sizes
    python bench/feedback.py --quick          # smoke test
    python bench/feedback.py --pick-backends   # on a GPU: also record feedback_project's default backend
    python bench/feedback.py --device cpu --threads 1

Writes bench/results/feedback_<device tag>.{csv,md,png} (--out changes the folder).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import _harness as h  # also puts the repository root on sys.path

import memkernels as mk

RULES = mk.feedback.RULES
# (batch N, error size K, output width M): DFA's projections (K = 10 classes onto a hidden layer)
# and an FA-sized one (K = M = 1024).
SPEED_SHAPES = {"cpu": [(128, 10, 4096), (1024, 10, 4096), (256, 10, 16384), (128, 1024, 1024)],
                "cuda": [(1024, 10, 4096), (8192, 10, 16384), (4096, 10, 65536), (4096, 1024, 4096)],
                "quick": [(16, 10, 256), (8, 64, 64)]}


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def mlp(hidden: int, width: int, d_in: int = 64, classes: int = 10) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(hidden):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                         nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(128, 10))


MODELS = {"mlp 1x256 tanh": lambda: mlp(1, 256), "mlp 3x256 tanh": lambda: mlp(3, 256), "cnn 2 conv": cnn}


def accuracy_rows(args, device) -> list[dict]:
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits())
    rows = []
    for name, make in MODELS.items():
        for rule in RULES:
            torch.manual_seed(0)
            model = make().to(device)
            trainer = mk.feedback.Trainer(model, rule=rule, loss=F.cross_entropy,
                                          optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), seed=0)
            order = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            for _ in range(args.epochs):
                perm = torch.randperm(len(x_train), generator=order).to(device)
                for i in range(0, len(x_train), 32):
                    trainer.step(x_train[perm[i:i + 32]], y_train[perm[i:i + 32]])
            h.synchronize(device)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            rows.append({"section": "accuracy", "model": name, "rule": rule, "epochs": args.epochs,
                         "test_accuracy": round(100 * accuracy, 2), "train_s": round(seconds, 2)})
            print(f"{name:>16} {rule:>6}: {100 * accuracy:.1f}%", flush=True)
    return rows


def memory_rows(args, device) -> list[dict]:
    rows = []
    for rule in RULES:
        for depth in args.depths:
            torch.manual_seed(0)
            model = mlp(depth - 1, args.width, d_in=args.width).to(device)
            trainer = mk.feedback.Trainer(model, rule=rule, loss=F.cross_entropy,
                                          optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
            x = torch.randn(args.batch, args.width, device=device)
            y = torch.randint(0, 10, (args.batch,), device=device)
            trainer.step(x, y)  # first-step allocations (optimizer state, caches) out of the way
            peak = mk.profile.peak_memory(lambda: trainer.step(x, y), backward=False, device=device)
            kept = mk.profile.peak_saved_bytes(lambda m, x, y: trainer.step(x, y), model, x, y)
            feedback_kept = sum(t.untyped_storage().nbytes() for t in vars(trainer).values()
                                if isinstance(t, torch.Tensor))
            b_sizes = ([10 * args.width] * (depth - 1) if rule in ("dfa", "memdfa")
                       else [p.numel() for p in model.parameters() if p.dim() == 2][1:] if rule == "fa" else [])
            rows.append({"section": "memory", "rule": rule, "depth": depth, "width": args.width, "batch": args.batch,
                         "peak_bytes": peak, "kept_bytes": kept, "feedback_bytes_kept": feedback_kept,
                         "b_bytes_if_stored": 4 * sum(b_sizes)})
            print(f"{rule:>6} depth {depth:>3}: peak {peak / 2**20:.2f} MiB, kept {kept / 2**20:.2f} MiB", flush=True)
    base = {r["rule"]: r for r in rows if r["depth"] == min(args.depths, key=lambda d: abs(d - 4))}
    for row in rows:
        row["peak_over_depth4"] = h.ratio(row["peak_bytes"], base[row["rule"]]["peak_bytes"])
        row["kept_over_depth4"] = h.ratio(row["kept_bytes"], base[row["rule"]]["kept_bytes"])
    return rows


def speed_rows(args, device) -> list[dict]:
    warmup, repeats = h.resolve_repeats(args)
    backends = h.device_backends(device)
    rows = []
    for n, k, m in SPEED_SHAPES["quick" if args.quick else device.type]:
        e = torch.randn(n, k, device=device)
        derivative = torch.rand(n, m, device=device)
        stored = torch.randn(k, m, device=device)
        row = {"section": "speed", "n": n, "k": k, "m": m, "dtype": "fp32"}

        def fused(backend):
            def run():
                with h.backend_selected(backend):
                    return mk.ops.feedback_project(e, 0, 1, m, 0.1, derivative)
            return run

        # All take turns call by call, so that the speedups do not carry the machine's drift.
        timings = h.time_ms_interleaved(
            {"materialise": lambda: (e @ torch.randn(k, m, device=device)) * derivative,
             "stored": lambda: (e @ stored) * derivative, **{b: fused(b) for b in backends}},
            device, warmup=warmup, repeats=repeats)
        row["materialise_ms"], row["stored_ms"] = timings["materialise"].median_ms, timings["stored"].median_ms
        for backend in backends:
            fused_ms = timings[backend].median_ms
            rows.append({**row, "backend": backend, "fused_ms": fused_ms,
                         "speedup_vs_materialise": h.ratio(row["materialise_ms"], fused_ms, 2),
                         "speedup_vs_stored": h.ratio(row["stored_ms"], fused_ms, 2),
                         "b_bytes_if_stored": 4 * k * m, "repeats": repeats})
            print(f"N={n} K={k} M={m} {backend}: fused {fused_ms:.3f} ms, randn+mm {row['materialise_ms']:.3f} ms, "
                  f"stored {row['stored_ms']:.3f} ms", flush=True)
    return rows


ACCURACY_COLUMNS = [h.Column("model", "model"), h.Column("rule", "rule"), h.Column("epochs", "epochs"),
                    h.Column("test_accuracy", "test accuracy %", "{:.1f}"), h.Column("train_s", "train s", "{:.1f}")]
MEMORY_COLUMNS = [h.Column("rule", "rule"), h.Column("depth", "depth"), h.Column("peak_bytes", "peak B", "{:,}"),
                  h.Column("peak_over_depth4", "peak / depth 4", "{:.2f}"),
                  h.Column("kept_bytes", "kept B", "{:,}"), h.Column("kept_over_depth4", "kept / depth 4", "{:.2f}"),
                  h.Column("feedback_bytes_kept", "B kept", "{:,}"),
                  h.Column("b_bytes_if_stored", "B if stored", "{:,}")]
SPEED_COLUMNS = [h.Column("n", "N"), h.Column("k", "K"), h.Column("m", "M"), h.Column("backend", "backend"),
                 h.Column("fused_ms", "fused ms", "{:.3f}"), h.Column("materialise_ms", "randn+mm ms", "{:.3f}"),
                 h.Column("stored_ms", "stored B ms", "{:.3f}"),
                 h.Column("speedup_vs_materialise", "speedup vs randn+mm", "{:.2f}"),
                 h.Column("speedup_vs_stored", "speedup vs stored", "{:.2f}")]


def write_results(rows: list[dict], device: torch.device, out, args) -> object:
    base = out / f"feedback_{h.device_tag(device)}"
    for row in rows:
        row.update(device=h.device_name(device), command=args.command)
    h.write_csv(rows, base.with_suffix(".csv"))
    section = lambda name: [r for r in rows if r["section"] == name]  # noqa: E731
    h.write_markdown(
        base.with_suffix(".md"), "Random feedback training: accuracy, memory against depth, projection speed",
        h.environment_lines(device, [args.command]),
        [f"## Accuracy on digits (75/25 split, Adam lr 1e-3, batch 32, {args.epochs} epochs)",
         h.markdown_table(section("accuracy"), ACCURACY_COLUMNS),
         f"## Memory of one training step (MLP of width {args.width}, batch {args.batch}, tanh, SGD)",
         "peak: memkernels.profile.peak_memory above the level before the step (gradients included); kept: "
         "memkernels.profile.peak_saved_bytes, the most bytes autograd holds for backward at one moment. "
         "B kept: tensors the trainer holds (no feedback matrix is stored); B if stored: float32 bytes of "
         "every B_l.",
         h.markdown_table(section("memory"), MEMORY_COLUMNS),
         "## Speed of delta = (e @ B) * f'(a), float32",
         "fused: memkernels.ops.feedback_project with the derivative (B generated in the same pass); "
         f"randn+mm: torch.randn(K, M) then (e @ B) * f'; stored B: (e @ B) * f'. Medians of per-call times"
         f"{' (time.perf_counter)' if device.type == 'cpu' else ' (CUDA events)'}.",
         h.markdown_table(section("speed"), SPEED_COLUMNS)])
    memory = section("memory")
    h.plot_lines(memory, base.with_suffix(".png"), x="depth",
                 panels=[h.Panel("peak memory of one step (bytes)", lambda r: True, "peak_bytes"),
                         h.Panel("bytes kept for backward at one moment", lambda r: True, "kept_bytes")],
                 line=lambda r: r["rule"], title=f"random feedback: memory against depth on {h.device_name(device)}",
                 xlabel="depth (weight layers)", ylabel="bytes (log)", logy=True)
    return base


PICKED_OP = "feedback_project"  # the op whose CUDA default --pick-backends records
PICK_RULE = ("the backend with the smaller summed median time of feedback_project over the speed shapes "
             "measured under both; a tie goes to triton")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="1 epoch, depths 2,4,8, tiny speed shapes")
    parser.add_argument("--epochs", type=int, default=None, help="digits epochs (default 20, --quick 1)")
    parser.add_argument("--depths", default=None, help="comma list (default 2,4,8,16,32,64; --quick 2,4,8)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: cpu 10, cuda 50, --quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--out", type=__import__("pathlib").Path, default=h.RESULTS_DIR)
    parser.add_argument("--pick-backends", action="store_true",
                        help="CUDA only: record the faster backend of feedback_project (from the speed rows) "
                             "in memkernels/ops/cuda_backends.json")
    args = parser.parse_args(argv)
    args.command = h.command_line(None if argv is None else ["bench/feedback.py", *argv])
    args.epochs = args.epochs or (1 if args.quick else 20)
    args.depths = [int(d) for d in (args.depths or ("2,4,8" if args.quick else "2,4,8,16,32,64")).split(",")]
    h.apply_threads(args)
    device = torch.device(args.device)
    if args.pick_backends:
        h.check_can_pick_backends(device)
    # Speed first: with --pick-backends, the training below runs on the backend picked.
    speed = speed_rows(args, device)
    if args.pick_backends:
        h.record_backend_choice({PICKED_OP: h.backend_totals(speed, "fused_ms")}, rule=PICK_RULE,
                                command=args.command, device=device)
    rows = accuracy_rows(args, device) + memory_rows(args, device) + speed
    base = write_results(rows, device, args.out, args)
    print(f"wrote {base}.csv, .md, .png")


if __name__ == "__main__":
    main()
