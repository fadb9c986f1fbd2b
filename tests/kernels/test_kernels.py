"""Fused Triton kernels against the literal reference: values and gradients, odd shapes, dtypes,
label orders, unequal counts, view rows, splits and accumulation.

On a CPU machine the kernels run in Triton's interpreter (see conftest.py); on a GPU machine
the same tests run the compiled kernels on CUDA.
"""

import pytest
import torch
from helpers import make_problem

from fastsfm import SFMLoss, sfm_loss
from fastsfm.kernels import launch, sfm
from fastsfm.loss import ops
from fastsfm.loss.reference import sfm_reference

# (loss rtol, loss atol, gradient error relative to the largest reference gradient entry, beyond the
# error of the exact gradient rounded to the dtype).  Inputs are rounded to the dtype first and the
# reference runs on the rounded values in float64, so the kernels' only errors are float32
# accumulation (amplified where the two flows are nearly parallel: the gradient is the small
# component of one orthogonal to the other) and the final rounding.  That rounding is counted
# apart because it can be large: at C = 1000, N = 50,000 even the x1024-scaled float16 gradient
# (~G/n) lies partly among the subnormals (measured on an H200: 1.4e-3 of the largest entry).
TOL = {torch.float32: (1e-5, 1e-6, 1e-4), torch.bfloat16: (1e-5, 1e-6, 8e-3), torch.float16: (1e-5, 1e-6, 1e-3)}


def _check(z, y, mu, dtype, **options):
    x = z.to(dtype).clone().requires_grad_()
    got = sfm_loss(x, y, mu, backend="triton", **options)
    ref_in = z.to(dtype).double().requires_grad_()
    want = sfm_reference(
        ref_in,
        y,
        mu,
        options.get("objective", "flow"),
        options.get("alpha", 1.0),
        options.get("nontarget_divisor"),
    )
    rtol, atol, gtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    upstream = 1024.0  # the authors' fixed loss scale for float16
    (got * upstream).backward()
    (want * upstream).backward()
    assert x.grad.dtype == dtype and x.grad.shape == z.shape
    exact = ref_in.grad
    scale = exact.abs().max().item()
    err = (x.grad.double() - exact).abs().max().item() / scale
    floor = (exact.to(dtype).double() - exact).abs().max().item() / scale  # the dtype's own rounding
    assert err < floor + gtol, f"relative gradient error {err:.2e} >= {floor:.1e} (rounding) + {gtol:.0e}"


@pytest.mark.parametrize("n", [1, 7, 130, 1000])
@pytest.mark.parametrize("c", [2, 10, 33])
@pytest.mark.parametrize("d", [3, 64, 200])
def test_kernels_match_reference_float32(n, c, d, device):
    if n < c:  # some class has no row: a clear error, never a silent NaN
        z, y, mu = make_problem(c, c, d, device=device)
        with pytest.raises(ValueError, match="classes without rows"):
            sfm_loss(z[:n], y[:n], mu, backend="triton")
        return
    z, y, mu = make_problem(n, c, d, device=device, seed=n + c + d)
    _check(z, y, mu, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n,c,d,order", [(7, 2, 3, "shuffled"), (130, 33, 200, "shuffled"), (1000, 10, 64, "contiguous")]
)
def test_kernels_match_reference_half(n, c, d, order, dtype, device):
    z, y, mu = make_problem(n, c, d, device=device, order=order)
    _check(z, y, mu, dtype)


@pytest.mark.parametrize(
    "options",
    [
        {"objective": "decouple"},
        {"objective": "decouple", "alpha": 0.35},
        {"nontarget_divisor": 40.0},
        {"objective": "decouple", "alpha": 0.0, "nontarget_divisor": 3.0},
    ],
)
@pytest.mark.parametrize("order", ["shuffled", "contiguous"])
def test_kernels_decouple_and_divisor(options, order, device):
    z, y, mu = make_problem(77, 9, 45, device=device, order=order)
    _check(z, y, mu, torch.float32, **options)


def test_kernels_view_rows_equal_averaged_views(device):
    z, y, mu = make_problem(20, 5, 40, device=device, order="contiguous")
    views = [z + 0.2 * torch.randn_like(z) for _ in range(3)]
    stacked = sfm_loss(torch.cat(views).float(), y.repeat(3), mu, backend="triton")
    averaged = sfm_loss((sum(views) / 3).float(), y, mu, backend="triton")
    torch.testing.assert_close(stacked, averaged, rtol=1e-5, atol=1e-6)


def test_kernels_non_contiguous_features(device):
    z, y, mu = make_problem(19, 6, 33, device=device)
    wide = torch.zeros(33, 19, device=device)
    wide.copy_(z.T)
    x = wide.T.requires_grad_()  # column-major view: stride (1, 19)
    assert not x.is_contiguous()
    got = sfm_loss(x, y, mu, backend="triton")
    got.backward()
    ref = z.double().requires_grad_()
    want = sfm_reference(ref, y, mu)
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-5 * ref.grad.abs().max().item())


def _skewed(n, c, d, heavy, device, order, dtype=torch.float32, seed=0):
    """A problem whose class 1 holds ``heavy`` of the rows (the others share the rest unequally)."""
    z, y, mu = make_problem(n, c, d, dtype, device=device, order="shuffled", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    y = y.cpu().clone()
    y[torch.randperm(n, generator=gen)[: int(heavy * n)]] = 1
    y[:c] = torch.arange(c)  # every class keeps a row
    if order == "contiguous":
        y = y.sort().values
    return z, y.to(device), mu


def _sums_want(z, y, c):
    want = torch.zeros(c, z.shape[1], dtype=torch.float64, device=z.device).index_add_(0, y, z.double())
    return want, torch.bincount(y, minlength=c).tolist()


@pytest.mark.parametrize("order", ["contiguous", "shuffled"])
@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize(
    "n,c,d,heavy", [(150, 7, 70, 0.0), (600, 9, 45, 0.0), (2000, 5, 33, 0.0), (700, 30, 40, 0.6), (300, 3, 17, 0.9)]
)
def test_class_sums_items_slices_and_accumulate(n, c, d, heavy, balance, order, device):
    """Every item shape -- groups of classes (one-hot product), one class per item, slices of a heavy
    class folded by the last slice -- against a float64 ``index_add``, then a second chunk accumulated."""
    z, y, _ = _skewed(n, c, d, heavy, device, order, torch.bfloat16)
    plan = ops.label_plan(y, c, order == "contiguous", dim=d, balance=balance)
    if balance and heavy:
        assert plan.kernel.slots > 0  # the heavy class is sliced
    buf = ops.class_sums(z, plan, c, "triton")
    assert buf.shape == (c, ops.sums_width(d)) and buf.dtype == torch.float32  # rows padded to a multiple of 16
    want, counts = _sums_want(z, y, c)
    torch.testing.assert_close(buf[:, :d].double(), want, rtol=1e-6, atol=1e-5)
    assert buf[:, d].tolist() == counts
    assert plan.kernel.scratch(z.device)[1].eq(0).all()  # the slices' arrival counters reset themselves
    part = ops.label_plan(y[:40], c, False, dim=d)
    ops.class_sums(z[:40], part, c, "triton", out=buf)  # accumulate a second chunk
    want.index_add_(0, y[:40], z[:40].double())
    torch.testing.assert_close(buf[:, :d].double(), want, rtol=1e-6, atol=1e-5)
    more = torch.bincount(y[:40], minlength=c).tolist()
    assert buf[:, d].tolist() == [a + b for a, b in zip(counts, more, strict=True)]


def test_segment_items_cover_every_class_and_even_out_rows():
    """Items partition the classes (slices partition a class); with counts, no program reads more
    than about twice the target rows unless a single class is that big and the slice budget is spent."""
    counts = [1] * 200 + [5000] + [3] * 100 + [40] * 50
    n, c, d = sum(counts), len(counts), 768
    items, slots = sfm.segment_items(counts, n, c, d)
    tiles = sfm.tiles_for(n, c, d)
    seen = []
    for c0, c1, part, parts, slot in items:
        assert c0 < c1 and (parts == 1 or (c1 == c0 + 1 and 0 <= part < parts and slot >= 0))
        if part == 0:
            seen += range(c0, c1)
        rows = sum(counts[c0:c1]) / parts
        assert rows <= 2 * tiles.rows or c1 == c0 + 1, (c0, c1, rows)
        assert c1 - c0 <= tiles.group
    assert seen == list(range(c))
    assert slots == sum(p for _, _, part, p, _ in items if p > 1 and part == 0) > 0
    uniform, none = sfm.segment_items(None, n, c, d)  # no counts: fixed groups, no slices
    assert none == 0 and [i[0] for i in uniform] == sorted({i[0] for i in uniform})


@pytest.mark.parametrize("objective,alpha,divisor", [("flow", 1.0, 6.0), ("flow", 1.0, 13.0), ("decouple", 0.4, 6.0)])
def test_triton_gradient_rows_equal_autograd(objective, alpha, divisor, device):
    """``G/n`` rebuilt per row by the backward kernel from the epilogue's workspace, against autograd of
    the torch epilogue in float64 (the chunked objective's path: sums, epilogue, rows)."""
    z, y, mu = make_problem(60, 7, 50, device=device)
    plan = ops.label_plan(y, 7, False, dim=50)
    buf = ops.class_sums(z, plan, 7, "triton")
    sums = buf.double().cpu()
    loss, grad = ops.epilogue(buf, ops.flow_constants(mu), objective, alpha, divisor, "triton")
    assert isinstance(grad, ops.TritonGrad) and grad.sums is buf  # no (C, D) gradient allocation
    want_loss, want_gn = ops.epilogue(
        sums, ops.flow_constants(mu.cpu(), torch.float64), objective, alpha, divisor, "torch"
    )
    assert loss.shape == ()
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=1e-5, atol=1e-6)
    upstream = torch.full((1,), 3.0, device=device)
    rows = ops.grad_rows(grad, plan, upstream, torch.float32, "triton")
    want = 3.0 * want_gn[y.cpu()]
    torch.testing.assert_close(rows.double().cpu(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_loss_and_gradient_are_bitwise_reproducible(device):
    """Two calls on the same input give the same bits: no atomics in any sum, fixed orders."""
    z, y, mu = _skewed(900, 20, 70, 0.5, device, "shuffled")
    module = SFMLoss(mu, backend="triton")
    results = []
    for _ in range(2):
        x = z.clone().requires_grad_()
        loss = module(x, y)
        loss.backward()
        results.append((loss.detach().clone(), x.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("heavy", [0.5, 0.95])
@pytest.mark.parametrize("objective", ["flow", "decouple"])
def test_kernels_match_reference_with_skewed_counts(heavy, objective, device):
    z, y, mu = _skewed(500, 12, 37, heavy, device, "shuffled", seed=3)
    _check(z, y, mu, torch.float32, objective=objective, alpha=0.3)


def test_sfmloss_module_auto_dispatch_and_buffers(device):
    z, y, mu = make_problem(21, 7, 30)
    module = SFMLoss(mu.float()).to(device)
    assert module.flow.device.type == device.type and module.flow.dtype == torch.float32
    x = z.float().to(device).requires_grad_()
    out = module(x, y.to(device))
    out.backward()
    want = sfm_reference(z.double(), y, mu)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-6)
    fused = SFMLoss(mu, backend="triton").to(device)(z.float().to(device), y.to(device))
    torch.testing.assert_close(fused.double().cpu(), want, rtol=1e-5, atol=1e-6)


def test_float64_centres_keep_float32_copies_for_the_triton_path():
    """float64 centres: float64 constants in the state dict, float32 copies (not saved) that the
    Triton epilogue reads as they are -- no cast of the (C, D) constants in every call."""
    z, y, mu = make_problem(21, 7, 30)
    module = SFMLoss(mu, backend="triton")
    assert all(not k.endswith("_f32") and v.dtype == torch.float64 for k, v in module.state_dict().items())
    assert module.constants("torch").dtype == torch.float64
    consts = module.constants("triton")
    assert consts.dtype == torch.float32 and consts.to(torch.float32) is consts
    torch.testing.assert_close(consts.flow, module.flow.float())
    torch.testing.assert_close(module(z.float(), y).double(), sfm_reference(z, y, mu).double(), rtol=1e-5, atol=1e-6)
    assert SFMLoss(mu.float()).constants("triton").dtype == torch.float32  # no copies of float32 ones


@pytest.mark.gpu
def test_cuda_no_host_sync_and_graph_capture():
    z, y, mu = make_problem(4000, 100, 256, device="cuda")
    module = SFMLoss(mu).cuda()
    x = z.float().requires_grad_()
    module(x, y).backward()  # first call: validation and plan
    torch.cuda.set_sync_debug_mode("error")
    try:
        x.grad = None
        module(x, y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = x.grad.clone()
    static_x = x.detach().clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        module(static_x, y).backward()  # warm-up on the side stream, as graph capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_loss = module(static_x, y)
        static_loss.backward()
    graph.replay()
    torch.testing.assert_close(static_x.grad, eager)


@pytest.mark.gpu
def test_device_mismatch_is_a_clear_error():
    z, y, mu = make_problem(4, 3, 8)
    with pytest.raises(ValueError, match="device mismatch"):
        SFMLoss(mu.cuda())(z, y)


def test_one_forward_backward_is_three_launches_on_the_tensors_device(monkeypatch, device):
    """Class sums, one epilogue, the backward rows: three launches, each with the tensors' device
    current (the ops enter it when it is not)."""
    launches = []
    original = launch.Launcher.__call__

    def record(self, key, spec, args):
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        current = torch.cuda.current_device() if device.type == "cuda" else None
        launches.append((self.kernel.fn.__name__, devices, current))
        return original(self, key, spec, args)

    monkeypatch.setattr(launch.Launcher, "__call__", record)
    z, y, mu = make_problem(40, 5, 24, device=device)
    x = z.float().requires_grad_()
    sfm_loss(x, y, mu, backend="triton").backward()
    assert [name for name, *_ in launches] == ["_class_sums_kernel", "_epilogue_kernel", "_backward_kernel"]
    for name, devices, current in launches:
        assert devices == {x.device}, name
        assert current in (None, x.device.index), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("objective", ["flow", "decouple"])
@pytest.mark.parametrize("order", ["contiguous", "shuffled"])
@pytest.mark.parametrize("n,c,d", [(1000, 100, 384), (50_000, 1000, 768)])
def test_cuda_kernels_match_reference_at_scale(n, c, d, order, objective, dtype):
    """The compiled kernels on CUDA against the literal reference in float64 (on the GPU), up to N = 50,000."""
    z, y, mu = make_problem(n, c, d, device="cuda", order=order, seed=n + c)
    _check(z, y, mu, dtype, objective=objective)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_their_tensors_device_not_the_current_one():
    z, y, mu = make_problem(300, 10, 64, device="cuda:1")
    want = sfm_reference(z.double(), y, mu)
    with torch.cuda.device(0):
        x = z.float().requires_grad_()
        got = sfm_loss(x, y, mu, backend="triton")
        got.backward()
    torch.cuda.synchronize(1)
    assert x.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_each_stream_has_its_own_arrival_counters_and_carry_rows(monkeypatch, device):
    """One plan's losses launched on two streams get their own epilogue counter, slice counters and
    carry rows (they would race on shared ones), and a stream reuses its own across calls (no
    allocation per call).  Streams are stood in for by the key the ops read the current stream with."""
    stream = ["a"]
    monkeypatch.setattr(ops, "_stream_key", lambda dev: (dev.type, stream[0]))
    monkeypatch.setattr(ops, "_COUNTERS", {})
    scratch = []  # (stream, sums carry, sums counter, epilogue counter) per forward
    original = launch.Launcher.__call__

    def record(self, key, spec, args):
        name = self.kernel.fn.__name__
        if name == "_class_sums_kernel":
            scratch.append([stream[0], args[6].data_ptr(), args[7].data_ptr()])
        elif name == "_epilogue_kernel":
            scratch[-1].append(args[8].data_ptr())
        return original(self, key, spec, args)

    monkeypatch.setattr(launch.Launcher, "__call__", record)
    z, y, mu = make_problem(300, 3, 24, device=device, order="shuffled", seed=4)
    y[:250] = 1  # one heavy class: sliced, so the sums use carry rows and slice counters
    module = SFMLoss(mu, backend="triton").to(device)
    want = sfm_reference(z.double(), y, mu)
    for name in ("a", "b", "a", "b"):
        stream[0] = name
        torch.testing.assert_close(module(z.float(), y).double(), want, rtol=1e-5, atol=1e-6)
    assert module._plan.kernel.slots > 0
    a1, b1, a2, b2 = scratch
    assert a1 == a2 and b1 == b2  # kept per stream
    assert all(x != y for x, y in zip(a1[1:], b1[1:], strict=True))  # nothing shared across streams


@pytest.mark.gpu
def test_two_streams_of_one_device_compute_their_losses_concurrently():
    """Two losses of one module on two streams at once, many times over: each equals the reference
    (with one shared counter, interleaved epilogues and slices would corrupt each other)."""
    z, y, mu = make_problem(20_000, 50, 384, device="cuda", order="shuffled", seed=9)
    y[:12_000] = 3  # a heavy, sliced class
    module = SFMLoss(mu, backend="triton").cuda()
    inputs = [z.float(), (z * 0.5).float()]
    want = [sfm_reference(x.double(), y, mu) for x in inputs]
    module(inputs[0], y)  # validation and the plan, once
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = [[], []]
    for _ in range(50):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                got[i].append(module(inputs[i], y))
    torch.cuda.synchronize()
    for i in range(2):
        for loss in got[i]:
            torch.testing.assert_close(loss.double(), want[i], rtol=1e-5, atol=1e-6)
