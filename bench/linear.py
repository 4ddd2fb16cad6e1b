"""Compressed saved inputs of Linear: step time, bytes kept, and accuracy on digits.

    python bench/linear.py                # CPU here (float32), or a GPU (bfloat16) when present
    python bench/linear.py --quick        # small shapes, short training, no files
    python bench/linear.py --pick-backends  # on a GPU: also record auxiliary_sign_forward's default

Part 1: one training step (forward + backward: input, weight and bias gradients) of a Linear at
GPT-2 shapes (768 -> 3072 and 3072 -> 768, tokens 4096 to 16384), torch.nn.Linear against
mk.nn.Linear in each save mode sharing its parameters, taking turns call by call; the ratio is
memkernels' time over torch's. Bytes kept: what autograd keeps for backward of the layer's input
(memkernels.profile.saved_bytes; parameters are not counted).
On CUDA, before part 1, auxiliary_sign_forward (the op of save="asa") alone on the same inputs under
each CUDA backend, Triton and CUDA C++ (where memkernels._C has it); ``--pick-backends`` records the
faster as its default in memkernels/ops/cuda_backends.json, and part 1 runs on it. Then the device
time of the coding kernels alone: quantize_groups against x.clone(), weight_grad_from_codes against
the GEMM it replaces.
Part 2: a GPT-2 MLP block, Linear(768, 3072), GELU, Linear(3072, 768), against the same block with
GELU(bits=3) and the second Linear save="int2": step time, and bits kept per hidden element
(what the GELU and the second Linear keep of the [tokens, 3072] hidden tensor).
Part 3: test accuracy on scikit-learn's digits of small models whose every Linear uses one save
mode, same seed, steps and optimiser (Adam) as the torch.nn.Linear model.

Writes bench/results/linear_<device>.{csv,md}.
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import _harness as H  # noqa: E402  (puts the repository root on sys.path)
import memkernels as mk  # noqa: E402
from memkernels.ops import _cuda  # noqa: E402
from _digits import train_digits  # noqa: E402

MODES = (None, "asa", "int8", "int4", "int2")
SIGN_OP = "auxiliary_sign_forward"  # the op whose CUDA default --pick-backends records
SIGN_PICK_RULE = ("the backend with the smaller summed median time of auxiliary_sign_forward alone over "
                  "the inputs of part 1 measured under both; a tie goes to triton")
GPT2_LAYERS = ((768, 3072), (3072, 768))


def mode_name(save) -> str:
    return "torch" if save is None else save


# ---- part 3: the models trained on digits ----

def mlp(save, activation=nn.Tanh, width: int = 256, depth: int = 3):
    """A builder of an MLP 64 -> width x depth -> 10 whose Linears keep `save`."""
    def build():
        layers, fan_in = [], 64
        for _ in range(depth):
            layers += [mk.nn.Linear(fan_in, width, save=save), activation()]
            fan_in = width
        return nn.Sequential(*layers, mk.nn.Linear(fan_in, 10, save=save))
    return build


class Mixer(nn.Module):
    """An MLP-Mixer for 8x8 digits: 16 tokens (2x2 patches of 4 pixels), token- and channel-mixing
    MLPs with GELU, pre-LayerNorm residual blocks, mean pooling. The Linears of the mixing MLPs keep
    `save` (they hold most of a Mixer's activations); the patch embedding (whose input is raw
    pixels) and the head stay torch.nn.Linear."""

    def __init__(self, save, dim: int = 64, depth: int = 2):
        super().__init__()
        linear = lambda i, o: mk.nn.Linear(i, o, save=save)  # noqa: E731
        self.embed = nn.Linear(4, dim)
        self.token_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.token_mlps = nn.ModuleList(nn.Sequential(linear(16, 32), nn.GELU(), linear(32, 16)) for _ in range(depth))
        self.channel_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.channel_mlps = nn.ModuleList(
            nn.Sequential(linear(dim, 2 * dim), nn.GELU(), linear(2 * dim, dim)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        patches = x.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        h = self.embed(patches)
        for token_norm, token_mlp, channel_norm, channel_mlp in zip(
                self.token_norms, self.token_mlps, self.channel_norms, self.channel_mlps):
            h = h + token_mlp(token_norm(h).transpose(1, 2)).transpose(1, 2)
            h = h + channel_mlp(channel_norm(h))
        return self.head(self.norm(h).mean(dim=1))


DIGITS_MODELS = {
    "mlp-tanh 3x256": lambda save: mlp(save, nn.Tanh),
    "mlp-relu 3x256": lambda save: mlp(save, nn.ReLU),
    "mixer 2x64": lambda save: (lambda: Mixer(save)),
}


def accuracy_rows(steps: int) -> list[dict]:
    rows = []
    for model, builder in DIGITS_MODELS.items():
        baseline = train_digits(builder(None), steps)
        for save in MODES:
            acc = baseline if save is None else train_digits(builder(save), steps)
            rows.append({"part": "accuracy", "model": model, "mode": mode_name(save), "steps": steps,
                         "accuracy": acc, "vs_torch": acc - baseline})
            print(f"{model:16s} {mode_name(save):6s} {acc:6.2f}%  ({acc - baseline:+.2f})", flush=True)
    return rows


# ---- parts 1 and 2: step time and bytes ----

def step_times(modules: dict, x, device, repeats: int) -> dict:
    """Median ms of a training step, forward + backward (grads of x and every parameter), of each
    module(x); the modules take turns call by call (H.time_ms_interleaved), so that a drift of the
    machine's speed slows torch's and memkernels' steps alike."""
    grad_out = torch.randn_like(next(iter(modules.values()))(x))

    def step(module):
        wrt = [x, *module.parameters()]
        return lambda: torch.autograd.grad(module(x), wrt, grad_out)
    timings = H.time_ms_interleaved({name: step(m) for name, m in modules.items()}, device, warmup=1,
                                    repeats=repeats)
    return {name: t.median_ms for name, t in timings.items()}


def sign_op_rows(device, dtype, token_counts, repeats: int) -> list[dict]:
    """auxiliary_sign_forward alone on each input of part 1 under each CUDA backend, taking turns."""
    backends = H.device_backends(device)
    rows = []
    for fan_in, _ in GPT2_LAYERS:
        for tokens in token_counts:
            x = torch.randn(tokens, fan_in, device=device, dtype=dtype)

            def sign(backend):
                def run():
                    with H.backend_selected(backend):
                        return mk.ops.auxiliary_sign_forward(x, 0.01, False)  # eps: the Linear's default
                return run
            timings = H.time_ms_interleaved({b: sign(b) for b in backends}, device, warmup=3, repeats=repeats)
            for backend, timing in timings.items():
                ms = timing.median_ms
                # It reads x and writes x + eps * s(x) and 1 bit an element.
                moved = 2 * x.numel() * x.element_size() + x.numel() // 8
                rows.append({"part": "sign op", "layer": f"{fan_in}->", "tokens": tokens,
                             "dtype": str(dtype).removeprefix("torch."), "backend": backend, "op_ms": ms,
                             "gbps": moved / ms / 1e6})
                print(f"auxiliary_sign_forward [{tokens}, {fan_in}] {backend:6s} {ms:8.4f} ms "
                      f"({moved / ms / 1e6:.0f} GB/s)", flush=True)
    return rows


def coding_kernel_rows(device, dtype, token_counts, repeats: int) -> list[dict]:
    """CUDA: device time (H.device_ms_per_call, kernels alone) of the coding kernels a step of part 1
    runs beside torch's: quantize_groups against a copy of x (what it reads and more than it
    writes), and weight_grad_from_codes against the cuBLAS GEMM grad_out^T @ x it replaces."""
    rows = []
    seed = torch.tensor(0)
    for fan_in, fan_out in GPT2_LAYERS:
        for tokens in token_counts:
            x = torch.randn(tokens, fan_in, device=device, dtype=dtype)
            grad_out = torch.randn(tokens, fan_out, device=device, dtype=dtype)
            copy_ms = H.device_ms_per_call(x.clone, device, calls=repeats)
            mm_ms = H.device_ms_per_call(lambda: grad_out.t() @ x, device, calls=repeats)
            _, signs = mk.ops.auxiliary_sign_forward(x, 0.01, False)
            coded = {"asa": (1, signs, None)}
            for save, bits in (("int8", 8), ("int4", 4), ("int2", 2)):
                coded[save] = (bits, *mk.ops.quantize_groups(x, bits, 256, seed))
                ms = H.device_ms_per_call(lambda: mk.ops.quantize_groups(x, bits, 256, seed), device, calls=repeats)
                rows.append({"part": "kernels", "op": "quantize_groups", "layer": f"{fan_in}->{fan_out}",
                             "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "mode": save,
                             "kernel_ms": ms, "baseline": "x.clone()", "baseline_ms": copy_ms,
                             "over_baseline": ms / copy_ms})
            for save, (bits, codes, stats) in coded.items():
                ms = H.device_ms_per_call(
                    lambda: mk.ops.weight_grad_from_codes(grad_out, codes, stats, fan_in, bits, 256, -0.01, 0.02),
                    device, calls=repeats)
                rows.append({"part": "kernels", "op": "weight_grad_from_codes", "layer": f"{fan_in}->{fan_out}",
                             "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "mode": save,
                             "kernel_ms": ms, "baseline": "grad_out.t() @ x", "baseline_ms": mm_ms,
                             "over_baseline": ms / mm_ms})
            for row in rows[-7:]:
                print(f"{row['op']:24s} {row['layer']:10s} tokens {tokens:6d} {row['mode']:5s} "
                      f"{row['kernel_ms']:8.4f} ms ({row['over_baseline']:.2f}x {row['baseline']})", flush=True)
    return rows


def layer_rows(device, dtype, token_counts, repeats: int) -> list[dict]:
    rows = []
    for fan_in, fan_out in GPT2_LAYERS:
        torch_layer = nn.Linear(fan_in, fan_out, device=device, dtype=dtype)
        layers = {save: torch_layer if save is None else mk.nn.Linear.from_torch(torch_layer, save)
                  for save in MODES}
        for tokens in token_counts:
            x = torch.randn(tokens, fan_in, device=device, dtype=dtype, requires_grad=True)
            times = step_times(layers, x, device, repeats)
            torch_ms, torch_bytes = times[None], mk.profile.saved_bytes(torch_layer, x)
            for save, layer in layers.items():
                ms, kept = times[save], mk.profile.saved_bytes(layer, x)
                rows.append({"part": "layer", "layer": f"{fan_in}->{fan_out}", "tokens": tokens,
                             "dtype": str(dtype).removeprefix("torch."), "mode": mode_name(save),
                             "backend": kernel_backend(save, device), "step_ms": ms,
                             "time_over_torch": ms / torch_ms, "kept_bytes": kept,
                             "kept_over_torch": kept / torch_bytes,
                             "bits_per_input_element": 8 * kept / x.numel()})
                print(f"{fan_in}->{fan_out} tokens {tokens:6d} {mode_name(save):6s} {ms:9.2f} ms "
                      f"({ms / torch_ms:.3f}x)  kept {kept:,} B", flush=True)
    return rows


def kernel_backend(save, device) -> str:
    """The backend of the kernels that a Linear keeping `save` runs on `device`."""
    if save is None:
        return "torch"
    if device.type == "cpu":
        return "cpu"
    # int modes run Triton's quantize_groups and weight_grad_from_codes (their only CUDA kernels).
    return _cuda.backend_for("auxiliary_sign_forward") if save == "asa" else "triton"


def mlp_block(fused: bool, device, dtype) -> nn.Sequential:
    if not fused:
        return nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).to(device, dtype)
    return nn.Sequential(nn.Linear(768, 3072), mk.nn.GELU(bits=3),
                         mk.nn.Linear(3072, 768, save="int2")).to(device, dtype)


def block_rows(device, dtype, token_counts, repeats: int) -> list[dict]:
    rows = []
    torch_block = mlp_block(False, device, dtype)
    fused_block = mlp_block(True, device, dtype)
    fused_block.load_state_dict(torch_block.state_dict())
    for tokens in token_counts:
        x = torch.randn(tokens, 768, device=device, dtype=dtype, requires_grad=True)
        hidden = torch.randn(tokens, 3072, device=device, dtype=dtype, requires_grad=True)
        blocks = {"torch": torch_block, "gelu bits=3 + int2": fused_block}
        times = step_times(blocks, x, device, repeats)
        torch_ms = times["torch"]
        for name, block in blocks.items():
            ms = times[name]
            # What the block keeps of its hidden tensor: the GELU's and the second Linear's saves,
            # also in bfloat16 (bytes only) when the bench runs in another dtype.
            kept = mk.profile.saved_bytes(block[1:], hidden)
            # A copy: a view would count the whole hidden tensor's storage (saved_bytes counts storages).
            hidden_bf16 = hidden.detach()[:64].to(torch.bfloat16, copy=True).requires_grad_()
            kept_bf16 = mk.profile.saved_bytes(copy.deepcopy(block[1:]).bfloat16(), hidden_bf16)
            rows.append({"part": "block", "block": name, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
                         "step_ms": ms, "time_over_torch": ms / torch_ms, "hidden_kept_bytes": kept,
                         "bits_per_hidden_element": 8 * kept / hidden.numel(),
                         "bits_per_hidden_element_bf16": 8 * kept_bf16 / hidden_bf16.numel()})
            print(f"MLP block {name:20s} tokens {tokens:6d} {ms:9.2f} ms ({ms / torch_ms:.3f}x)  "
                  f"{8 * kept / hidden.numel():.3f} bits per hidden element", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short training, no result files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                     "bfloat16 on GPU)")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default 4096,8192,16384)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps of part 3 (default 1000)")
    parser.add_argument("--pick-backends", action="store_true",
                        help="CUDA only: record the faster backend of auxiliary_sign_forward (from the sign-op "
                             "rows) in memkernels/ops/cuda_backends.json before part 1")
    args = parser.parse_args(argv)
    command = H.command_line(None if argv is None else ["bench/linear.py", *argv])
    device = torch.device(args.device)
    if args.pick_backends:
        H.check_can_pick_backends(device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else \
        ([256, 512] if args.quick else [4096, 8192, 16384])
    repeats = args.repeats or (2 if args.quick else (3 if device.type == "cpu" else 20))
    steps = args.steps or (60 if args.quick else 1000)

    rows = sign_op_rows(device, dtype, tokens, repeats) + coding_kernel_rows(device, dtype, tokens, repeats) \
        if device.type == "cuda" else []
    if args.pick_backends:
        H.record_backend_choice({SIGN_OP: H.backend_totals(rows, "op_ms")}, rule=SIGN_PICK_RULE, command=command,
                                device=device)
    rows += layer_rows(device, dtype, tokens, repeats) + block_rows(device, dtype, tokens, repeats) + \
        accuracy_rows(steps)
    sign_table = H.markdown_table([r for r in rows if r["part"] == "sign op"], [
        H.Column("layer", "input of"), H.Column("tokens", "tokens"), H.Column("dtype", "dtype"),
        H.Column("backend", "backend"), H.Column("op_ms", "ms", "{:.4f}"), H.Column("gbps", "GB/s", "{:.0f}")])
    kernel_table = H.markdown_table([r for r in rows if r["part"] == "kernels"], [
        H.Column("op", "op"), H.Column("layer", "layer"), H.Column("tokens", "tokens"), H.Column("dtype", "dtype"),
        H.Column("mode", "save"), H.Column("kernel_ms", "kernel ms", "{:.4f}"), H.Column("baseline", "baseline"),
        H.Column("baseline_ms", "baseline ms", "{:.4f}"), H.Column("over_baseline", "over baseline", "{:.2f}")])
    layer_table = H.markdown_table([r for r in rows if r["part"] == "layer"], [
        H.Column("layer", "layer"), H.Column("tokens", "tokens"), H.Column("dtype", "dtype"),
        H.Column("mode", "save"), H.Column("backend", "kernels"), H.Column("step_ms", "step ms", "{:.2f}"),
        H.Column("time_over_torch", "time / torch", "{:.3f}"), H.Column("kept_bytes", "kept B", "{:,}"),
        H.Column("bits_per_input_element", "bits / element", "{:.3f}")])
    block_table = H.markdown_table([r for r in rows if r["part"] == "block"], [
        H.Column("block", "block"), H.Column("tokens", "tokens"), H.Column("dtype", "dtype"),
        H.Column("step_ms", "step ms", "{:.2f}"), H.Column("time_over_torch", "time / torch", "{:.3f}"),
        H.Column("bits_per_hidden_element", "bits kept / hidden element", "{:.3f}"),
        H.Column("bits_per_hidden_element_bf16", "same in bf16", "{:.3f}")])
    accuracy_table = H.markdown_table([r for r in rows if r["part"] == "accuracy"], [
        H.Column("model", "model"), H.Column("mode", "save"), H.Column("steps", "steps"),
        H.Column("accuracy", "test accuracy %", "{:.2f}"), H.Column("vs_torch", "vs torch (points)", "{:+.2f}")])
    print(*([sign_table, kernel_table] if device.type == "cuda" else []), layer_table, block_table, accuracy_table,
          sep="\n\n")
    if args.quick:
        return
    stem = H.RESULTS_DIR / f"linear_{H.device_tag(device)}"
    H.write_csv(rows, stem.with_suffix(".csv"))
    H.write_markdown(stem.with_suffix(".md"), "Compressed saved inputs of Linear",
                     H.environment_lines(device, [command]),
                     [*(["## auxiliary_sign_forward alone (save=\"asa\"), per CUDA backend",
                         "Medians of per-call times, the backends taking turns; GB/s counts x read, the "
                         "result written and its sign bits.", sign_table,
                         "## The coding kernels alone, device time",
                         "Kernel time from torch.profiler's CUDA trace (host time excluded), per call over "
                         "the repeats: quantize_groups (group size 256) against a copy of x, "
                         "weight_grad_from_codes (x_hat dequantized inside the GEMM; asa: the sign bits) "
                         "against the GEMM grad_out^T @ x that torch.nn.Linear runs.", kernel_table]
                       if device.type == "cuda" else []),
                      "## One Linear at GPT-2 shapes: step time and bytes kept of the input",
                      "Step times are medians of per-call timings; torch.nn.Linear and the modes of a "
                      "shape take turns call by call, in orders where each follows every other equally "
                      "often. The MLP blocks below are timed the same way.", layer_table,
                      "## GPT-2 MLP block: Linear, GELU, Linear", block_table,
                      "## Test accuracy on digits (75/25 split), same seed, steps and Adam", accuracy_table])


if __name__ == "__main__":
    main()
