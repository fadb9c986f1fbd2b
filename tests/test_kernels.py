"""Fused Triton kernels against the literal reference: values and gradients, odd shapes, dtypes,
label orders, unequal counts, view rows, splits and accumulation.

On a CPU machine the kernels run in Triton's interpreter (see conftest.py); on a GPU machine
the same tests run the compiled kernels on CUDA.
"""

import contextlib

import pytest
import torch
from helpers import make_problem

from fastsfm import SFMLoss, kernels, ops, sfm_loss
from fastsfm.kernels import sfm as kernel_module
from fastsfm.reference import sfm_reference

KERNELS = ("_class_sums_kernel", "_epi_colsum_kernel", "_epi_partials_kernel", "_epi_grad_kernel", "_broadcast_kernel")

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


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("split", [1, 3])
def test_class_sums_split_and_accumulate(split, contiguous, device):
    order = "contiguous" if contiguous else "shuffled"
    z, y, _ = make_problem(150, 7, 70, torch.bfloat16, device=device, order=order)
    plan = ops.label_plan(y, 7, contiguous)
    buf = ops.class_sums(z, plan, 7, "triton", split=split)
    assert buf.shape == (split, 7, 80) and buf.dtype == torch.float32  # rows padded to a multiple of 16
    want = torch.zeros(7, 70, dtype=torch.float64, device=device).index_add_(0, y, z.double())
    total = buf.sum(0)
    torch.testing.assert_close(total[:, :70].double(), want, rtol=1e-6, atol=1e-5)
    assert total[:, 70].tolist() == torch.bincount(y, minlength=7).tolist()
    ops.class_sums(z[:40], ops.label_plan(y[:40], 7, False), 7, "triton", out=buf)  # accumulate a second chunk
    want.index_add_(0, y[:40], z[:40].double())
    torch.testing.assert_close(buf.sum(0)[:, :70].double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("objective,alpha,divisor", [("flow", 1.0, 6.0), ("flow", 1.0, 13.0), ("decouple", 0.4, 6.0)])
def test_epilogue_gradient_equals_autograd(objective, alpha, divisor, device):
    """G = dL/dt from the fused epilogue against autograd of the torch epilogue, split buffers included."""
    z, y, mu = make_problem(60, 7, 50, device=device)
    plan = ops.label_plan(y, 7, False)
    consts = ops.flow_constants(mu)
    buf = ops.class_sums(z, plan, 7, "triton", split=2)
    sums = buf.double().cpu()
    loss, gn = ops.epilogue(buf, consts, objective, alpha, divisor, "triton")
    assert gn.data_ptr() == buf.data_ptr()  # written over the sums: no (C, D) allocation
    want_loss, want_gn = ops.epilogue(
        sums, ops.flow_constants(mu.cpu(), torch.float64), objective, alpha, divisor, "torch"
    )
    assert loss.shape == () and gn.shape == (7, 50)
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gn.double().cpu(), want_gn, rtol=1e-4, atol=1e-5 * want_gn.abs().max().item())


def test_split_reduction_inside_the_loss(monkeypatch, device):
    z, y, mu = make_problem(300, 4, 30, device=device)
    want = sfm_loss(z, y, mu, backend="triton")
    monkeypatch.setattr(kernels, "default_split", lambda *args: 3)
    torch.testing.assert_close(sfm_loss(z, y, mu, backend="triton"), want, rtol=1e-6, atol=1e-7)


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


class _Recorded:
    """Stands in for a kernel object: records each launch (the device guard active at launch time,
    the devices of its tensor arguments), then launches the real kernel."""

    def __init__(self, kernel, name, launches, guards):
        self.kernel, self.name, self.launches, self.guards = kernel, name, launches, guards

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            self.launches.append((self.name, list(self.guards), devices))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_each_launch_runs_under_its_tensors_device_guard(monkeypatch, device):
    """Triton launches on the current device: every launcher enters the guard of its tensors' device
    (``torch.cuda.device(t.device)`` on CUDA) around its launches; one forward+backward is five launches."""
    launches, guards = [], []

    @contextlib.contextmanager
    def guard(t):
        guards.append(t.device)
        yield
        guards.pop()

    monkeypatch.setattr(kernel_module, "_device_of", guard)
    for name in KERNELS:
        monkeypatch.setattr(kernel_module, name, _Recorded(getattr(kernel_module, name), name, launches, guards))
    z, y, mu = make_problem(40, 5, 24, device=device)
    x = z.float().requires_grad_()
    sfm_loss(x, y, mu, backend="triton").backward()
    assert [name for name, *_ in launches] == list(KERNELS)
    for name, active, devices in launches:
        assert active == [x.device] and devices == {x.device}, name


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
