"""Every Triton kernel against its PyTorch reference under the Triton interpreter, and compiled
for sm_70, sm_80 and sm_90 without a GPU.

TRITON_INTERPRET=1 must be set before triton decorates a kernel, it would leak into every other
test of the process, and the build check needs it unset. So both halves run in subprocesses,
started together (2 cores) by a module fixture:
- `python tests/unit/test_kernels_triton.py` with TRITON_INTERPRET=1 runs every `@case` below on
  CPU tensors and prints one JSON line per case (ok, or the traceback); one parametrised test
  per case reports it.
- `python -m kernels.build_check` with TRITON_INTERPRET unset compiles every kernel variant for
  GPUTarget("cuda", 70/80/90, 32) through PTX to a cubin (triton ships ptxas).
Shapes are tiny and odd (hidden 131, vocabulary 1031, row counts that split unevenly over
blocks and programs): the interpreter is ~2000x slower than torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600

CASES: dict[str, Callable[[], None]] = {}


def case(fn: Callable[[], None]) -> Callable[[], None]:
    CASES[fn.__name__] = fn
    return fn


def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


pytestmark = pytest.mark.skipif(
    not _triton_importable(),
    reason="triton is not installed (pip install -c constraints.txt triton); "
    "the Triton kernels cannot be interpreted or compiled",
)

# Tolerances for outputs written in a low-precision dtype: a few units of its rounding (fp16
# 2**-11, bf16 2**-8) at the magnitudes here (|y| <~ 4); fp32 is summation-order noise.
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HIDDEN, VOCAB = 131, 1031


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, k=1.0) -> None:
    tol = {key: k * value for key, value in TOL[dtype].items()}
    torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- cases (run under interpreter)


@case
def layer_norm() -> None:
    """Oracle: F.layer_norm in fp32 on the upcast inputs (sum rounded to the input dtype, as the
    reference computes it). [3, 13, 131] = 39 rows over 4 backward programs (10, 10, 10, 9);
    without residual, with it, and with the sum returned (its own gradient added)."""
    from kernels.layer_norm_triton import layer_norm_triton

    for dtype in DTYPES:
        for mode in ("plain", "residual", "return_sum"):
            g = _gen(1)
            x = torch.randn(3, 13, HIDDEN, generator=g).to(dtype).requires_grad_()
            r = torch.randn(3, 13, HIDDEN, generator=g).to(dtype).requires_grad_()
            w = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).requires_grad_()
            b = (0.1 * torch.randn(HIDDEN, generator=g)).requires_grad_()
            dy = torch.randn(3, 13, HIDDEN, generator=g).to(dtype)
            ds = torch.randn(3, 13, HIDDEN, generator=g).to(dtype)
            leaves = (x, r, w, b) if mode != "plain" else (x, w, b)

            residual = r if mode != "plain" else None
            out = layer_norm_triton(
                x, w, b, 1e-12, residual=residual, return_sum=mode == "return_sum"
            )
            y, s = out if mode == "return_sum" else (out, None)
            assert y.dtype == dtype and y.shape == x.shape
            objective = (y.float() * dy.float()).sum()
            if s is not None:
                objective = objective + (s.float() * ds.float()).sum()
            got = torch.autograd.grad(objective, leaves)

            ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
            xf = ref_leaves[0]
            sf = xf if mode == "plain" else xf + ref_leaves[1]
            # the reference adds in the input dtype; emulate that rounding without blocking grads
            sf = sf + (sf.detach().to(dtype).float() - sf.detach())
            yf = F.layer_norm(sf, (HIDDEN,), ref_leaves[-2], ref_leaves[-1], 1e-12)
            ref_objective = (yf * dy.float()).sum()
            if s is not None:
                ref_objective = ref_objective + (sf * ds.float()).sum()
            want = torch.autograd.grad(ref_objective, ref_leaves)
            _close(y, yf, dtype, f"{dtype} {mode} y")
            if s is not None:
                _close(s, sf, dtype, f"{dtype} {mode} sum")
            names = (
                ("x", "residual", "weight", "bias") if mode != "plain" else ("x", "weight", "bias")
            )
            for gg, ww, name in zip(got, want, names, strict=True):
                assert gg.dtype == (dtype if name in ("x", "residual") else torch.float32)
                # weight/bias grads sum 39 rows of input-dtype-rounded products
                k = 1.0 if name in ("x", "residual") else 4.0
                _close(gg, ww, dtype, f"{dtype} {mode} grad {name}", k)


@case
def bias_gelu() -> None:
    """Oracle: F.gelu(x + bias) in fp32 on the upcast inputs. [3, 13, 131]: 39 rows over
    blocks of 32 and 131 columns over blocks of 128, so both edges are ragged."""
    from kernels.bias_gelu_triton import bias_gelu_triton

    for dtype in DTYPES:
        g = _gen(2)
        x = torch.randn(3, 13, HIDDEN, generator=g).to(dtype).requires_grad_()
        b = torch.randn(HIDDEN, generator=g).requires_grad_()
        dy = torch.randn(3, 13, HIDDEN, generator=g).to(dtype)
        y = bias_gelu_triton(x, b)
        assert y.dtype == dtype and y.shape == x.shape
        gx, gb = torch.autograd.grad((y.float() * dy.float()).sum(), (x, b))
        xf, bf = x.detach().float().requires_grad_(), b.detach().clone().requires_grad_()
        yf = F.gelu(xf + bf)
        wx, wb = torch.autograd.grad((yf * dy.float()).sum(), (xf, bf))
        _close(y, yf, dtype, f"{dtype} y")
        _close(gx, wx, dtype, f"{dtype} grad x")
        # the bias grad is summed in fp32 from unrounded dx: fp32-accurate in every dtype
        _close(gb, wb, torch.float32, f"{dtype} grad bias", 10.0)


def _ce_inputs(rows: int, dtype: torch.dtype, seed: int):
    g = _gen(seed)
    hidden = torch.randn(rows, HIDDEN, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.2).requires_grad_()
    bias = (torch.randn(VOCAB, generator=g) * 0.5).requires_grad_()
    target = torch.randint(0, VOCAB, (rows,), generator=g)
    target[::7] = -100
    position_weight = torch.rand(rows, generator=g)
    position_weight[1::5] = 0.0
    return hidden, weight, bias, target, position_weight


def _full_logits_ce(hidden, weight, bias, target, position_weight, smoothing):
    """sum(w_i CE_i) / sum(w_i) over scored rows, from the full fp32 logits and F.cross_entropy."""
    logits = hidden.float() @ weight.float().T + bias.float()
    rows = F.cross_entropy(logits, target, reduction="none", label_smoothing=smoothing)
    w = torch.where(target != -100, position_weight, 0.0)
    plain = F.cross_entropy(logits, target, reduction="none")
    return (w * rows).sum() / w.sum(), plain.detach(), logits.detach().argmax(1)


def _triton_ce(hidden, weight, target, *, bias=None, position_weight=None, tp=None, **options):
    """`kernels.linear_cross_entropy` with the Triton chunk maths forced (the dispatcher picks
    it on CUDA only): the same chunk loop, `chunk_math_triton` in place of the reference's."""
    from kernels.cross_entropy import CrossEntropyOptions, run_chunked
    from kernels.cross_entropy_triton import chunk_math_triton

    return run_chunked(
        chunk_math_triton,
        hidden,
        weight,
        target,
        bias,
        position_weight,
        tp,
        CrossEntropyOptions(**options),
    )


@case
def cross_entropy() -> None:
    """Oracle: F.cross_entropy on the full fp32 logits (loss, per-row CE, argmax, and the grads
    of hidden, weight, bias), with ignored rows, zero and fractional position weights, label
    smoothing off/on (fp32), hidden in fp32/fp16/bf16 (the kernels only see the fp32 logits),
    37 rows in chunks of 16 (last chunk 5), vocabulary 1031 over blocks of 1024 (last block 7
    wide)."""
    for dtype, smoothing in [(d, 0.0) for d in DTYPES] + [(torch.float32, 0.1)]:
        hidden, weight, bias, target, pw = _ce_inputs(37, dtype, seed=3)
        loss, row_ce, argmax = _triton_ce(
            hidden,
            weight,
            target,
            bias=bias,
            position_weight=pw,
            chunk_rows=16,
            label_smoothing=smoothing,
            return_stats=True,
        )
        got = torch.autograd.grad(3 * loss, (hidden, weight, bias))
        leaves = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
        ref, ref_rows, ref_argmax = _full_logits_ce(*leaves, target, pw, smoothing)
        want = torch.autograd.grad(3 * ref, leaves)
        what = f"{dtype} smoothing {smoothing}"
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5, msg=f"{what} loss")
        torch.testing.assert_close(row_ce, torch.where(target != -100, ref_rows, 0.0))
        assert torch.equal(argmax, ref_argmax), what
        for gg, ww, name, t in zip(
            got, want, ("hidden", "weight", "bias"), (hidden, weight, bias), strict=True
        ):
            assert gg.dtype == t.dtype
            # grads are fp32 maths; hidden's is rounded to its dtype at the end
            _close(gg, ww, dtype if name == "hidden" else torch.float32, f"{what} {name}")


@case
def cross_entropy_edges() -> None:
    """No-grad pass (stats only), all rows ignored (loss 0, zero grads, no NaN), and -inf bias
    entries as tensor parallelism uses to mask vocabulary padding (same as the unpadded CE)."""
    hidden, weight, bias, target, pw = _ce_inputs(20, torch.float32, seed=4)
    with torch.no_grad():
        loss, row_ce, argmax = _triton_ce(
            hidden, weight, target, bias=bias, chunk_rows=7, return_stats=True
        )
    ref, ref_rows, ref_argmax = _full_logits_ce(hidden, weight, bias, target, torch.ones(20), 0)
    torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row_ce, torch.where(target != -100, ref_rows, 0.0))
    assert torch.equal(argmax, ref_argmax)

    ignored = torch.full_like(target, -100)
    loss = _triton_ce(hidden, weight, ignored, bias=bias, chunk_rows=7)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)

    pad = 13
    padded_w = torch.cat([weight.detach(), torch.randn(pad, HIDDEN)]).requires_grad_()
    padded_b = torch.cat([bias.detach(), torch.full((pad,), float("-inf"))])
    loss = _triton_ce(hidden, padded_w, target, bias=padded_b, chunk_rows=7)
    (gh,) = torch.autograd.grad(loss, (hidden,))
    ref, _, _ = _full_logits_ce(hidden, weight, bias, target, torch.ones(20), 0)
    (rh,) = torch.autograd.grad(ref, (hidden,))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)


def _tp_worker(rank: int, world: int, port: int, queue) -> None:
    """One rank of a 2-way vocabulary split: its half of the (padded) vocabulary, Triton path."""
    try:
        import torch.distributed as dist

        from pretrain.parallel.collectives import GroupCollectives

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        hidden, weight, bias, target, pw = _ce_inputs(23, torch.float32, seed=5)
        local = (VOCAB + 1) // world  # 516: vocabulary padded to 1032, the pad masked by -inf
        w_full = torch.cat([weight.detach(), torch.zeros(1, HIDDEN)])
        b_full = torch.cat([bias.detach(), torch.tensor([float("-inf")])])
        w = w_full[rank * local : (rank + 1) * local].clone().requires_grad_()
        b = b_full[rank * local : (rank + 1) * local].clone().requires_grad_()
        loss, row_ce, argmax = _triton_ce(
            hidden,
            w,
            target,
            bias=b,
            position_weight=pw,
            tp=GroupCollectives(dist.group.WORLD),
            chunk_rows=10,
            return_stats=True,
        )
        gh, gw, gb = torch.autograd.grad(loss, (hidden, w, b))
        dist.all_reduce(gh)  # grad_hidden is partial per rank (copy_to_tp_region's backward)
        out = (loss.detach(), row_ce, argmax, gh, gw, gb[: VOCAB - rank * local])
        # numpy copies travel by value; torch tensors would be shared through file descriptors
        # that vanish when this process exits
        queue.put((rank, *(t.numpy() for t in out)))
        dist.destroy_process_group()
    except BaseException:  # report instead of hanging the parent
        queue.put((rank, traceback.format_exc()))


@case
def cross_entropy_vocab_parallel_2_ranks() -> None:
    """Oracle: the unsplit F.cross_entropy. Two gloo processes each hold half of a vocabulary
    padded from 1031 to 1032 (the pad masked by a -inf bias); the row statistics are reduced
    between the two kernels. Loss, row CE, argmax, grad hidden (summed over ranks) and each
    rank's weight/bias grads match the full-logit ones."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork: the ranks start with torch and triton already imported (spawn would re-import
    # them, seconds per rank on two busy cores); nothing here has started threads to lose.
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            item = queue.get(timeout=300)
            if isinstance(item[1], str):
                raise AssertionError(f"rank {item[0]} failed:\n{item[1]}")
            results[item[0]] = [torch.from_numpy(a) for a in item[1:]]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()

    hidden, weight, bias, target, pw = _ce_inputs(23, torch.float32, seed=5)
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    ref, ref_rows, ref_argmax = _full_logits_ce(*leaves, target, pw, 0.0)
    rh, rw, rb = torch.autograd.grad(ref, leaves)
    local = (VOCAB + 1) // 2
    for rank, (loss, row_ce, argmax, gh, gw, gb) in results.items():
        torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(row_ce, torch.where(target != -100, ref_rows, 0.0))
        assert torch.equal(argmax, ref_argmax)
        torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
        lo, hi = rank * local, min((rank + 1) * local, VOCAB)
        torch.testing.assert_close(gw[: hi - lo], rw[lo:hi], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gb, rb[lo:hi], atol=1e-5, rtol=1e-5)


@case
def lamb() -> None:
    """Oracle: kernels.lamb.lamb_step_reference, the foreach maths of pretrain.optim.Lamb, over
    4 steps on the same state. Tensors of odd sizes span several 1024-element chunks (37 x 131
    = 4847 -> 5); a zero tensor (trust ratio 1) and a zero-grad tensor without decay (u = 0,
    ratio 1, no NaN); with and without weight decay; unequal step counts per tensor. The
    Triton path rounds div/sqrt as IEEE and does not contract to FMA, but torch's CPU foreach
    ops may: values differ in the last bit, which cancellation (m = b1 m + (1 - b1) g, p - lr r u)
    can turn into a larger relative error, hence 1e-6 relative and 1e-7 absolute (one ulp at
    the unit magnitude of these tensors)."""
    from kernels.lamb import lamb_step_reference, tensor_square_norms
    from kernels.lamb_triton import lamb_step_triton

    shapes = [(HIDDEN,), (37, HIDDEN), (VOCAB,), (3, 4), (5,)]
    for weight_decay in (0.0, 0.1):
        g = _gen(6)
        params = [torch.randn(s, generator=g) for s in shapes]
        params[3].zero_()
        state = [
            [p.clone() for p in params],
            [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params],
        ]
        mine = [[t.clone() for t in ts] for ts in state]
        hook_calls: list[int] = []

        def hook(tensors, hook_calls=hook_calls):
            hook_calls.append(len(tensors))
            return tensor_square_norms(tensors)

        for step in range(1, 5):
            grads = [torch.randn(s, generator=g) for s in shapes]
            grads[4].zero_()
            steps = [step, step, step + 2, step, step]
            kw = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": weight_decay}
            lamb_step_reference(state[0], grads, state[1], state[2], steps, **kw)
            lamb_step_triton(
                mine[0], grads, mine[1], mine[2], steps, tensor_norms=hook, chunk=1024, **kw
            )  # noqa: E501
            for name, ours, ref in zip(
                ("param", "exp_avg", "exp_avg_sq"), mine, state, strict=True
            ):
                for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
                    where = f"wd {weight_decay} step {step} {name}[{i}]"
                    torch.testing.assert_close(
                        a, b, atol=1e-7, rtol=1e-6, msg=lambda m, where=where: f"{where}: {m}"
                    )
        assert hook_calls == [2 * len(shapes)] * 4  # params + updates, once per step
        if weight_decay == 0:
            assert torch.equal(mine[0][4], params[4])  # zero grad, no decay: unchanged
        assert mine[0][3].abs().sum() > 0  # moved off zero with ratio 1


# ---------------------------------------------------------------- the pytest side


def _run_cases() -> None:
    """Subprocess entry: run every case under the interpreter, one JSON line each."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    sys.path.insert(0, str(REPO))  # `kernels` from this checkout (spawned ranks inherit it)
    # The interpreter evaluates both sides of tl.where with numpy (e.g. exp(-inf - -inf) on a
    # masked lane); its warnings would only bury a real failure's traceback.
    warnings.simplefilter("ignore", RuntimeWarning)
    torch.set_num_threads(1)
    for name, fn in CASES.items():
        start = time.perf_counter()
        try:
            fn()
            result = "ok"
        except BaseException:
            result = traceback.format_exc()
        seconds = round(time.perf_counter() - start, 2)
        print(json.dumps({"case": name, "result": result, "seconds": seconds}), flush=True)


def _env(interpret: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def subprocesses() -> dict[str, subprocess.Popen]:
    """Both subprocesses, started at once so they overlap on the two cores."""
    common = {"cwd": REPO, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = {
        "interpret": subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], env=_env(True), **common
        ),
        "build": subprocess.Popen(
            [sys.executable, "-m", "kernels.build_check"], env=_env(False), **common
        ),
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"subprocess did not finish in {TIMEOUT_S} s:\n{out}\n{err[-4000:]}")
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def interpreted(subprocesses) -> dict[str, str]:
    code, out, err = _finish(subprocesses["interpret"])
    results = {}
    for line in out.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            results[item["case"]] = item["result"]
    if code != 0 or not results:
        pytest.fail(f"interpreter subprocess exited {code}:\n{out}\n{err[-4000:]}")
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_under_interpreter(name: str, interpreted: dict[str, str]) -> None:
    """See each case's docstring for its oracle and tolerance."""
    assert name in interpreted, f"case {name} did not report"
    if interpreted[name] != "ok":
        pytest.fail(f"{name} under TRITON_INTERPRET=1:\n{interpreted[name]}", pytrace=False)


def test_every_kernel_compiles_for_sm70_sm80_and_sm90(subprocesses) -> None:
    """Oracle: triton.compile itself. Every kernel variant the launchers can produce is built
    for GPUTarget("cuda", 70 / 80 / 90, 32) down to a cubin, without a GPU; sm_70 is what lets
    kernels/dispatch.py select the kernels on V100 under the installed Triton."""
    code, out, err = _finish(subprocesses["build"])
    assert code == 0, f"build check failed:\n{out}\n{err[-4000:]}"
    lines = [line for line in out.splitlines() if line.startswith("sm_")]
    built = {(line.split()[0], line.split()[1].split("[")[0]) for line in lines}
    kernels_seen = {k for _, k in built}
    assert kernels_seen == {
        "_layer_norm_fwd",
        "_layer_norm_bwd",
        "_bias_gelu_fwd",
        "_bias_gelu_bwd",
        "_ce_row_stats",
        "_ce_loss_grad",
        "_lamb_moments",
        "_lamb_apply",
    }
    assert {arch for arch, _ in built} == {"sm_70", "sm_80", "sm_90"}
    from kernels import dispatch

    assert dispatch.triton_version() in dispatch.SM70_TRITON_VERSIONS
    assert all("cubin" in line and " 0 B cubin" not in line for line in lines)


if __name__ == "__main__":
    _run_cases()
